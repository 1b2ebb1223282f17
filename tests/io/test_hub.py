"""Hugging Face Hub ids as model references, read from a real cache layout built here (HF_HUB_CACHE, offline):
snapshot files linked to blobs, refs/main naming the snapshot, a sharded model whose index names linked shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_state_close, load_folder

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.recipes import parse_recipe, run_recipe

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo: str, folder: Path) -> Path:
    """``folder``'s files as huggingface_hub caches them: blobs named by content hash, snapshots/<rev>/<file>
    linked to ../../blobs/<hash>, refs/main holding the revision. Returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


@pytest.fixture
def hub(llama_set, tmp_path, monkeypatch):
    """The tiny Llama set in a Hub cache as org/base, org/ft0 (sharded, with an index), org/ft1, org/ft2;
    offline."""
    cache = tmp_path / "hub"
    cache_model(cache, "org/base", llama_set.base_dir)
    for i, folder in enumerate(llama_set.model_dirs):
        cache_model(cache, f"org/ft{i}", folder)
    assert (llama_set.model_dirs[0] / "model.safetensors.index.json").exists()  # the sharded one
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # org/... is not a path here
    return cache


def test_a_recipe_naming_hub_ids_merges_the_cached_models(hub, llama_set):
    recipe = ("merge_method: ties\nbase_model: org/base\ndtype: float32\nparameters: {density: 0.5}\n"
              "models:\n  - model: org/ft0\n    parameters: {weight: 0.7}\n  - model: org/ft1\n"
              "    parameters: {weight: 0.3}\n")
    ours = run_recipe(parse_recipe(recipe), progress=False).state_dict
    local = recipe.replace("org/base", str(llama_set.base_dir)).replace("org/ft0", str(llama_set.model_dirs[0]))
    local = local.replace("org/ft1", str(llama_set.model_dirs[1]))
    expected = run_recipe(parse_recipe(local), progress=False).state_dict
    assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in expected)


def test_merge_and_the_cli_take_hub_ids(hub, llama_set, tmp_path):
    from nbmerge.cli import main

    ours = nbmerge.merge("task_arithmetic", ["org/ft0", "org/ft2"], base="org/base", scaling=0.5,
                         progress=False).state_dict
    expected = nbmerge.merge("task_arithmetic", [llama_set.model_dirs[0], llama_set.model_dirs[2]],
                             base=llama_set.base_dir, scaling=0.5, progress=False).state_dict
    assert_state_close(ours, expected, atol=0)
    assert main(["merge", "task_arithmetic", "org/ft0", "org/ft2", "--base", "org/base", "--scaling", "0.5",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert_state_close(load_folder(tmp_path / "out"), expected, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_the_magics_take_hub_ids(hub, llama_set):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbmerge")
    shell.run_line_magic("merge", "weighted_average org/ft0 org/ft1 --weights 1,3 --quiet -o hub_merged")
    expected = nbmerge.merge("weighted_average", llama_set.model_dirs[:2], weights=[1, 3], progress=False)
    assert_state_close(shell.user_ns["hub_merged"].state_dict, expected.state_dict, atol=0)


def test_a_recipe_cell_names_hub_ids(hub, llama_set):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbmerge")
    shell.run_cell_magic("merge", "--quiet -o hub_recipe", "merge_method: slerp\nbase_model: org/base\n"
                         "parameters: {t: 0.4}\nmodels:\n  - model: org/base\n  - model: org/ft1\n")
    expected = nbmerge.merge("slerp", [llama_set.model_dirs[1]], base=llama_set.base_dir, t=0.4,
                             compute_dtype="inputs", progress=False)
    assert_state_close(shell.user_ns["hub_recipe"].state_dict, expected.state_dict, atol=0)


def test_hf_home_locates_the_cache_too(hub, llama_set, monkeypatch, tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    shutil.move(str(hub), str(home / "hub"))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    merged = nbmerge.merge("task_arithmetic", ["org/ft1"], base="org/base", progress=False).state_dict
    expected = nbmerge.merge("task_arithmetic", [llama_set.model_dirs[1]], base=llama_set.base_dir,
                             progress=False).state_dict
    assert_state_close(merged, expected, atol=0)


def test_a_hub_id_missing_from_the_cache_offline_is_one_clear_error(hub):
    with pytest.raises(ModelInputError) as error:
        nbmerge.merge("task_arithmetic", ["org/missing"], base="org/base", progress=False)
    message = str(error.value)
    assert "'org/missing' is neither an existing file or folder nor a Hugging Face Hub model" in message
    assert "HF_HUB_OFFLINE is set" in message and str(hub) in message
    assert "\n" not in message


def test_a_shard_linked_outside_the_repository_is_still_refused(hub, tmp_path):
    """Only links into the same repository (its blobs/) pass: an index naming a shard that links elsewhere does not;
    the error names the shard and where it links (nbmerge.io.untrusted.in_repository)."""
    snapshot = hub / "models--org--ft0" / "snapshots" / REVISION
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(snapshot / shard, outside)
    os.unlink(snapshot / shard)
    (snapshot / shard).symlink_to(outside)
    with pytest.raises(ModelInputError, match=rf"{shard} links outside the model's repository .* to {outside}"):
        nbmerge.merge("task_arithmetic", ["org/ft0"], base="org/base", progress=False)
