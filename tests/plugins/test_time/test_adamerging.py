"""AdaMerging: θ^g = θ_0^g + Σ_k λ_k^g τ_k^g with λ learned by entropy minimisation, checked by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import HeadPool, model_set, task_arithmetic

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.method.tensor_names import layer_index
from nbmerge_plugins.test_time._test_time import entropy
from nbmerge_plugins.test_time.adamerging import COEFFICIENTS, AdaMergedModule, groups

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert_pool():
    base, fine_tuned = model_set("bert")
    return base, fine_tuned, HeadPool(base)


def adamerge(bert_pool, **params):
    base, fine_tuned, pool = bert_pool
    return nbmerge.merge("adamerging", fine_tuned, base=base, pool=pool, progress=False, **params)


def states(bert_pool):
    base, fine_tuned, _ = bert_pool
    return base.state_dict(), [m.state_dict() for m in fine_tuned.values()]


def test_without_steps_it_is_task_arithmetic_with_init_lambda(bert_pool):
    result = adamerge(bert_pool, steps=0, init_lambda=0.4)
    base, models = states(bert_pool)
    expected = task_arithmetic(base, models, 0.4, [1.0] * len(models))
    merged = result.module.state_dict()
    for name, value in expected.items():
        assert torch.allclose(merged[name], value, atol=1e-6), name


@pytest.mark.parametrize("granularity", ["task", "layer", "tensor"])
def test_the_merge_is_the_task_vectors_weighted_by_the_learned_coefficients(bert_pool, granularity):
    result = adamerge(bert_pool, steps=4, lr=0.05, granularity=granularity)
    coefficients = result.trained[COEFFICIENTS]
    base, models = states(bert_pool)
    changed = [name for name in base if any(not torch.equal(m[name], base[name]) for m in models)]
    layers = sorted({layer_index(name) for name in changed} - {None})
    expected_groups = {"task": 1, "layer": len(layers) + 1, "tensor": len(changed)}[granularity]
    assert coefficients.shape == (len(models), expected_groups)
    assert not torch.allclose(coefficients, torch.full_like(coefficients, 0.3))  # training moved them
    group_of = groups(changed, granularity)
    merged = result.module.state_dict()
    for name in base:
        if name not in changed:
            assert torch.equal(merged[name], base[name]), name
            continue
        column = coefficients[:, group_of[name]]
        expected = base[name] + sum(float(w) * (m[name] - base[name]) for w, m in zip(column, models))
        assert torch.allclose(merged[name], expected, atol=1e-5), name


def test_layer_groups_follow_the_layer_index():
    names = ["embeddings.word.weight", "encoder.layer.0.a.weight", "encoder.layer.0.b.bias",
             "encoder.layer.1.a.weight", "pooler.weight"]
    assert groups(names, "layer") == {"encoder.layer.0.a.weight": 0, "encoder.layer.0.b.bias": 0,
                                      "encoder.layer.1.a.weight": 1, "embeddings.word.weight": 2, "pooler.weight": 2}
    assert groups(names, "task") == dict.fromkeys(names, 0)
    assert list(groups(names, "tensor").values()) == [0, 1, 2, 3, 4]


def test_adaptation_lowers_the_entropy_and_leaves_the_inputs_alone(bert_pool):
    base, fine_tuned, pool = bert_pool
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in fine_tuned.items()}
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    result = adamerge(bert_pool, steps=30, lr=0.05, granularity="layer")
    assert result.history.loss[-1] < result.history.loss[0]
    initial = adamerge(bert_pool, steps=0)
    with torch.no_grad():  # the summed entropy of the adapted merge on the tasks' inputs, against the start's
        total = [sum(entropy(t.logits(m.module, t.inputs("test"))).item() for t in pool.tasks)
                 for m in (result, initial)]
    assert total[0] < total[1]
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())
    for name, model in fine_tuned.items():
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())


def test_clamp_keeps_every_coefficient_in_the_unit_interval(bert_pool):
    result = adamerge(bert_pool, steps=5, lr=2.0, clamp=True, init_lambda=0.9)
    coefficients = result.trained[COEFFICIENTS]
    assert coefficients.min() >= 0.0 and coefficients.max() <= 1.0
    assert ((coefficients == 0.0) | (coefficients == 1.0)).any()  # lr 2 pushed some to a bound


def test_saved_coefficients_rebuild_the_same_merge_without_training(bert_pool, tmp_path):
    base, fine_tuned, pool = bert_pool
    result = adamerge(bert_pool, steps=3, lr=0.05)
    nbmerge.save_trained(result, tmp_path / "coefficients.safetensors")
    again = nbmerge.load_trained(tmp_path / "coefficients.safetensors", fine_tuned, base=base, pool=pool,
                                 progress=False)
    assert again.history is None
    for name, value in result.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[name], value), name
    nbmerge.export_module(result, tmp_path / "whole.safetensors")
    exported = nbmerge.load_exported(tmp_path / "whole.safetensors", base, pool)
    for name, value in result.module.state_dict().items():
        assert torch.equal(exported.module.state_dict()[name], value), name


def test_a_model_of_another_architecture_is_refused_by_name(bert_pool):
    base, fine_tuned, _ = bert_pool
    other = dict(fine_tuned)
    wrong = model_set("llama")[1]["task0"]
    other["task1"] = wrong
    with pytest.raises(ModelInputError, match="adamerging: fine-tuned model 'task1'"):
        AdaMergedModule(base, other, "task", 0.3)


def test_a_model_holding_nan_is_refused_by_name_unless_allowed(bert_pool):
    import copy

    from nbmerge.errors import NonFiniteError

    base, fine_tuned, pool = bert_pool
    task = next(iter(fine_tuned))
    spoiled = copy.deepcopy(fine_tuned[task])
    name, parameter = next((n, p) for n, p in spoiled.named_parameters() if n.endswith("query.weight"))
    with torch.no_grad():
        parameter.view(-1)[3] = float("nan")
    models = {**fine_tuned, task: spoiled}
    with pytest.raises(NonFiniteError, match=rf"adamerging: model '{task}' tensor '{name}' holds NaN or Inf"):
        nbmerge.merge("adamerging", models, base=base, pool=pool, progress=False, steps=1)
    allowed = nbmerge.merge("adamerging", models, base=base, pool=pool, progress=False, steps=0,
                            allow_nonfinite=True)
    assert allowed.module is not None


def test_only_parameters_are_merged_buffers_stay_the_base_s():
    """FusionBench merges parameters only: BatchNorm running statistics that differ between the fine-tuned models
    stay the pretrained model's, while the BatchNorm affine parameters follow θ_0 + λ Σ τ."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    models = {}
    for name in "ab":
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model[1].running_mean.add_(torch.randn(3))
            model[1].running_var.mul_(2.0)
        models[name] = model.eval()
    merged = AdaMergedModule(base, models, "task", 0.3).merged_module().state_dict()
    reference = base.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(merged[key], reference[key]), key
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        expected = reference[key] + 0.3 * sum(m.state_dict()[key] - reference[key] for m in models.values())
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6)
