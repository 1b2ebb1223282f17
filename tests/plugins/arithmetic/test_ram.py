"""ram and ramplus_tl against their formulas written out in float64 NumPy, on task vectors that change overlapping
and disjoint entries (where RAM differs from a plain average)."""

import numpy as np
import pytest
import torch
from method_cases import f64, merge, randn


def sparse_models(seed: int, n: int = 3):
    """A base and n fine-tunes each changing a random ~40% of the entries of every tensor."""
    base = {"w": randn(64, 48, seed=seed), "v": randn(48, seed=seed + 1)}
    models = []
    for i in range(n):
        generator = torch.Generator().manual_seed(seed + 10 + i)
        models.append({name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator)
                       * (torch.rand(tensor.shape, generator=generator) < 0.4) for name, tensor in base.items()})
    return base, models


def ram_reference(base, models, epsilon=1e-5, r=None, alpha=None) -> np.ndarray:
    theta0 = f64(base).reshape(-1)
    tau = np.stack([f64(m).reshape(-1) - theta0 for m in models])
    mask = np.abs(tau) > epsilon
    count = mask.sum(0)
    if r is None:
        merged = (tau * mask).sum(0) / np.maximum(count, 1)
    else:
        unique, shared = count == 1, count > 1
        rho = (mask & shared).sum(1) / np.maximum((mask & unique).sum(1), epsilon)
        boost = 1 + r * np.clip(rho, 0, alpha)
        merged = ((tau * mask) * (unique * boost[:, None] + shared / np.maximum(count, 1))).sum(0)
    return (theta0 + merged).reshape(tuple(base.shape))


@pytest.mark.parametrize("method, params", [("ram", {}), ("ram", {"epsilon": 0.05}),
                                            ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 1.0})])
def test_ram_is_its_formula(method, params):
    base, models = sparse_models(seed=3)
    merged = merge(method, models, base=base, **params)
    for name in base:
        expected = ram_reference(base[name], [m[name] for m in models], params.get("epsilon", 1e-5),
                                 *((params.get("r", 0.1), params.get("alpha", 0.2)) if method == "ramplus_tl"
                                   else (None, None)))
        np.testing.assert_allclose(f64(merged[name]), expected, atol=1e-6, err_msg=name)


def test_an_entry_only_one_model_changed_keeps_that_change_whole():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, 2.0, 0.0, 0.0])}, {"w": torch.tensor([3.0, 0.0, 0.0, 4.0])}]
    assert torch.equal(merge("ram", models, base=base)["w"], torch.tensor([2.0, 2.0, 0.0, 4.0]))
    # RAM+: model 0 has one shared and one unique entry (ρ = 1, clamped to α = 0.2): its unique entry × 1.02
    boosted = merge("ramplus_tl", models, base=base)["w"]
    assert torch.allclose(boosted, torch.tensor([2.0, 2.0 * 1.02, 0.0, 4.0 * 1.02]))
