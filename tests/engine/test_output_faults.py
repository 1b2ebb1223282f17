"""Faults while an output is written, in the merging process itself: a full disk, no inode left, too many open
files, no memory, Ctrl-C, an on_progress callback that raises, a rename that fails. Each must end with nbmerge's
error naming the file (an OutputWriteError, not a raw OSError), no temporary left, an existing output unchanged,
and no stale lock: the same merge, retried in the same process once the fault is gone, succeeds."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.errors import OutputWriteError
from nbmerge.io import direct_write, output_claim
from nbmerge.io.safetensors import ShardWriter


@pytest.fixture
def inputs(tmp_path):
    paths = []
    for i in range(2):
        folder = tmp_path / "in" / f"m{i}"
        folder.mkdir(parents=True)
        save_file({f"t{j}": torch.full((300,), float(i + 2 * j)) for j in range(8)}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden": 300}))
        paths.append(folder)
    return paths


def expected(inputs):
    first, second = (load_file(folder / "model.safetensors") for folder in inputs)
    return {name: ((first[name].double() + second[name].double()) / 2).float() for name in first}


def merge(inputs, out, **options):
    return nbmerge.merge("simple_average", inputs, out=out, progress=False, shard_size="3KB", **options)


def failing(error_number):
    def fail(*args, **kwargs):
        raise OSError(error_number, os.strerror(error_number))

    return fail


def nth_call_raises(real, n, exception):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            raise exception
        return real(*args, **kwargs)

    return wrapper


# (what fails, the error and the words of its message); every fault is injected where nbmerge makes the call
FAULTS = {
    "no inode for the temporary folder": (
        lambda mp: mp.setattr(output_claim.tempfile, "mkdtemp", failing(errno.ENOSPC)),
        OutputWriteError, r"merged: cannot create the output there \(No space left on device\)"),
    "too many open files for its lock": (
        lambda mp: mp.setattr(output_claim, "_lock_folder", failing(errno.EMFILE)),
        OutputWriteError, r"merged: cannot create the output there \(Too many open files\)"),
    "no inode for a shard file": (
        lambda mp: mp.setattr(direct_write.DirectFile, "_open", failing(errno.ENOSPC)),
        OutputWriteError, r"model-00001-of-\d+\.safetensors: writing the output failed \(No space left"),
    "too many open files for a shard": (
        lambda mp: mp.setattr(direct_write.DirectFile, "_open",
                              nth_call_raises(direct_write.DirectFile._open, 2, OSError(errno.EMFILE, "Too many "
                                                                                         "open files"))),
        OutputWriteError, r"model-00002-of-\d+\.safetensors: writing the output failed \(Too many open files"),
    "disk full copying config.json": (
        lambda mp: mp.setattr(shutil, "copyfileobj", failing(errno.ENOSPC)),  # copy_model_file's copy
        OutputWriteError, r"config\.json: writing the output failed \(No space left on device\)"),
    "disk full writing the index": (
        lambda mp: mp.setattr("pathlib.Path.write_text", failing(errno.ENOSPC)),
        OutputWriteError, r"model\.safetensors\.index\.json: writing the output failed \(No space left"),
    "no memory mid-merge": (
        lambda mp: mp.setattr(ShardWriter, "write", nth_call_raises(ShardWriter.write, 3, MemoryError())),
        MemoryError, None),
    "the rename into place fails": (
        lambda mp: (mp.setattr(output_claim.os, "rename", failing(errno.EIO)),
                    mp.setattr(output_claim, "_exchange", failing(errno.EIO))),
        OutputWriteError, r"merged: could not move the finished output into place \(Input/output error\)"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_leaves_nothing_and_the_retry_succeeds(tmp_path, inputs, monkeypatch, fault, overwrite):
    inject, error, message = FAULTS[fault]
    out = tmp_path / "merged"
    if overwrite:
        merge(inputs[:1] * 2, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if overwrite else None
    listing = sorted(os.listdir(tmp_path))
    with monkeypatch.context() as patched:
        inject(patched)
        with pytest.raises(error, match=message):
            merge(inputs, out, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary left, nothing new
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output unchanged
    merge(inputs, out, overwrite=overwrite)  # no stale lock: the retry in this process succeeds
    merged = {name: tensor for shard in sorted(out.glob("*.safetensors")) for name, tensor in load_file(shard).items()}
    assert merged.keys() == expected(inputs).keys()
    for name, value in expected(inputs).items():
        assert torch.equal(merged[name], value), name


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "bug"])
def test_an_exception_in_a_progress_callback_leaves_no_lock(tmp_path, inputs, raised):
    out = tmp_path / "merged"

    def callback(event):
        if event.tensor and event.done > 0:
            raise raised("from the callback")

    with pytest.raises(raised, match="from the callback"):
        merge(inputs, out, on_progress=callback)
    assert sorted(os.listdir(tmp_path)) == ["in"]
    merge(inputs, out)
    assert sorted(os.listdir(tmp_path)) == ["in", "merged"]


def test_ctrl_c_between_the_renames_of_an_overwrite_puts_the_old_output_back(tmp_path, inputs, monkeypatch):
    """On a file system that cannot swap two names atomically, an overwrite is two renames."""
    out = tmp_path / "merged"
    merge(inputs[:1] * 2, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(step):
        if step == "moved-aside":  # the old output is aside, the new one not yet in place
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(output_claim, "reached", interrupt)
        patched.setattr(output_claim, "_exchange", lambda first, second: False)
        with pytest.raises(KeyboardInterrupt):
            merge(inputs, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["in", "merged"]
    merge(inputs, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_a_full_disk_while_saving_a_trained_state_is_named(tmp_path, monkeypatch):
    from nbmerge.io.trained_state import read_trained, write_trained

    path = tmp_path / "state.safetensors"
    state = {"w": torch.arange(6.0)}
    with monkeypatch.context() as patched:
        patched.setattr("safetensors.torch.save_file", failing(errno.ENOSPC))
        with pytest.raises(OutputWriteError, match=r"state\.safetensors: writing the trained state failed \(No "
                                                   r"space left on device\)"):
            write_trained(state, {"method": "x"}, path)
    assert os.listdir(tmp_path) == []
    write_trained(state, {"method": "x"}, path)
    tensors, recipe = read_trained(path)
    assert torch.equal(tensors["w"], state["w"]) and recipe == {"method": "x"}
    assert os.listdir(tmp_path) == ["state.safetensors"]


# -- every writer of an output: a layer stack, a recipe chain, a built module's trained state -----------------
def test_a_full_disk_while_stacking_layers_leaves_no_lock(llama_set, tmp_path, monkeypatch):
    out = tmp_path / "stacked"
    slices = [nbmerge.LayerSlice([llama_set.model_dirs[1]], (0, 2)), nbmerge.LayerSlice([llama_set.base_dir], (1, 3))]
    with monkeypatch.context() as patched:
        patched.setattr(direct_write.DirectFile, "_open", failing(errno.ENOSPC))
        with pytest.raises(OutputWriteError, match=r"model\.safetensors: writing the output failed \(No space"):
            nbmerge.stack(slices, out=out, progress=False)
    assert os.listdir(tmp_path) == []
    nbmerge.stack(slices, out=out, progress=False)
    stacked = load_file(out / "model.safetensors")
    base, model = llama_set.base, llama_set.models[1]
    assert torch.equal(stacked["model.layers.1.mlp.up_proj.weight"], model["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(stacked["model.layers.3.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_full_disk_in_the_last_merge_of_a_chain_leaves_no_intermediates_and_no_lock(tmp_path, inputs,
                                                                                     monkeypatch):
    from nbmerge.recipes import parse_recipe, run_recipe

    first, second = inputs
    recipe = parse_recipe(f"name: avg\nmethod: simple_average\nmodels: [{first}, {second}]\n---\n"
                          f"method: simple_average\nmodels: [avg, {second}]\n")
    out = tmp_path / "merged"
    with monkeypatch.context() as patched:  # the first merge writes, the final one finds the disk full
        patched.setattr(direct_write.DirectFile, "_open",
                        nth_call_raises(direct_write.DirectFile._open, 2, OSError(errno.ENOSPC, "No space left")))
        with pytest.raises(OutputWriteError, match=r"model\.safetensors: writing the output failed"):
            run_recipe(recipe, out=out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no .merged.intermediates-
    run_recipe(recipe, out=out, progress=False)
    merged = load_file(out / "model.safetensors")
    a, b = (load_file(folder / "model.safetensors") for folder in inputs)
    for name in a:
        expected_value = ((a[name].double() + b[name].double()) / 2 + b[name].double()) / 2
        assert torch.equal(merged[name], expected_value.float()), name
    assert sorted(os.listdir(tmp_path)) == ["in", "merged"]
