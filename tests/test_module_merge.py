"""Module-building methods through the core: merge(..., pool=), trained state saved and rebuilt, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import HeadPool, model_set

import nbmerge
from nbmerge.cli import main as cli_main
from nbmerge.errors import ModelInputError, OutputExistsError, ParameterError
from nbmerge.method.declaration import MergeMethod
from nbmerge.module_merge import fingerprint, read_trained
from nbmerge_plugins.test_time.we_moe.layers import router_parameters

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert_pool():
    base, fine_tuned = model_set("bert")
    return base, fine_tuned, HeadPool(base)


def test_merge_builds_and_adapts_the_module(bert_pool):
    base, fine_tuned, pool = bert_pool
    result = nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=4, lr=1e-2, batch_size=5,
                           progress=False)
    assert result.history.steps == 4 and result.history.loss[-1] < result.history.loss[0]
    assert set(result.trained) == set(router_parameters(result.module))
    assert result.recipe["params"]["steps"] == 4 and result.recipe["models"] == ["task0", "task1", "task2"]
    assert result.recipe["build"]["steps_done"] == 4 and result.recipe["build"]["interrupted"] is False
    assert result.recipe["fingerprints"]["models"]["task1"] == fingerprint(fine_tuned["task1"])
    assert "module=BertModel" in repr(result)


def test_saved_routers_rebuild_the_same_model_without_training(bert_pool, tmp_path):
    base, fine_tuned, pool = bert_pool
    out = tmp_path / "routers.safetensors"
    result = nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=3, lr=1e-2, out=out, progress=False)
    assert result.path == out and sorted(p.name for p in tmp_path.iterdir()) == ["routers.safetensors"]
    tensors, recipe = read_trained(out)
    assert set(tensors) == set(result.trained) and recipe["method"] == "we_moe"
    rebuilt = nbmerge.load_trained(out, fine_tuned, base=base, pool=pool, progress=False)
    assert rebuilt.history is None
    ids = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.module(input_ids=ids).last_hidden_state,
                                   result.module(input_ids=ids).last_hidden_state, atol=0, rtol=0)
    with pytest.raises(OutputExistsError):
        nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=1, out=out, progress=False)


def test_reloading_onto_other_models_names_the_one_that_differs(bert_pool, tmp_path):
    base, fine_tuned, pool = bert_pool
    out = tmp_path / "routers.safetensors"
    nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=1, out=out, progress=False)
    changed = dict(fine_tuned)
    changed["task2"] = copy.deepcopy(fine_tuned["task2"])
    with torch.no_grad():
        changed["task2"].encoder.layer[1].output.dense.weight.mul_(1.5)
    with pytest.raises(ModelInputError, match="different model 'task2'"):
        nbmerge.load_trained(out, changed, base=base, pool=pool, progress=False)
    with pytest.raises(ModelInputError, match="different base model"):
        nbmerge.load_trained(out, fine_tuned, base=changed["task2"], pool=pool, progress=False)
    with pytest.raises(ModelInputError, match=r"trained on models \['task0', 'task1', 'task2'\]"):
        nbmerge.load_trained(out, {"task0": fine_tuned["task0"], "task1": fine_tuned["task1"]}, base=base,
                             pool=pool, progress=False)


def test_models_given_as_folders_named_by_task(bert_pool, tmp_path):
    base, fine_tuned, pool = bert_pool
    folders = []
    for name, model in fine_tuned.items():
        model.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    from_folders = nbmerge.merge("we_moe", folders, base=base, pool=pool, steps=0, progress=False)
    from_modules = nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=0, progress=False)
    assert from_folders.recipe["fingerprints"] == from_modules.recipe["fingerprints"]
    for name, tensor in from_modules.trained.items():
        assert torch.equal(tensor, from_folders.trained[name])


def test_clear_errors_for_a_module_building_method(bert_pool, capsys):
    base, fine_tuned, pool = bert_pool
    with pytest.raises(ParameterError, match=r"needs a task pool: nbmerge.merge\('we_moe', \{task: model"):
        nbmerge.merge("we_moe", fine_tuned, base=base)
    with pytest.raises(SystemExit):
        cli_main(["merge", "we_moe", "a/", "b/", "--base", "c/"])
    assert "the following arguments are required: --pool" in capsys.readouterr().err
    with pytest.raises(ParameterError, match="'other' match no task of pool 'tiny-bert-heads'"):
        nbmerge.merge("we_moe", {"other": fine_tuned["task0"]}, base=base, pool=pool, progress=False)
    with pytest.raises(ParameterError, match="name each model by its task"):
        nbmerge.merge("we_moe", list(fine_tuned.values()), base=base, pool=pool, progress=False)
    with pytest.raises(ParameterError, match="unknown parameter 'step'; did you mean 'steps'"):
        nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, step=3, progress=False)
    with pytest.raises(ParameterError, match="task_arithmetic: merges tensor by tensor and uses no task pool"):
        nbmerge.merge("task_arithmetic", list(fine_tuned.values()), base=base, pool=pool, progress=False)


def test_a_method_declares_exactly_one_way_to_merge():
    with pytest.raises(ValueError, match="exactly one of merge_tensor and build_module"):
        MergeMethod(name="both", summary="", formula="", params=(), merge_tensor=lambda job: job.base,
                    build_module=lambda job: None)
    with pytest.raises(ValueError, match="exactly one of merge_tensor and build_module"):
        MergeMethod(name="neither", summary="", formula="", params=(), merge_tensor=None)
    assert nbmerge.methods()["we_moe"].describe()["builds_module"] is True
    assert nbmerge.methods()["ties"].describe()["builds_module"] is False


def test_exported_module_reloads_from_the_base_alone(bert_pool, tmp_path):
    base, fine_tuned, pool = bert_pool
    result = nbmerge.merge("we_moe", fine_tuned, base=base, pool=pool, steps=2, lr=1e-2, progress=False)
    path = nbmerge.export_module(result, tmp_path / "we_moe.safetensors")
    tensors, recipe = read_trained(path)
    assert recipe["exported"] and set(tensors) == set(result.module.state_dict())
    reloaded = nbmerge.load_exported(path, base=base, pool=pool)
    ids = torch.randint(0, 60, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(input_ids=ids).last_hidden_state,
                                   result.module(input_ids=ids).last_hidden_state, atol=0, rtol=0)
    routers_only = nbmerge.save_trained(result, tmp_path / "routers.safetensors")
    with pytest.raises(ModelInputError, match="holds only the trained tensors; rebuild it with load_trained"):
        nbmerge.load_exported(routers_only, base=base, pool=pool)
    with pytest.raises(ModelInputError, match="different base model"):
        nbmerge.load_exported(path, base=fine_tuned["task0"], pool=pool)
