"""wudi against independent float64 computations: the loss's autograd gradient, torch.optim.Adam, and the
optimisation written out as FusionBench writes it (autograd on Σ_t ‖(τ − τ_t) τ_tᵀ‖² / ‖τ_t‖², Adam lr 1e-5)."""

import numpy as np
import pytest
import torch
from method_cases import EMBED, HEAD, decoder_state, f64, fine_tuned, merge


def inputs(n: int = 3):
    base = {k: v.double() for k, v in decoder_state(seed=0, hidden=6, vocab=10).items()}
    return base, [{k: v.double() for k, v in fine_tuned(base, seed=s, scale=0.01).items()} for s in range(1, n + 1)]


def wudi_loss(merged: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
    return sum(((merged - t) @ t.T).square().sum() / t.square().sum() for t in task_vectors)


def wudi_reference(base: torch.Tensor, models: list[torch.Tensor], iterations: int, lr: float = 1e-5) -> torch.Tensor:
    """FusionBench's loop in float64: autograd on the loss, torch.optim.Adam, from Σ τ_t."""
    task_vectors = [m - base for m in models]
    merged = torch.nn.Parameter(sum(task_vectors))
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(iterations):
        optimizer.zero_grad()
        wudi_loss(merged, task_vectors).backward()
        optimizer.step()
    return base + merged.detach()


def test_the_closed_form_gradient_is_the_loss_s_gradient():
    from nbmerge_plugins.optimised.wudi import interference_terms

    base, models = inputs(4)
    name = "model.layers.1.mlp.up_proj.weight"
    total, gram, target = interference_terms(base[name], [m[name] for m in models])
    point = torch.nn.Parameter(total + 0.01 * torch.randn(total.shape, dtype=torch.float64,
                                                          generator=torch.Generator().manual_seed(3)))
    wudi_loss(point, [m[name] - base[name] for m in models]).backward()
    np.testing.assert_allclose(f64(2 * (point.detach() @ gram - target)), f64(point.grad), rtol=1e-10, atol=1e-14)


def test_the_adam_steps_are_torch_optim_adam():
    from nbmerge_plugins.optimised._adam import Adam

    generator = torch.Generator().manual_seed(5)
    start = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    gradients = [torch.randn(7, 3, dtype=torch.float64, generator=generator) * 10 ** -i for i in range(6)]
    ours, theirs = start.clone(), torch.nn.Parameter(start.clone())
    adam, optimizer = Adam(ours, lr=0.01), torch.optim.Adam([theirs], lr=0.01)
    for gradient in gradients:
        adam.step(gradient)
        theirs.grad = gradient.clone()
        optimizer.step()
    assert torch.equal(ours, theirs.detach())


@pytest.mark.parametrize("matrices", ["all", "linear"])
def test_wudi_optimises_the_matrices_and_averages_the_rest(matrices):
    base, models = inputs()
    merged = merge("wudi", models, base=base, iterations=30, matrices=matrices)
    for name, value in base.items():
        tensors = [m[name] for m in models]
        if value.ndim == 2 and not (matrices == "linear" and name == EMBED):
            expected = wudi_reference(value, tensors, iterations=30)
        else:
            expected = value + sum(t - value for t in tensors) / len(tensors)
        np.testing.assert_allclose(f64(merged[name]), f64(expected), rtol=0, atol=1e-13, err_msg=name)
    assert merged[HEAD].dtype == torch.float64


def test_the_optimisation_lowers_the_interference_loss():
    base, models = inputs()
    task_vectors = [m[HEAD] - base[HEAD] for m in models]
    start = merge("wudi", models, base=base, iterations=0)[HEAD] - base[HEAD]
    optimised = merge("wudi", models, base=base, iterations=200, lr=1e-4)[HEAD] - base[HEAD]
    np.testing.assert_allclose(f64(start), f64(sum(task_vectors)), rtol=0, atol=1e-15)
    assert wudi_loss(optimised, task_vectors) < 0.5 * wudi_loss(start, task_vectors)


def test_a_model_that_left_a_tensor_unchanged_adds_no_term():
    """FusionBench divides 0 by 0 for a zero task vector (NaN); nbmerge leaves its term out."""
    base, models = inputs(2)
    unchanged = {k: v.clone() for k, v in base.items()}
    with_unchanged = merge("wudi", [*models, unchanged], base=base, iterations=20)
    without = merge("wudi", models, base=base, iterations=20)
    for name, value in base.items():
        assert torch.isfinite(with_unchanged[name]).all()
        if value.ndim == 2:
            np.testing.assert_allclose(f64(with_unchanged[name]), f64(without[name]), rtol=0, atol=1e-15)
