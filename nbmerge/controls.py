"""Widget controls generated from ``Param`` declarations (ipywidgets 8), and reading the user's values back.

float/int with both bounds -> slider over the declared range (open bounds stay one step inside); unbounded
numbers -> number box; bool -> checkbox; choice -> dropdown; floats (one per model), layers and parameters
whose default is None -> text (empty = the declared default); schedule -> slider for the scalar value (anchor
lists and filters are given through the API or the magics).
"""

from __future__ import annotations

import json
import math

import ipywidgets as widgets

from .params import Param

STEPS = 100  # slider resolution: the declared range in 100 steps
_STYLE = {"description_width": "110px"}
_LAYOUT = {"width": "420px"}


def make_control(param: Param) -> widgets.Widget:
    """The widget for one parameter, initialised to its default; its tooltip is the help and the valid range."""
    tooltip = f"{param.help}" + (f"; {param.range_text()}" if param.range_text() else "")
    common = dict(description=param.name, tooltip=tooltip, style=_STYLE, layout=_LAYOUT)
    bounded = param.low is not None and param.high is not None
    if param.kind == "bool":
        return widgets.Checkbox(value=param.default, indent=False, **common)
    if param.kind == "choice":
        options = [(_show(choice), choice) for choice in param.choices]
        return widgets.Dropdown(options=options, value=param.default, **common)
    if param.kind in ("float", "schedule") and bounded and isinstance(param.default, (int, float)):
        step = (param.high - param.low) / STEPS
        low = param.low if param.low_inclusive else param.low + step
        high = param.high if param.high_inclusive else param.high - step
        decimals = max(0, -math.floor(math.log10(step)))
        return widgets.FloatSlider(value=param.default, min=low, max=high, step=step, readout_format=f".{decimals}f",
                                   continuous_update=False, **common)
    if param.kind == "int" and bounded:
        return widgets.IntSlider(value=param.default, min=int(param.low), max=int(param.high), **common)
    if param.kind == "float" and param.default is not None:
        return widgets.FloatText(value=param.default, **common)
    if param.kind == "int":
        return widgets.IntText(value=param.default, **common)
    placeholder = {"floats": "one per model, e.g. 0.3, 0.7", "layers": "a count or half",
                   "schedule": "a number or anchors, e.g. [0, 0.5, 1]"}.get(param.kind, "a number")
    default = "" if param.default is None else json.dumps(param.plain(param.default))
    return widgets.Text(value=default, placeholder=f"{placeholder} (empty: {_show(param.default)})", **common)


def control_value(param: Param, control: widgets.Widget):
    """The value to pass to ``merge`` for this control, or None to leave the parameter at its declared default.

    Text is handed over as typed: ``Param.check`` parses and validates it, so errors name the parameter.
    """
    value = control.value
    if isinstance(control, widgets.Text):
        return value.strip() or None
    if isinstance(value, float):
        return round(value, 12)  # slider steps accumulate float error (0.30000000000000004)
    return value


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
