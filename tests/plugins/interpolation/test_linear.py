"""linear interpolation (1 − t) θ_A + t θ_B, with t scheduled over depth."""

from __future__ import annotations

import pytest
import torch
from method_cases import (
    EMBED,
    FINAL_NORM,
    HEAD,
    LAYER_NORM,
    UP,
    Q,
    assert_matches,
    decoder_state,
    depth_schedule,
    lerp_reference,
    merge,
    randn,
)


def test_linear_between_two_models():
    a, b = randn(4, 3, seed=1), randn(4, 3, seed=2)
    assert torch.equal(merge("linear", [{"w": a}, {"w": b}], t=0.0)["w"], a)
    assert torch.equal(merge("linear", [{"w": a}, {"w": b}], t=1.0)["w"], b)
    assert_matches(merge("linear", [{"w": a}, {"w": b}], t=0.3)["w"], lerp_reference(a, b, 0.3))


def test_linear_from_the_base_to_one_model():
    base, model = randn(4, 3, seed=1), randn(4, 3, seed=2)
    assert torch.equal(merge("linear", [{"w": model}], base={"w": base}, t=0.0)["w"], base)
    assert torch.equal(merge("linear", [{"w": model}], base={"w": base}, t=1.0)["w"], model)
    assert_matches(merge("linear", [{"w": model}], base={"w": base}, t=0.25)["w"], lerp_reference(base, model, 0.25))


def test_linear_t_schedule_is_piecewise_linear_over_layer_depth():
    num_layers, anchors = 5, [0.2, 1.0, 0.5]
    first = decoder_state(num_layers=num_layers, seed=0)
    second = decoder_state(num_layers=num_layers, seed=1)
    merged = merge("linear", [first, second], t=anchors)
    # layer i of 5 sits at i/4: positions 0, .25, .5, .75, 1 -> t = 0.2, 0.6, 1.0, 0.75, 0.5
    expected_t = [0.2, 0.6, 1.0, 0.75, 0.5]
    for i in range(num_layers):
        assert depth_schedule(anchors, i, num_layers) == pytest.approx(expected_t[i])
        for name in (Q.format(i), UP.format(i), LAYER_NORM.format(i)):
            assert_matches(merged[name], lerp_reference(first[name], second[name], expected_t[i]), name=name)
    for name in (EMBED, FINAL_NORM, HEAD):  # outside the layer stack: the first anchor
        assert_matches(merged[name], lerp_reference(first[name], second[name], anchors[0]), name=name)
