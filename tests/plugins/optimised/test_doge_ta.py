"""doge_ta against independent float64 computations: the top-k masks over all treated tensors by sorting, and the
optimisation written out as FusionBench writes it (autograd on its loss, the projector P = U_k U_kᵀ applied to
each gradient, torch.optim.Adam)."""

import numpy as np
import pytest
import torch
from method_cases import BIAS, EMBED, HEAD, LAYER_NORM, UP, Q, decoder_state, f64, fine_tuned, merge


def inputs(n: int = 3, hidden: int = 6):
    base = {k: v.double() for k, v in decoder_state(seed=0, hidden=hidden, vocab=10).items()}
    return base, [{k: v.double() for k, v in fine_tuned(base, seed=s, scale=0.01).items()} for s in range(1, n + 1)]


def treated_names(base: dict, tensors: str) -> list[str]:
    return [n for n, v in base.items() if v.ndim == 2 and (tensors == "all" or n not in (EMBED, HEAD))]


def topk_masks(base, models, names, density) -> dict[str, list[np.ndarray]]:
    """Per treated tensor and task: |τ_t| ≥ the k-th largest |τ_t| over all treated tensors, k = int(density · N)."""
    masks = {name: [] for name in names}
    for model in models:
        flat = np.concatenate([np.abs(f64(model[n] - base[n])).ravel() for n in names])
        threshold = np.sort(flat)[::-1][int(density * flat.size) - 1]
        for name in names:
            masks[name].append(np.abs(f64(model[name] - base[name])) >= threshold)
    return masks


def correction_reference(task_vectors, lambdas, subspace, iterations, lr) -> torch.Tensor:
    """FusionBench's optimize_delta for one tensor, in float64."""
    rank = min(task_vectors[0].shape)
    per_task = rank // len(task_vectors)
    side_by_side = torch.zeros(task_vectors[0].shape[0], rank, dtype=torch.float64)
    for t, tv in enumerate(task_vectors):
        side_by_side[:, t * per_task:(t + 1) * per_task] = torch.linalg.svd(tv, full_matrices=False)[0][:, :per_task]
    basis = torch.linalg.svd(side_by_side, full_matrices=False)[0][:, :rank // subspace]
    projector = basis @ basis.T
    delta = torch.nn.Parameter(torch.zeros_like(task_vectors[0]))
    optimizer = torch.optim.Adam([delta], lr=lr)
    weighted = sum(l * tv for l, tv in zip(lambdas, task_vectors))
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = sum((tv * (tv - weighted - sum(lambdas) * delta)).sum(1).square().sum() for tv in task_vectors)
        loss.backward()
        delta.grad -= projector @ delta.grad
        optimizer.step()
    return delta.detach()


def doge_reference(base, models, *, density=0.3, subspace=6, lambda_scale=0.07, iterations=400, lr=1e-4,
                   tensors="layers", subspace_of=None) -> dict[str, np.ndarray]:
    names = treated_names(base, tensors)
    masks = topk_masks(base, models, names, density)
    result = {name: f64(value) for name, value in base.items()}
    for name in names:
        task_vectors = [m[name] - base[name] for m in models]
        lambdas = [lambda_scale / tv.norm() for tv in task_vectors]
        delta = correction_reference(task_vectors, lambdas, subspace, iterations, lr) if iterations else 0.0
        result[name] = f64(base[name]) + sum(float(l) * f64(tv + delta) * m
                                             for l, tv, m in zip(lambdas, task_vectors, masks[name]))
    return result


@pytest.mark.parametrize("params", [
    {"iterations": 0},
    {"iterations": 0, "density": 0.55, "tensors": "all", "lambda_scale": 0.5},
    {"iterations": 30, "lr": 1e-3},
    {"iterations": 30, "lr": 1e-3, "subspace": 2, "tensors": "all"},
], ids=["no-steps", "no-steps-all", "steps", "steps-all"])
def test_doge_ta_is_its_formula(params):
    base, models = inputs(hidden=12)
    merged = merge("doge_ta", models, base=base, **params)
    expected = doge_reference(base, models, **params)
    for name in base:
        np.testing.assert_allclose(f64(merged[name]), expected[name], rtol=0, atol=1e-12, err_msg=name)
    for untouched in (BIAS.format(0), LAYER_NORM.format(1)) + ((EMBED, HEAD) if "tensors" not in params else ()):
        assert torch.equal(merged[untouched], base[untouched])
    assert not torch.equal(merged[UP.format(1)], base[UP.format(1)])


def test_the_top_k_is_taken_over_all_treated_tensors_together():
    """One tensor's task vector is 100 times larger than the other's: the shared threshold keeps it alone."""
    large, small = Q.format(0), UP.format(0)
    base = {large: torch.zeros(4, 5, dtype=torch.float64), small: torch.zeros(8, 5, dtype=torch.float64)}
    model = {large: 100 + torch.arange(20.0, dtype=torch.float64).reshape(4, 5),
             small: 1 + torch.arange(40.0, dtype=torch.float64).reshape(8, 5)}
    merged = merge("doge_ta", [model], base=base, density=20 / 60, iterations=0, lambda_scale=1.0)
    assert torch.count_nonzero(merged[large]) == 20 and torch.count_nonzero(merged[small]) == 0


def test_a_model_that_left_a_tensor_unchanged_gets_weight_zero():
    """FusionBench's λ_t = λ / ‖τ_t‖ is infinite for a zero task vector (NaN); nbmerge gives it weight 0."""
    base, models = inputs(2)
    unchanged = {k: v.clone() for k, v in base.items()}
    merged = merge("doge_ta", [*models, unchanged], base=base, iterations=5)
    assert all(torch.isfinite(v).all() for v in merged.values())
