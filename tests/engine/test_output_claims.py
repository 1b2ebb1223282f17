"""Faults around the output: a merge killed with SIGKILL or stopped with SIGINT mid-write, and two merges to one
output at once. Each real merge runs in its own process, as a notebook kernel or a CLI would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.errors import OutputExistsError

SLOW_MERGE = textwrap.dedent("""
    import signal, sys, time
    import nbmerge
    # Ctrl-C raises KeyboardInterrupt as in a terminal, also when the test run itself was started in the background
    # of a shell without job control (which starts it, and so this child, with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, *inputs = sys.argv[1:]
    def slowly(event):          # a long merge: each tensor takes a while
        if event.tensor:
            time.sleep(0.3)
    nbmerge.merge("simple_average", inputs, out=out, on_progress=slowly, progress=False)
""")


@pytest.fixture
def inputs(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"in{i}.safetensors"
        save_file({f"t{j}": torch.full((1000,), float(i + j)) for j in range(12)}, path)
        paths.append(path)
    return paths


def start_slow_merge(out, inputs):
    process = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(out), *map(str, inputs)],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # some tensors written
    return process


def expected_average(inputs):
    first, second = (load_file(p) for p in inputs)
    return {name: (first[name] + second[name]) / 2 for name in first}


def test_a_killed_merge_leaves_a_named_temporary_that_the_next_merge_removes(tmp_path, inputs):
    out = tmp_path / "merged"
    process = start_slow_merge(out, inputs)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    stray = list(tmp_path.glob(".merged.partial-*"))
    assert not out.exists() and len(stray) == 1  # no output; one clearly named temporary folder
    nbmerge.merge("simple_average", inputs, out=out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", "merged"]
    merged = load_file(out / "model.safetensors")
    for name, value in expected_average(inputs).items():
        assert torch.equal(merged[name], value), name


def test_sigint_stops_a_merge_and_leaves_nothing(tmp_path, inputs):
    out = tmp_path / "merged"
    process = start_slow_merge(out, inputs)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) != 0
    assert "KeyboardInterrupt" in process.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors"]


def test_a_second_merge_to_an_output_being_written_is_refused(tmp_path, inputs):
    out = tmp_path / "merged"
    process = start_slow_merge(out, inputs)
    with pytest.raises(OutputExistsError, match=r"another merge is writing .*merged now"):
        nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    merged = load_file(out / "model.safetensors")
    for name, value in expected_average(inputs).items():
        assert torch.equal(merged[name], value), name
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", "merged"]


def test_a_full_disk_fails_naming_the_file_and_keeps_the_existing_output(tmp_path, inputs, monkeypatch):
    import errno

    from nbmerge.errors import OutputWriteError
    from nbmerge.io import direct_write

    out = tmp_path / "merged"
    nbmerge.merge("simple_average", inputs[:1] * 2, out=out, progress=False)  # an earlier result
    before = (out / "model.safetensors").read_bytes()
    def disk_fills_up(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "pwrite", disk_fills_up)
    with pytest.raises(OutputWriteError, match=r"model.safetensors: writing the output failed \(No space left"):
        nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", "merged"]


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, inputs, monkeypatch):
    import errno
    import tempfile

    from nbmerge.errors import OutputWriteError

    def read_only(*args, **kwargs):  # what a read-only folder answers (the suite may run as root, which ignores modes)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputWriteError, match=r"merged: cannot create the output there \(Permission denied\)"):
        nbmerge.merge("simple_average", inputs, out=tmp_path / "merged", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors"]


def test_an_output_name_with_glob_characters_is_claimed_like_any_other(tmp_path, inputs):
    out = tmp_path / "merged[v1]*"
    stale = tmp_path / ".merged[v1]*.partial-dead"  # left by a killed merge to that very name
    stale.mkdir()
    unrelated = tmp_path / ".merged1.partial-other"  # another output's: a glob of the name would match it
    unrelated.mkdir()
    nbmerge.merge("simple_average", inputs, out=out, progress=False)
    assert sorted(os.listdir(tmp_path)) == [".merged1.partial-other", "in0.safetensors", "in1.safetensors",
                                            "merged[v1]*"]
