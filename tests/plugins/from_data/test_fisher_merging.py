"""Fisher merging on a linear softmax classifier, whose log-likelihood gradients are known in closed form:
∇_W log p_c(x) = (e_c − p(x)) xᵀ and ∇_b log p_c(x) = e_c − p(x). Both estimators and the weighted average are
written out in float64 NumPy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import nbmerge
from nbmerge_plugins.from_data._data_pass import chosen_inputs

torch.set_num_threads(1)
EPS = 1e-6


class RowTask:
    def __init__(self, name: str, seed: int, rows: int = 8):
        self.name, self.classes = name, ["a", "b", "c"]
        self.rows = torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def inputs(self, split):
        return list(self.rows)

    def logits(self, model, inputs):
        return model(torch.stack(list(inputs)))


class RowPool:
    name = "rows"

    def __init__(self):
        self.tasks = [RowTask(f"t{i}", 70 + i) for i in range(3)]

    def load_encoder(self, model):
        return model

    def task(self, name):
        return next(task for task in self.tasks if task.name == name)


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # confident predictions: the Fisher differs much between models
    return layer


@pytest.fixture(scope="module")
def setup():
    return linear(0), {f"t{i}": linear(20 + i) for i in range(3)}, RowPool()


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_fisher(w, b, x):
    """(1/N) Σ_x Σ_c p_c ((e_c − p) xᵀ)², and the same for the bias."""
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for row in x:
        p = softmax(w @ row + b)
        for c in range(len(p)):
            g = np.eye(len(p))[c] - p
            fw += p[c] * np.outer(g, row) ** 2
            fb += p[c] * g ** 2
    return fw / len(x), fb / len(x)


def fusionbench_fisher(w, b, x, batch):
    """(1/N) Σ_batches (Σ_{x∈batch} Σ_c √p_c (e_c − p) xᵀ)²."""
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for start in range(0, len(x), batch):
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for row in x[start:start + batch]:
            p = softmax(w @ row + b)
            g = sum(np.sqrt(p[c]) * (np.eye(len(p))[c] - p) for c in range(len(p)))
            gw += np.outer(g, row)
            gb += g
        fw, fb = fw + gw ** 2, fb + gb ** 2
    return fw / len(x), fb / len(x)


def weighted(values, fishers, normalize):
    norms = [np.sqrt(sum((f ** 2).sum() for f in fisher)) for fisher in fishers]
    k = len(values)
    if normalize:
        inverse = [1 / (n + EPS) for n in norms]
        c = [i / sum(inverse) / k for i in inverse]
    else:
        c = [1 / k] * k
    return [sum(ci * (f[j] + EPS) * v[j] for ci, f, v in zip(c, fishers, values))
            / sum(ci * (f[j] + EPS) for ci, f in zip(c, fishers)) for j in range(2)]


@pytest.mark.parametrize("estimate, normalize", [("expected", True), ("expected", False), ("fusionbench", True)])
def test_fisher_merging_is_the_fisher_weighted_average(setup, estimate, normalize):
    base, models, pool = setup
    result = nbmerge.merge("fisher_merging", models, base=base, pool=pool, progress=False, num_fisher_examples=6,
                           batch_size=3, estimate=estimate, normalize_fisher_weight=normalize, seed=4)
    values, fishers = [], []
    for index, (name, model) in enumerate(models.items()):
        w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
        x = torch.stack(chosen_inputs(pool.task(name).inputs("test"), 6, 4000 + index, "t", name)).numpy()
        fishers.append(expected_fisher(w, b, x) if estimate == "expected" else fusionbench_fisher(w, b, x, 3))
        values.append((w, b))
    weight, bias = weighted(values, fishers, normalize)
    merged = result.module.state_dict()
    np.testing.assert_allclose(merged["weight"].numpy(), weight, rtol=1e-10)
    np.testing.assert_allclose(merged["bias"].numpy(), bias, rtol=1e-10)
    assert not np.allclose(weight, np.mean([v[0] for v in values], 0), atol=1e-3)  # the weighting matters here


def test_the_estimators_differ_and_the_inputs_stay_untouched(setup):
    base, models, pool = setup
    before = {name: copy.deepcopy(m.state_dict()) for name, m in models.items()}
    merged = [nbmerge.merge("fisher_merging", models, base=base, pool=pool, progress=False, estimate=estimate,
                            batch_size=4).module.state_dict()["weight"] for estimate in ("expected", "fusionbench")]
    assert not torch.allclose(merged[0], merged[1], atol=1e-4)
    for name, model in models.items():
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())


def test_fisher_merging_saved_merge_reloads(setup, tmp_path):
    base, models, pool = setup
    result = nbmerge.merge("fisher_merging", models, base=base, pool=pool, progress=False,
                           out=tmp_path / "fisher.safetensors")
    again = nbmerge.load_trained(tmp_path / "fisher.safetensors", models, base=base, pool=pool, progress=False)
    assert all(torch.equal(again.module.state_dict()[k], v) for k, v in result.module.state_dict().items())
    assert result.recipe["method"] == "fisher_merging" and result.recipe["params"]["estimate"] == "expected"
