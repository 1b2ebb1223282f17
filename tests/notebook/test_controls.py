"""Widget controls generated from Param declarations, and the values read back from them."""

from __future__ import annotations

import re

import ipywidgets as widgets
import pytest

from nbmerge.errors import ParameterError
from nbmerge.method.params import Param
from nbmerge.notebook.controls import ScheduleControl, control_value, make_control
from nbmerge.plugins import all_methods


def test_kinds_map_to_controls_with_declared_ranges():
    density = make_control(Param("density", "float", 0.2, "kept", low=0.0, high=1.0, low_inclusive=False))
    assert isinstance(density, widgets.FloatSlider)
    assert (density.min, density.max, density.value) == (pytest.approx(0.01), 1.0, 0.2)  # open bound: one step in
    drop = make_control(Param("drop_rate", "float", 0.5, "p", low=0.0, high=1.0, high_inclusive=False))
    assert (drop.min, drop.max) == (0.0, pytest.approx(0.99))
    assert isinstance(make_control(Param("scaling", "float", 0.3, "λ")), widgets.FloatText)
    assert isinstance(make_control(Param("n", "int", 2, "n", low=0, high=8)), widgets.IntSlider)
    assert isinstance(make_control(Param("seed", "int", 0, "seed", low=0)), widgets.IntText)
    assert isinstance(make_control(Param("on", "bool", True, "on")), widgets.Checkbox)
    sign = make_control(Param("rescale", "choice", True, "r", choices=(True, False, "l1")))
    assert isinstance(sign, widgets.Dropdown) and sign.options == (("true", True), ("false", False), ("l1", "l1"))
    t = make_control(Param("t", "schedule", 0.5, "t", low=0.0, high=1.0))
    assert isinstance(t, ScheduleControl) and (t.slider.min, t.slider.max, t.value) == (0.0, 1.0, 0.5)
    for kind, default in (("floats", None), ("layers", 0)):
        assert isinstance(make_control(Param("x", kind, default, "x")), widgets.Text)
    ratio = make_control(Param("ratio", "float", None, "r", low=0.0, high=1.0))
    assert isinstance(ratio, widgets.Text) and "empty: none" in ratio.placeholder


def test_values_read_back_as_merge_arguments():
    weights = Param("weights", "floats", None, "w", per_model=True)
    control = make_control(weights)
    assert control_value(weights, control) is None  # empty: the declared default
    control.value = " 0.3, 0.7 "
    assert weights.check(control_value(weights, control), "m") == (0.3, 0.7)
    slider_param = Param("density", "float", 0.2, "kept", low=0.0, high=1.0)
    slider = make_control(slider_param)
    slider.value = 0.1 + 0.2  # 0.30000000000000004
    assert control_value(slider_param, slider) == 0.3


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_builtin_parameter_gets_a_control_whose_default_validates(name):
    method = all_methods()[name]
    given = {}
    for param in method.params:
        value = control_value(param, make_control(param))
        if value is not None:
            given[param.name] = value
    checked = {p.name: p.check(given[p.name], name) for p in method.params if p.name in given}
    assert all(checked[k] == p.check(p.default, name) for p in method.params for k in [p.name] if k in checked)


def test_a_schedule_takes_anchors_over_depth_checked_as_the_cli_checks_them():
    t = all_methods()["slerp"].params[0]
    control = make_control(t, "slerp")
    assert control_value(t, control) == 0.5 and not control.slider.disabled
    control.anchors.value = " 0, 0.3, 1 "
    assert control.slider.disabled and control.message.value == ""
    assert t.check(control_value(t, control), "slerp") == ((None, (0.0, 0.3, 1.0)),)
    assert control.checked() == t.check(t.parse_text("0, 0.3, 1", "slerp"), "slerp")  # the CLI's parse
    control.anchors.value = '[{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]'
    assert control.checked() == (("self_attn", (0.0, 1.0)), (None, (0.5,)))
    for typed, error in (("0, 1.5", "slerp: parameter 't' must be in [0, 1], got 1.5"),
                         ("0, x", "slerp: parameter 't' must be a number, got 'x'"),
                         ("[{\"value\": 1", "slerp: parameter 't': cannot read '[{\"value\": 1' as schedule")):
        control.anchors.value = typed
        assert error.replace("'", "&#x27;").replace('"', "&quot;") in control.message.value, control.message.value
        with pytest.raises(ParameterError, match=re.escape(error)):
            control.checked()
    control.anchors.value = ""
    assert control.message.value == "" and not control.slider.disabled and control_value(t, control) == 0.5
