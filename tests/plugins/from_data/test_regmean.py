"""RegMean and RegMean++: the closed form Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ checked in float64 NumPy on models whose
linear inputs are known, and what a user relies on around it (inputs untouched, reload, errors)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import HeadPool, model_set
from torch import nn

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError

torch.set_num_threads(1)


class StackModel(nn.Module):
    """x → layers.0 → tanh → layers.1: a two-layer stack of linears (float64)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 3)]).double()

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


class RowTask:
    """Inputs are rows x ∈ R⁴; logits = model(x)."""

    def __init__(self, name: str, seed: int, rows: int = 9):
        self.name, self.classes = name, ["a", "b", "c"]
        self.rows = torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.rows[:, 0] *= 3.0  # features of different scales: the Gram matrices are far from each other

    def inputs(self, split):
        return list(self.rows)

    def logits(self, model, inputs):
        return model(torch.stack(list(inputs)))


class RowPool:
    name = "rows"

    def __init__(self, count: int = 3):
        self.tasks = [RowTask(f"t{i}", 50 + i) for i in range(count)]

    def load_encoder(self, model):
        return model

    def task(self, name):
        return next(task for task in self.tasks if task.name == name)


@pytest.fixture(scope="module")
def rows():
    base = StackModel(0)
    models = {f"t{i}": StackModel(10 + i) for i in range(3)}
    return base, models, RowPool()


def numpy_state(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().astype(np.float64) for name, tensor in model.state_dict().items()}


def closed_form(weights, inputs, ratio):
    """Wᵀ = (Σ G̃)⁻¹ Σ G̃ W_iᵀ with G = XᵀX/n and G̃ = α G + (1 − α) diag(G), in NumPy."""
    def scaled(x):
        gram = x.T @ x / x.shape[0]
        return ratio * gram + (1 - ratio) * np.diag(np.diag(gram))

    grams = [scaled(x) for x in inputs]
    return np.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T


def run(method, rows, **params):
    base, models, pool = rows
    return nbmerge.merge(method, models, base=base, pool=pool, progress=False, batch_size=4, **params)


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_regmean_is_the_closed_form_on_each_models_own_linear_inputs(rows, ratio):
    base, models, pool = rows
    result = run("regmean", rows, reduce_non_diagonal_ratio=ratio)
    states = [numpy_state(m) for m in models.values()]
    x = [pool.task(name).rows.numpy() for name in models]
    hidden = [np.tanh(xi @ s["layers.0.weight"].T + s["layers.0.bias"]) for xi, s in zip(x, states)]
    merged = result.module.state_dict()
    assert merged["layers.0.weight"].dtype == torch.float64
    np.testing.assert_allclose(merged["layers.0.weight"].numpy(),
                               closed_form([s["layers.0.weight"] for s in states], x, ratio), atol=1e-12)
    np.testing.assert_allclose(merged["layers.1.weight"].numpy(),
                               closed_form([s["layers.1.weight"] for s in states], hidden, ratio), atol=1e-12)
    for bias in ("layers.0.bias", "layers.1.bias"):
        np.testing.assert_allclose(merged[bias].numpy(), np.mean([s[bias] for s in states], 0), atol=1e-15)


def test_exact_regmean_minimises_the_summed_squared_output_difference(rows):
    """α = 1: the merged layer-0 weight is a stationary point of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²."""
    base, models, pool = rows
    merged = run("regmean", rows, reduce_non_diagonal_ratio=1.0).module.state_dict()["layers.0.weight"]
    weight = merged.clone().requires_grad_(True)
    loss = sum(((pool.task(n).rows @ weight.T - pool.task(n).rows @ m.layers[0].weight.detach().T) ** 2).sum()
               for n, m in models.items())
    loss.backward()
    assert weight.grad.abs().max() < 1e-10


def test_regmean_plusplus_fits_each_layer_to_the_merged_layers_outputs(rows):
    base, models, pool = rows
    ratio = 0.5
    result = run("regmean_plusplus", rows, reduce_non_diagonal_ratio=ratio)
    states = [numpy_state(m) for m in models.values()]
    x = [pool.task(name).rows.numpy() for name in models]
    first = closed_form([s["layers.0.weight"] for s in states], x, ratio)
    first_bias = np.mean([s["layers.0.bias"] for s in states], 0)
    hidden = [np.tanh(xi @ first.T + first_bias) for xi in x]  # the merged layer 0's outputs, for every task
    merged = result.module.state_dict()
    np.testing.assert_allclose(merged["layers.0.weight"].numpy(), first, atol=1e-12)
    np.testing.assert_allclose(merged["layers.1.weight"].numpy(),
                               closed_form([s["layers.1.weight"] for s in states], hidden, ratio), atol=1e-12)
    plain = run("regmean", rows, reduce_non_diagonal_ratio=ratio).module.state_dict()
    assert not torch.allclose(plain["layers.1.weight"], merged["layers.1.weight"], atol=1e-6)
    assert result.recipe["build"]["layers"] == 2


def test_only_the_drawn_examples_count(rows):
    """num_regmean_examples=4 of 9 rows: the Gram matrices of the 4 rows the seed draws, whatever the batch size."""
    base, models, pool = rows
    from nbmerge_plugins.from_data._data_pass import chosen_inputs

    result = run("regmean", rows, num_regmean_examples=4, reduce_non_diagonal_ratio=1.0, seed=5)
    x = [torch.stack(chosen_inputs(pool.task(n).inputs("test"), 4, 5000 + i, "t", n)).numpy()
         for i, n in enumerate(models)]
    expected = closed_form([numpy_state(m)["layers.0.weight"] for m in models.values()], x, 1.0)
    np.testing.assert_allclose(result.module.state_dict()["layers.0.weight"].numpy(), expected, atol=1e-12)
    again = nbmerge.merge("regmean", models, base=base, pool=pool, progress=False, batch_size=3,
                          num_regmean_examples=4, reduce_non_diagonal_ratio=1.0, seed=5)
    assert torch.allclose(again.module.state_dict()["layers.0.weight"], result.module.state_dict()["layers.0.weight"],
                          atol=1e-12)
    assert result.recipe["build"]["examples"] == dict.fromkeys(models, 4)


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_inputs_are_untouched_and_the_saved_merge_reloads_without_data(method, tmp_path):
    base, fine_tuned = model_set("bert")
    pool = HeadPool(base)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in fine_tuned.items()}
    result = nbmerge.merge(method, fine_tuned, base=base, pool=pool, progress=False, num_regmean_examples=8,
                           out=tmp_path / "merged.safetensors")
    for name, model in fine_tuned.items():
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
        assert model.training is False
    again = nbmerge.load_trained(tmp_path / "merged.safetensors", fine_tuned, base=base, pool=pool, progress=False)
    for name, value in result.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[name], value), name


def test_regmean_needs_a_pool_and_models_of_the_bases_architecture(rows):
    base, models, pool = rows
    with pytest.raises(ParameterError, match="regmean: builds a model from each task.s inputs .* needs a task pool"):
        nbmerge.merge("regmean", models, base=base, progress=False)
    other = dict(models, t1=nn.Sequential(nn.Linear(4, 3)).double())
    with pytest.raises(ModelInputError, match="regmean: fine-tuned model 't1' lacks"):
        nbmerge.merge("regmean", other, base=base, pool=pool, progress=False)


def test_regmean_plusplus_refuses_a_model_without_a_layer_stack():
    base = nn.Linear(4, 3).double()
    models = {f"t{i}": nn.Linear(4, 3).double() for i in range(2)}
    with pytest.raises(ModelInputError, match="regmean_plusplus: Linear has no transformer layer stack"):
        nbmerge.merge("regmean_plusplus", models, base=base, pool=RowPool(2), progress=False)


def test_an_input_feature_no_model_sees_gives_the_least_norm_solution(rows):
    """Feature 3 is zero in every task's inputs, so Σ G̃ is singular: the merged weight is the least-squares
    solution of least norm, 0 on that feature and the closed form on the others."""
    base, models, _ = rows
    pool = RowPool()
    for task in pool.tasks:
        task.rows[:, 3] = 0.0
    merged = nbmerge.merge("regmean", models, base=base, pool=pool, progress=False,
                           reduce_non_diagonal_ratio=0.7).module.state_dict()["layers.0.weight"].numpy()
    assert np.isfinite(merged).all() and np.all(merged[:, 3] == 0.0)
    x = [task.rows.numpy()[:, :3] for task in pool.tasks]
    weights = [numpy_state(m)["layers.0.weight"][:, :3] for m in models.values()]
    np.testing.assert_allclose(merged[:, :3], closed_form(weights, x, 0.7), atol=1e-10)
