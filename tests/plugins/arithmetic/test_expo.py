"""ExPO: θ_r + α (θ_r − θ_0) and its per-tensor filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases import (
    BIAS,
    EMBED,
    FINAL_NORM,
    HEAD,
    LAYER_NORM,
    UP,
    Q,
    assert_matches,
    decoder_state,
    f64,
    fine_tuned,
    merge,
    randn,
)


def expo_reference(base: dict, models: list[dict], name: str, factor: float) -> np.ndarray:
    """θ_r + a (θ_r − θ_0) with θ_r the average of the models."""
    reference = sum(f64(m[name]) for m in models) / len(models)
    return reference + factor * (reference - f64(base[name]))


def test_expo_extrapolates_a_layer_linear_weight():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3)
    name = UP.format(1)
    assert_matches(merged[name], f64(model[name]) + 0.3 * (f64(model[name]) - f64(base[name])), name=name)
    default = merge("expo", [model], base=base)
    assert_matches(default[name], expo_reference(base, [model], name, 0.1), name=name)


# FusionBench's ExPOAlgorithmForLlama: only the layers' linear weights are extrapolated (opt-in in nbmerge)
LLAMA_VARIANT = dict(on_linear_bias=False, on_norm=False, on_embedding=False, only_on_backbone=True)


def test_expo_defaults_extrapolate_every_tensor():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.5)
    for name in base:
        assert_matches(merged[name], expo_reference(base, [model], name, 0.5), name=name)


def test_expo_llama_variant_leaves_biases_norms_embeddings_and_head_at_the_fine_tune():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.5, **LLAMA_VARIANT)
    for name in (BIAS.format(0), LAYER_NORM.format(1), EMBED, FINAL_NORM, HEAD):
        assert torch.equal(merged[name], model[name]), name
    for name in (Q.format(0), UP.format(0)):
        assert_matches(merged[name], expo_reference(base, [model], name, 0.5), name=name)


def test_expo_attention_scaling_applies_to_attention_projections():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.4, attention_scaling=0.25)
    for i in range(2):
        assert_matches(merged[Q.format(i)], expo_reference(base, [model], Q.format(i), 0.4 * 0.25))
        assert_matches(merged[UP.format(i)], expo_reference(base, [model], UP.format(i), 0.4))


@pytest.mark.parametrize("fix_first, fix_last, extrapolated", [
    (1, 1, {1, 2, 3}),
    ("half", 0, {2, 3, 4}),  # half of 5 layers = 2
    (0, "half", {0, 1, 2}),
    (2, "half", {2}),
])
def test_expo_fixed_first_and_last_layers(fix_first, fix_last, extrapolated):
    base = decoder_state(num_layers=5, seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3, fix_first_n_layers=fix_first, fix_last_n_layers=fix_last)
    for i in range(5):
        name = UP.format(i)
        if i in extrapolated:
            assert_matches(merged[name], expo_reference(base, [model], name, 0.3), name=name)
        else:
            assert torch.equal(merged[name], model[name]), name


def test_expo_off_the_backbone_extrapolates_the_head():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3, **{**LLAMA_VARIANT, "only_on_backbone": False})
    assert_matches(merged[HEAD], expo_reference(base, [model], HEAD, 0.3))
    # the embeddings have their own switch, and the final norm is not a linear weight
    assert torch.equal(merged[EMBED], model[EMBED])
    assert torch.equal(merged[FINAL_NORM], model[FINAL_NORM])
    with_embedding = merge("expo", [model], base=base, alpha=0.3, **{**LLAMA_VARIANT, "on_embedding": True})
    assert_matches(with_embedding[EMBED], expo_reference(base, [model], EMBED, 0.3))


def test_expo_magnitude_sparsity_zeroes_the_smallest_deltas_of_each_row():
    name = UP.format(0)
    base = {name: randn(4, 6, seed=0)}
    model = {name: base[name] + randn(4, 6, seed=1)}
    merged = merge("expo", [model], base=base, alpha=0.5, magnitude_sparsity_ratio=0.5)[name]
    delta = f64(model[name]) - f64(base[name])
    for row in range(4):
        smallest = np.argsort(np.abs(delta[row]))[:3]  # int(6 · 0.5) = 3 per row
        delta[row, smallest] = 0.0
    assert_matches(merged, f64(model[name]) + 0.5 * delta)


def test_expo_with_several_models_extrapolates_their_average():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    merged = merge("expo", models, base=base, alpha=0.2)
    for name in base:
        assert_matches(merged[name], expo_reference(base, models, name, 0.2), name=name)
    llama = merge("expo", models, base=base, alpha=0.2, **LLAMA_VARIANT)
    for name in base:
        factor = 0.2 if name in {Q.format(i) for i in range(2)} | {UP.format(i) for i in range(2)} else 0.0
        assert_matches(llama[name], expo_reference(base, models, name, factor), name=name)
