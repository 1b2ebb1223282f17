"""An input rewritten during a merge, in every format a merge reads: the merge fails with a ModelInputError naming
the file, writes nothing, and leaves no lock behind (the same merge succeeds once the file is left alone).

The rewrite happens from the merge's own ``on_progress`` callback after the first tensor (the same bytes count,
the same shapes, other values: what a notebook cell re-saving a checkpoint does), so it lands within the file
system's clock tick of the file's own writing often enough: the change must be seen whatever the timestamps say.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.io.lora import WithLora

from helpers import make_adapter


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {f"layer.{j}.weight": torch.full((64,), value + j) for j in range(6)}


def folder_model(folder, value: float, sharded: bool = False):
    folder.mkdir(parents=True)
    state = tensors(value)
    if sharded:
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for shard, keys in halves.items():
            save_file({k: state[k] for k in keys}, folder / shard)
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}))
    return folder


def rewrite_in_place(path) -> None:
    """The same length, other bytes, written into the same inode (a JSON file: its first digit changed; a
    weights file: its last byte)."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        at = next(i for i, byte in enumerate(data) if chr(byte).isdigit())
        data[at] = ord("7") if data[at] != ord("7") else ord("8")
    else:
        data[-1] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)


def merge_rewriting(models, out, victim, rewrite=rewrite_in_place):
    done = []

    def rewrite_after_first_tensor(event):
        if event.tensor and not done:
            done.append(True)
            rewrite(victim)

    return nbmerge.merge("simple_average", models, out=out, on_progress=rewrite_after_first_tensor, progress=False)


def assert_refused_naming(victim, models, out, rewrite=rewrite_in_place, restore=True):
    before = sorted(os.listdir(out.parent))
    original = victim.read_bytes()
    with pytest.raises(ModelInputError, match=rf"{victim.name}: the file changed while it was being merged"):
        merge_rewriting(models, out, victim, rewrite)
    assert victim.read_bytes() != original  # it was rewritten (the merge noticed, not missed it)
    assert sorted(os.listdir(out.parent)) == before  # no output, no temporary
    if restore:
        victim.write_bytes(original)
    nbmerge.merge("simple_average", models, out=out, progress=False)  # no stale lock: the retry succeeds
    assert out.exists()


@pytest.mark.parametrize("victim_name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_file_of_a_model_folder_rewritten_in_place(tmp_path, victim_name):
    first, second = folder_model(tmp_path / "a", 1.0), folder_model(tmp_path / "b", 2.0)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    assert_refused_naming(first / victim_name, [first, second], out)


@pytest.mark.parametrize("victim_name", ["model-00002-of-00002.safetensors", "model.safetensors.index.json"])
def test_a_shard_or_the_index_of_a_sharded_model_rewritten(tmp_path, victim_name):
    first, second = folder_model(tmp_path / "a", 1.0, sharded=True), folder_model(tmp_path / "b", 2.0)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    assert_refused_naming(first / victim_name, [first, second], out)


@pytest.mark.parametrize("suffix, zip_format", [(".pt", True), (".bin", False)], ids=["zip-mmap", "legacy"])
def test_a_pickle_checkpoint_resaved_during_the_merge(tmp_path, suffix, zip_format):
    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    torch.save(tensors(1.0), first, _use_new_zipfile_serialization=zip_format)
    torch.save(tensors(2.0), second, _use_new_zipfile_serialization=zip_format)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()

    def resave(path):  # what a notebook does: torch.save to the same path (truncated, then written)
        torch.save(tensors(5.0), path, _use_new_zipfile_serialization=zip_format)

    assert_refused_naming(first, [first, second], out, resave, restore=False)
    merged = load_file(out / "model.safetensors")  # the retry reads the file as it is now
    for name, value in tensors(5.0).items():
        assert torch.equal(merged[name], (value + tensors(2.0)[name]) / 2), name


def test_a_file_replaced_by_a_rename_is_noticed(tmp_path):
    first, second = folder_model(tmp_path / "a", 1.0), folder_model(tmp_path / "b", 2.0)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()

    replacement = {"model_type": "toy", "hidden_size": 64, "_name_or_path": "replaced"}  # the same architecture:
    # a config that disagrees with the other model's is refused before anything is read (allow_config_mismatch)

    def replace(path):
        staged = path.with_name("staged.json")
        staged.write_text(json.dumps(replacement))
        os.replace(staged, path)

    assert_refused_naming(first / "config.json", [first, second], out, replace, restore=False)
    assert json.loads((out / "config.json").read_text()) == replacement


@pytest.mark.parametrize("victim_name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_lora_adapter_rewritten_during_the_merge(llama_set, tmp_path, victim_name):
    adapter = tmp_path / "adapter"
    make_adapter(llama_set.base_dir, adapter, seed=4)
    shutil.copytree(llama_set.model_dirs[1], tmp_path / "other")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    assert_refused_naming(adapter / victim_name, [WithLora(llama_set.base_dir, adapter), tmp_path / "other"], out)


def test_a_same_size_rewrite_within_one_clock_tick_is_seen(tmp_path):
    """A rewrite that leaves size and modification time as they were (as one within the file system's clock tick
    does; here the time is put back by hand) is still seen: the inotify watch, not the stamp, sees it."""
    from nbmerge.io.file_watch import FileWatch, stamp

    path = tmp_path / "w.safetensors"
    save_file(tensors(1.0), path)
    watch = FileWatch()
    watch.add(path)
    before = os.stat(path)
    assert watch.changed() is None
    rewrite_in_place(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stamp(path)[1:] == (before.st_ino, before.st_size, before.st_mtime_ns)  # the stamp cannot tell
    assert watch.changed() == path
    watch.close()
