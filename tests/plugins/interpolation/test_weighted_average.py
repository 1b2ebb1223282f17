"""weighted_average and simple_average against Σ w_i θ_i computed independently."""

from __future__ import annotations

import pytest
import torch
from method_cases import (
    EMBED,
    FINAL_NORM,
    HEAD,
    UP,
    Q,
    assert_matches,
    decoder_state,
    f64,
    fine_tuned,
    merge,
    randn,
    weighted_sum_reference,
)

from nbmerge import ModelInputError, ParameterError


def test_weighted_average_normalises_the_weights():
    models = [randn(3, 5, seed=s) for s in (1, 2, 3)]
    merged = merge("weighted_average", [{"w": m} for m in models], weights=[1.0, 2.0, 5.0])
    assert_matches(merged["w"], weighted_sum_reference(models, [1 / 8, 2 / 8, 5 / 8]))


def test_weighted_average_without_normalize_uses_the_raw_weights():
    models = [randn(3, 5, seed=s) for s in (1, 2, 3)]
    merged = merge("weighted_average", [{"w": m} for m in models], weights=[0.5, -0.25, 2.0], normalize=False)
    assert_matches(merged["w"], weighted_sum_reference(models, [0.5, -0.25, 2.0]))


def test_weighted_average_weights_summing_to_zero_cannot_be_normalised():
    a, b = randn(4, seed=1), randn(4, seed=2)
    with pytest.raises(ParameterError, match="normali"):
        merge("weighted_average", [{"w": a}, {"w": b}], weights=[1.0, -1.0])
    # without normalisation the same weights are a plain difference
    merged = merge("weighted_average", [{"w": a}, {"w": b}], weights=[1.0, -1.0], normalize=False)
    assert_matches(merged["w"], f64(a) - f64(b))


def test_weighted_average_backbone_only_takes_tensors_outside_the_layers_from_the_base():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2)]
    merged = merge("weighted_average", models, base=base, weights=[3.0, 1.0], backbone_only=True)
    for name in base:
        if name.startswith("model.layers."):
            # the base takes no part in the average of the layers
            assert_matches(merged[name], weighted_sum_reference([m[name] for m in models], [0.75, 0.25]), name=name)
        else:
            assert torch.equal(merged[name], base[name]), name


def test_weighted_average_backbone_only_without_base_copies_the_first_model():
    first = decoder_state(seed=0)
    second = fine_tuned(first, seed=1)
    merged = merge("weighted_average", [first, second], backbone_only=True)
    for name in (EMBED, FINAL_NORM, HEAD):
        assert torch.equal(merged[name], first[name]), name
    assert_matches(merged[UP.format(1)], 0.5 * f64(first[UP.format(1)]) + 0.5 * f64(second[UP.format(1)]))


def test_weighted_average_backbone_only_allows_different_vocabularies():
    base = decoder_state(vocab=6, seed=0)
    models = []
    for seed in (1, 2):
        model = fine_tuned(base, seed=seed)
        model[EMBED] = randn(9, 4, seed=10 + seed)  # vocabulary extended to 9 tokens
        model[HEAD] = randn(9, 4, seed=20 + seed)
        models.append(model)
    merged = merge("weighted_average", models, base=base, backbone_only=True)
    assert merged[EMBED].shape == (6, 4) and torch.equal(merged[EMBED], base[EMBED])
    assert torch.equal(merged[HEAD], base[HEAD])
    assert_matches(merged[Q.format(0)], weighted_sum_reference([m[Q.format(0)] for m in models], [0.5, 0.5]))
    # averaging everything is impossible with two vocabularies, and the error names the tensor
    with pytest.raises(ModelInputError, match="embed_tokens"):
        merge("weighted_average", [models[0], base])


def test_simple_average_is_the_uniform_mean():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    merged = merge("simple_average", models)
    assert set(merged) == set(base)
    for name in base:
        assert_matches(merged[name], sum(f64(m[name]) for m in models) / 3, name=name)


def test_simple_average_takes_no_base():
    with pytest.raises(ParameterError, match="base"):
        merge("simple_average", [{"w": randn(2, seed=1)}, {"w": randn(2, seed=2)}], base={"w": randn(2, seed=3)})
