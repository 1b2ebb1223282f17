"""SLERP against the formula, its lerp fallback and its schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_cases import (
    assert_matches,
    decoder_state,
    depth_schedule,
    f64,
    lerp_reference,
    merge,
    randn,
    slerp_reference,
)


def test_slerp_generic_angle_matches_the_formula():
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    cosine = float(f64(a).ravel() @ f64(b).ravel()) / (np.linalg.norm(f64(a)) * np.linalg.norm(f64(b)))
    assert abs(cosine) < 0.9  # a genuine angle, far from the lerp fallback
    merged = merge("slerp", [{"w": a}, {"w": b}], t=0.3)["w"]
    expected = slerp_reference(a, b, 0.3)
    assert_matches(merged, expected, atol=1e-5, rtol=1e-5)
    assert not np.allclose(expected, lerp_reference(a, b, 0.3), atol=1e-3)


def test_slerp_of_zero_vectors_is_finite():
    zero, b = torch.zeros(3, 4), randn(3, 4, seed=2)
    both_zero = merge("slerp", [{"w": zero}, {"w": zero.clone()}], t=0.5)["w"]
    assert torch.equal(both_zero, torch.zeros(3, 4))
    # a zero vector is left unnormalised: dot = 0, Θ = π/2, so θ = sin(tπ/2) · v1
    one_zero = merge("slerp", [{"w": zero}, {"w": b}], t=0.5)["w"]
    assert torch.isfinite(one_zero).all()
    assert_matches(one_zero, slerp_reference(zero, b, 0.5), atol=1e-6)
    assert_matches(one_zero, math.sin(0.25 * math.pi) * f64(b), atol=1e-6)


@pytest.mark.parametrize("factor", [2.5, -1.5], ids=["parallel", "anti-parallel"])
def test_slerp_of_parallel_vectors_falls_back_to_lerp(factor):
    a = randn(3, 4, seed=1)
    b = a * factor
    merged = merge("slerp", [{"w": a}, {"w": b}], t=0.3)["w"]
    assert torch.isfinite(merged).all()
    assert_matches(merged, lerp_reference(a, b, 0.3), atol=1e-6)


def test_slerp_endpoints():
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    assert torch.equal(merge("slerp", [{"w": a}, {"w": b}], t=0.0)["w"], a)
    assert torch.equal(merge("slerp", [{"w": a}, {"w": b}], t=1.0)["w"], b)
    # with a base, the base is the t = 0 endpoint
    assert torch.equal(merge("slerp", [{"w": b}], base={"w": a}, t=0.0)["w"], a)
    assert_matches(merge("slerp", [{"w": b}], base={"w": a}, t=0.7)["w"], slerp_reference(a, b, 0.7), atol=1e-5)


def test_slerp_per_filter_schedule():
    first, second = decoder_state(seed=0), decoder_state(seed=1)
    merged = merge("slerp", [first, second], t=[{"filter": "self_attn", "value": 0.0}, {"value": 1.0}])
    for name in first:
        expected = first[name] if "self_attn" in name else second[name]
        assert torch.equal(merged[name], expected), name


def test_slerp_depth_schedule():
    num_layers, anchors = 3, [0.0, 0.8]
    first, second = decoder_state(num_layers, seed=0), decoder_state(num_layers, seed=1)
    merged = merge("slerp", [first, second], t=anchors)
    for name in first:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = depth_schedule(anchors, layer, num_layers)
        assert_matches(merged[name], slerp_reference(first[name], second[name], t), atol=1e-5, name=name)
