"""DARE: seeded counter-based masks, rescaling, and its linear and TIES combinations."""

from __future__ import annotations

import math

import numpy as np
import torch
from method_cases import UP, Q, assert_matches, f64, merge, randn, ties_inputs


def dare_inputs(shape=(8, 16), n_models: int = 2):
    """A base and models whose task vectors are non-zero everywhere (|τ| in [0.5, 1.5])."""
    base = {UP.format(0): randn(*shape, seed=0), Q.format(0): randn(*shape, seed=1),
            UP.format(1): randn(*shape, seed=2), Q.format(1): randn(*shape, seed=3)}
    models = []
    for i in range(n_models):
        model = {}
        for j, (name, tensor) in enumerate(base.items()):
            magnitude = 0.5 + torch.rand(shape, generator=torch.Generator().manual_seed(100 * i + j))
            signs = torch.where(randn(*shape, seed=1000 + 200 * i + j) >= 0, 1.0, -1.0)
            model[name] = tensor + magnitude * signs
        models.append(model)
    return base, models


def test_dare_with_drop_rate_0_is_task_arithmetic():
    base, models = dare_inputs()
    merged = merge("dare", models, base=base, drop_rate=0.0, scaling=0.4, weights=[1.0, 0.5])
    for name in base:
        task_sum = (f64(models[0][name]) - f64(base[name])) + 0.5 * (f64(models[1][name]) - f64(base[name]))
        assert_matches(merged[name], f64(base[name]) + 0.4 * task_sum, name=name)


def test_dare_is_reproducible_from_its_seed_and_seeds_differ():
    base, models = dare_inputs()
    first = merge("dare", models, base=base, drop_rate=0.5, seed=7)
    again = merge("dare", models, base=base, drop_rate=0.5, seed=7)
    other = merge("dare", models, base=base, drop_rate=0.5, seed=8)
    for name in base:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other[name]), name


def test_dare_masks_do_not_depend_on_tensor_order_or_on_the_other_tensors():
    base, models = dare_inputs()
    reference = merge("dare", models, base=base, drop_rate=0.5, seed=3)
    reversed_order = merge("dare", [dict(reversed(list(m.items()))) for m in models],
                           base=dict(reversed(list(base.items()))), drop_rate=0.5, seed=3)
    subset_names = [Q.format(1), UP.format(1)]
    subset = merge("dare", [{n: m[n] for n in subset_names} for m in models], base={n: base[n] for n in subset_names},
                   drop_rate=0.5, seed=3)
    for name in base:
        assert torch.equal(reversed_order[name], reference[name]), name
    for name in subset_names:
        assert torch.equal(subset[name], reference[name]), name


def test_dare_draws_a_separate_mask_for_every_tensor_and_model():
    # identical task vectors everywhere: only the masks can tell the tensors and the models apart
    names = [UP.format(0), UP.format(1)]
    base = {name: torch.zeros(30, 40) for name in names}
    models = [{name: torch.ones(30, 40) for name in names} for _ in range(2)]
    revealed = merge("dare", models, base=base, drop_rate=0.5, rescale=False, scaling=1.0, seed=1)
    first, second = (revealed[name] for name in names)
    assert not torch.equal(first, second)  # two tensors of one shape get different masks
    # two models with the same task vector: Σ m_i ∈ {0, 1, 2}; identical masks would never give 1
    assert int((first == 1).sum()) > 0.3 * first.numel()


def survivors(merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Where the merged tensor moved away from the base (every τ entry of these inputs is non-zero)."""
    return merged != base


def test_dare_survivors_are_rescaled_by_one_over_one_minus_p():
    name = UP.format(0)
    base = {name: randn(100, 100, seed=0)}
    task_vector = (0.5 + torch.rand(100, 100, generator=torch.Generator().manual_seed(1))) * torch.where(
        randn(100, 100, seed=2) >= 0, 1.0, -1.0)
    model = {name: base[name] + task_vector}
    p, scaling = 0.99, 0.5
    merged = merge("dare", [model], base=base, drop_rate=p, scaling=scaling)[name]
    kept = survivors(merged, base[name])
    # 10 000 Bernoulli(0.01) draws: 100 expected, standard deviation ~10
    assert 50 <= int(kept.sum()) <= 150
    true_tau = f64(model[name]) - f64(base[name])
    expected = f64(base[name]) + scaling * true_tau / (1.0 - p)
    np.testing.assert_allclose(f64(merged)[kept.numpy()], expected[kept.numpy()], rtol=1e-5, atol=1e-4)
    assert torch.equal(merged[~kept], base[name][~kept])


def test_dare_drops_a_fraction_p_of_the_entries():
    name = UP.format(0)
    base = {name: torch.zeros(400, 500)}
    model = {name: torch.ones(400, 500)}
    p = 0.3
    merged = merge("dare", [model], base=base, drop_rate=p, scaling=1.0, seed=11)[name]
    n = merged.numel()
    dropped = int((merged == 0).sum())
    tolerance = 5 * math.sqrt(n * p * (1 - p))  # five binomial standard deviations
    assert abs(dropped - n * p) <= tolerance
    assert_matches(merged[merged != 0], np.full(n - dropped, 1.0 / (1.0 - p)))


def test_dare_rescale_l1_keeps_each_task_vectors_l1_norm():
    base, models = dare_inputs(shape=(20, 30), n_models=1)
    merged = merge("dare", models, base=base, drop_rate=0.6, rescale="l1", scaling=1.0, seed=5)
    for name in base:
        task_vector = f64(models[0][name]) - f64(base[name])
        merged_delta = f64(merged[name]) - f64(base[name])
        kept = survivors(merged[name], base[name]).numpy()
        assert 0 < kept.sum() < kept.size
        np.testing.assert_allclose(np.abs(merged_delta).sum(), np.abs(task_vector).sum(), rtol=1e-5)
        # one common factor ‖τ‖₁ / ‖m ⊙ τ‖₁ on the survivors (not 1 / (1 − p))
        factor = np.abs(task_vector).sum() / np.abs(task_vector[kept]).sum()
        np.testing.assert_allclose(merged_delta[kept], factor * task_vector[kept], rtol=1e-5, atol=1e-5)


def test_dare_without_rescale_keeps_survivors_as_they_are():
    base, models = dare_inputs(n_models=1)
    merged = merge("dare", models, base=base, drop_rate=0.5, rescale=False, scaling=0.8, seed=2)
    for name in base:
        kept = survivors(merged[name], base[name])
        assert 0 < int(kept.sum()) < kept.numel()
        expected = f64(base[name]) + 0.8 * (f64(models[0][name]) - f64(base[name]))
        np.testing.assert_allclose(f64(merged[name])[kept.numpy()], expected[kept.numpy()], rtol=1e-6, atol=1e-6)


def test_dare_ties_combination_without_drops():
    # column 0: γ = + (mass 2) sums 1 + 3; column 1: γ = − sums −4 − 2; column 2: exact tie elects +
    base, models = ties_inputs([[1.0, -4.0, 2.0], [3.0, 1.0, -2.0], [-2.0, -2.0, 0.0]])
    merged = merge("dare", models, base=base, drop_rate=0.0, combine="ties", scaling=0.5)
    assert_matches(merged[UP.format(0)], 0.5 + 0.5 * np.array([4.0, -6.0, 2.0]))


def test_dare_ties_combination_of_the_random_sparse_task_vectors():
    base, models = dare_inputs()
    p, scaling, seed = 0.5, 0.7, 4
    merged = merge("dare", models, base=base, drop_rate=p, combine="ties", scaling=scaling, seed=seed)
    # The masks depend only on (seed, tensor name, model index): read model i's mask off a linear DARE in which
    # every other model equals the base.
    masks = []
    for i in range(len(models)):
        alone = [models[j] if j == i else base for j in range(len(models))]
        revealed = merge("dare", alone, base=base, drop_rate=p, rescale=False, scaling=1.0, seed=seed)
        masks.append({name: survivors(revealed[name], base[name]).numpy() for name in base})
    for name in base:
        sparse = np.stack([masks[i][name] * (f64(m[name]) - f64(base[name])) / (1 - p) for i, m in enumerate(models)])
        gamma = np.sign(sparse.sum(0))
        gamma[gamma == 0] = 1.0
        combined = (sparse * (np.sign(sparse) == gamma)).sum(0)
        assert_matches(merged[name], f64(base[name]) + scaling * combined, atol=1e-5, name=name)
