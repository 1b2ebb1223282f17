"""Widget controls generated from Param declarations, and the values read back from them."""

from __future__ import annotations

import ipywidgets as widgets
import pytest

from nbmerge.controls import control_value, make_control
from nbmerge.params import Param
from nbmerge.registry import all_methods


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
    assert isinstance(t, widgets.FloatSlider) and (t.min, t.max) == (0.0, 1.0)
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
