"""Widget controls generated from ``Param`` declarations (ipywidgets 8), and reading the user's values back.

float/int with both bounds -> slider over the declared range (open bounds stay one step inside); unbounded
numbers -> number box; bool -> checkbox; choice -> dropdown; floats (one per model), layers and parameters
whose default is None -> text (empty = the declared default); a bounded schedule -> ``ScheduleControl``: the
slider for one value over depth, and beside it a text field for anchors over depth ("0, 0.3, 1") or JSON
per-filter entries, which wins when filled. Typed text is checked by ``Param.check`` — the parser and checks the
CLI uses — as it is typed (the error shows under the control) and again when merging.
"""

from __future__ import annotations

import html
import json
import math

import ipywidgets as widgets

from nbmerge.errors import ParameterError
from nbmerge.method.params import Param

STEPS = 100  # slider resolution: the declared range in 100 steps
_STYLE = {"description_width": "110px"}
_LAYOUT = {"width": "420px"}


class ScheduleControl(widgets.VBox):
    """A schedule parameter: ``slider`` (one value everywhere) and ``anchors`` (text: anchors spread over layer
    depth, e.g. "0, 0.3, 1", or JSON [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]). Filled anchors
    win and grey the slider out; ``message`` shows why typed anchors are invalid."""

    def __init__(self, param: Param, method: str, slider: widgets.FloatSlider):
        self.param, self.method, self.slider = param, method, slider
        self.anchors = widgets.Text(placeholder="or anchors over depth: 0, 0.3, 1", tooltip=_tooltip(param),
                                    layout={"width": "240px"})
        self.message = widgets.HTML()
        self.anchors.observe(lambda _change: self._check(), names="value")
        super().__init__([widgets.HBox([slider, self.anchors]), self.message])

    @property
    def value(self):
        """The typed anchors (text, as the CLI gets it) when given, else the slider's number."""
        text = self.anchors.value.strip()
        return text if text else self.slider.value

    def checked(self):
        """The value as ``Param.check`` canonicalises it (raises ParameterError on a bad entry)."""
        return self.param.check(self.value, self.method)

    def close(self) -> None:
        """Close the parts too (the panel closes a method's controls when another method is chosen)."""
        for part in (self.slider, self.anchors, self.message, *self.children):
            part.close()
        super().close()

    def _check(self) -> None:
        self.slider.disabled = bool(self.anchors.value.strip())
        try:
            self.checked()
        except ParameterError as exc:
            self.message.value = f"<span style='color:#b00020'>{html.escape(str(exc))}</span>"
        else:
            self.message.value = ""


def _tooltip(param: Param) -> str:
    return f"{param.help}" + (f"; {param.range_text()}" if param.range_text() else "")


def make_control(param: Param, method: str = "") -> widgets.Widget:
    """The widget for one parameter, initialised to its default; its tooltip is the help and the valid range.

    method: the method's name, for the errors a schedule's typed anchors show.
    """
    tooltip = _tooltip(param)
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
        slider = widgets.FloatSlider(value=param.default, min=low, max=high, step=step,
                                     readout_format=f".{decimals}f", continuous_update=False, **common)
        return ScheduleControl(param, method, slider) if param.kind == "schedule" else slider
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
    if isinstance(control, ScheduleControl):
        return control.value if isinstance(control.value, str) else round(control.value, 12)
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
