"""Faults around the output: a merge killed with SIGKILL or stopped with SIGINT mid-write, an overwrite killed at
each of its steps, and two merges to one output at once (threads of one process, two processes). Each killed
merge runs in its own process, as a notebook kernel or a CLI would."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
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


# -- an overwrite killed at each of its steps ------------------------------------------------------------------
def in_child(work, timeout=60) -> int:
    """Run ``work()`` in a forked copy of this process (everything already imported: milliseconds, where a fresh
    interpreter takes seconds on a busy machine); return its wait status as subprocess does (-N: killed by N)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child merge hung")
        time.sleep(0.01)


def stopped_at(step, out, inputs, journaled: bool) -> int:
    """A merge overwriting ``out`` that SIGKILLs itself (no handler, no cleanup, as a power cut or the OOM
    killer) when it reaches ``step``; ``journaled``: as on a file system that cannot swap two names atomically."""
    from nbmerge.io import output_claim

    def work():
        def stop_at(reached):
            if reached == step:
                os.kill(os.getpid(), signal.SIGKILL)

        output_claim.reached = stop_at  # in the child only
        if journaled:
            output_claim._exchange = lambda first, second: False
        nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)

    return in_child(work)


SWAPPED_STEPS = {"claimed": "old", "written": "old", "installed": "new", "trashed": "new"}
JOURNALED_STEPS = {"claimed": "old", "written": "old", "moved-aside": "old", "installed": "new", "trashed": "new"}
FILE_STEPS = {"claimed": "old", "written": "old", "installed": "new"}
KILLS = ([("merged", "swapped", step, survivor) for step, survivor in SWAPPED_STEPS.items()]
         + [("merged", "journaled", step, survivor) for step, survivor in JOURNALED_STEPS.items()]
         + [("merged.safetensors", "swapped", step, survivor) for step, survivor in FILE_STEPS.items()])


def snapshot(path):
    """Every file of an output (a folder or one file) with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out_name, path, step, survivor", KILLS)
def test_an_overwrite_killed_at_any_step_leaves_old_or_new_whole_and_the_next_merge_settles_it(
        tmp_path, inputs, out_name, path, step, survivor):
    out = tmp_path / out_name
    nbmerge.merge("simple_average", [inputs[0], inputs[0]], out=out, progress=False)
    old = snapshot(out)
    reference = tmp_path / "reference" / out_name  # what the killed merge would have written
    nbmerge.merge("simple_average", inputs, out=reference, progress=False)
    new = snapshot(reference)
    shutil.rmtree(tmp_path / "reference")
    assert old != new
    assert stopped_at(step, out, inputs, journaled=path == "journaled") == -signal.SIGKILL
    if out.exists():  # right after the kill: old or new, whole
        assert snapshot(out) in (old, new)
    else:  # only between the two renames of the journaled path: the old one whole in the journal folder
        assert (path, step) == ("journaled", "moved-aside")
        [aside] = tmp_path.glob(f".{out_name}.replaced-*")
        assert snapshot(aside / out_name) == old
    # the next merge to that output finishes or undoes the killed one before it looks at the output
    with pytest.raises(OutputExistsError, match="already exists"):
        nbmerge.merge("simple_average", inputs, out=out, progress=False)
    assert snapshot(out) == (old if survivor == "old" else new)
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", out_name]  # nothing left over
    nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)  # no stale lock
    assert snapshot(out) == new


# -- two merges to one output ----------------------------------------------------------------------------------
def expected_weighted(inputs, weights):
    first, second = (load_file(p) for p in inputs)
    total = sum(weights)
    return {name: ((weights[0] * first[name].double() + weights[1] * second[name].double()) / total).float()
            for name in first}


@pytest.mark.parametrize("round_", range(3))  # the race is decided by the scheduler: several rounds
def test_merges_to_one_output_from_threads_never_both_succeed(tmp_path, inputs, round_):
    out = tmp_path / "merged"
    weightings = [[1, 1], [1, 2], [1, 3], [1, 4]]
    start = threading.Barrier(len(weightings))
    outcome: dict[int, object] = {}

    def run(i):
        start.wait()
        try:
            nbmerge.merge("weighted_average", inputs, out=out, weights=weightings[i], progress=False,
                          on_progress=lambda event: time.sleep(0.002))
            outcome[i] = "wrote"
        except OutputExistsError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(weightings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [i for i, result in outcome.items() if result == "wrote"]
    assert len(outcome) == len(weightings) and len(winners) == 1, outcome
    for i, result in outcome.items():
        if i not in winners:
            assert re.search(r"(another merge is writing .*merged now|merged already exists)", str(result)), result
    merged = load_file(out / "model.safetensors")
    for name, value in expected_weighted(inputs, weightings[winners[0]]).items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", "merged"]


def race_two_processes(out, go, inputs) -> list[int]:
    """Two forked processes merge to ``out`` (weights [1, 2] and [1, 3]) once ``go`` appears; their exit codes
    (17: refused with OutputExistsError)."""
    pids = []
    for weight in (2, 3):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                while not go.exists():
                    time.sleep(0.0005)
                nbmerge.merge("weighted_average", inputs, out=out, weights=[1, weight], progress=False)
                code = 0
            except OutputExistsError:
                code = 17
            finally:
                os._exit(code)
        pids.append(pid)
    time.sleep(0.2)
    go.touch()
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    go.unlink()
    return codes


def test_merges_to_one_output_from_two_processes_never_both_succeed(tmp_path, inputs):
    for round_ in range(6):  # the race is decided by the scheduler: several rounds
        out = tmp_path / f"merged{round_}"
        codes = race_two_processes(out, tmp_path / "go", inputs)
        assert sorted(codes) == [0, 17], codes  # one wrote, the other was refused with OutputExistsError
        merged = load_file(out / "model.safetensors")
        for name, value in expected_weighted(inputs, [1, (2, 3)[codes.index(0)]]).items():
            torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", *(f"merged{r}" for r in range(6))]


def test_the_claim_is_held_until_the_output_is_in_place(tmp_path, inputs, monkeypatch):
    """At the last moment before the rename, a second merge is still refused, and an output that someone else
    put there meanwhile is not replaced: this merge is discarded instead."""
    from nbmerge.io import output_claim

    out = tmp_path / "merged"
    seen = []

    def at_step(step):
        if step == "written" and not seen:
            with pytest.raises(OutputExistsError, match="another merge is writing"):
                nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
            seen.append(step)

    monkeypatch.setattr(output_claim, "reached", at_step)
    with pytest.raises(OutputExistsError, match=r"merged was written by another merge while this one ran"):
        nbmerge.merge("simple_average", inputs, out=out, progress=False)
    assert seen and os.listdir(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["in0.safetensors", "in1.safetensors", "merged"]


@pytest.mark.parametrize("journaled", [False, True], ids=["swapped", "journaled"])
def test_overwriting_an_output_that_is_a_link_replaces_the_link_not_what_it_points_to(tmp_path, inputs,
                                                                                     monkeypatch, journaled):
    from nbmerge.io import output_claim

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("theirs")
    out = tmp_path / "merged"
    out.symlink_to(elsewhere, target_is_directory=True)
    if journaled:
        monkeypatch.setattr(output_claim, "_exchange", lambda first, second: False)
    nbmerge.merge("simple_average", inputs, out=out, overwrite=True, progress=False)
    assert not out.is_symlink() and os.listdir(elsewhere) == ["keep.txt"]
    merged = load_file(out / "model.safetensors")
    for name, value in expected_average(inputs).items():
        assert torch.equal(merged[name], value), name
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "in0.safetensors", "in1.safetensors", "merged"]
