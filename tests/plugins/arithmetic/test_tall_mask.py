"""tall_mask (consensus merging with TALL masks) against its formula in float64 NumPy."""

import numpy as np
import pytest
import torch
from method_cases import decoder_state, f64, fine_tuned, merge

import nbmerge


def tall_reference(base, models, lambdas, *, k=2, scaling=0.3, task=-1, base_weights=False) -> np.ndarray:
    """m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t| (|θ_0 − τ_t| for FusionBench's class); θ_0 + α [Σ m_t ≥ k] τ_MTL, or m_t."""
    theta0 = f64(base)
    tau = np.stack([f64(m) - theta0 for m in models])
    multi = tau.sum(0)
    importance = np.abs(theta0 - tau) if base_weights else np.abs(tau)
    lam = np.reshape(lambdas, (-1,) + (1,) * (tau.ndim - 1))
    masks = importance >= lam * np.abs(multi - tau)
    kept = masks[task] if task >= 0 else masks.sum(0) >= k
    return theta0 + scaling * multi * kept


def inputs():
    base = {k: v.double() for k, v in decoder_state(seed=0).items()}
    return base, [{k: v.double() for k, v in fine_tuned(base, seed=s).items()} for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("params, expected_args", [
    ({}, {"lambdas": [0.6] * 4}),
    ({"min_tasks": 1, "scaling": 1.0}, {"lambdas": [0.6] * 4, "k": 1, "scaling": 1.0}),
    ({"min_tasks": 3, "tall_mask_lambda": [0.2, 0.4, 0.6, 0.8]}, {"lambdas": [0.2, 0.4, 0.6, 0.8], "k": 3}),
    ({"task": 2, "scaling": 1.0}, {"lambdas": [0.6] * 4, "task": 2, "scaling": 1.0}),
    ({"task": 0, "mask_reference": "base_weights"}, {"lambdas": [0.6] * 4, "task": 0, "base_weights": True}),
])
def test_tall_mask_is_its_formula(params, expected_args):
    base, models = inputs()
    merged = merge("tall_mask", models, base=base, **params)
    for name in base:
        expected = tall_reference(base[name], [m[name] for m in models], **expected_args)
        np.testing.assert_allclose(f64(merged[name]), expected, rtol=0, atol=1e-14, err_msg=name)


def test_consensus_with_k_0_is_task_arithmetic_and_with_k_above_the_task_count_is_the_base():
    base, models = inputs()
    everything = merge("tall_mask", models, base=base, min_tasks=0)
    task_arithmetic = merge("task_arithmetic", models, base=base, scaling=0.3)
    nothing = merge("tall_mask", models, base=base, min_tasks=5)
    for name in base:
        np.testing.assert_allclose(f64(everything[name]), f64(task_arithmetic[name]), rtol=0, atol=1e-14)
        assert torch.equal(nothing[name], base[name])


def test_an_entry_one_task_dominates_is_dropped_by_consensus_and_kept_in_that_task_s_mask():
    base = {"w": torch.zeros(2)}
    # entry 0: both tasks move it alike (both masks keep it); entry 1: only task 0 moves it (task 1's mask drops it)
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 0.0])}]
    assert merge("tall_mask", models, base=base, scaling=1.0)["w"].tolist() == [2.0, 0.0]
    assert merge("tall_mask", models, base=base, scaling=1.0, task=0)["w"].tolist() == [2.0, 2.0]


def test_task_index_beyond_the_models_is_refused_before_reading():
    base, models = inputs()
    with pytest.raises(nbmerge.ParameterError, match="'task' is 4, but there are 4 models"):
        merge("tall_mask", models, base=base, task=4)
