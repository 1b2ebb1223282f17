"""build_once: a folder appears only complete, is built once, and a concurrent caller waits for the first build."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nbmerge.workbench.models.cache import build_once


def test_built_once_then_reused(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        assert staging.is_dir() and staging.name.startswith(".done.building-")
        (staging / "data.txt").write_text("x")
        (staging / "manifest.json").write_text("{}")

    root = tmp_path / "done"
    assert build_once(root, "manifest.json", build) == root
    assert build_once(root, "manifest.json", build) == root
    assert len(calls) == 1 and (root / "data.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == [".done.lock", "done"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_failed_build_leaves_only_the_lock(tmp_path, failure):
    def build(staging):
        (staging / "half.bin").write_bytes(b"\0" * 10)
        raise failure

    with pytest.raises(failure):
        build_once(tmp_path / "zoo", "zoo.json", build)
    assert os.listdir(tmp_path) == [".zoo.lock"]


def test_a_build_that_forgets_its_marker_is_not_kept(tmp_path):
    with pytest.raises(AssertionError, match="did not write zoo.json"):
        build_once(tmp_path / "zoo", "zoo.json", lambda staging: (staging / "other").write_text(""))
    assert os.listdir(tmp_path) == [".zoo.lock"]


def test_a_second_caller_waits_for_the_first_build(tmp_path):
    started, calls, results = threading.Event(), [], []

    def slow_build(staging):
        calls.append(1)
        started.set()
        time.sleep(0.3)
        (staging / "m").write_text("")

    root = tmp_path / "shared"
    first = threading.Thread(target=lambda: results.append(build_once(root, "m", slow_build)))
    first.start()
    assert started.wait(10)
    results.append(build_once(root, "m", slow_build))  # blocks on the lock, then finds the folder built
    first.join(10)
    assert calls == [1] and results == [root, root]


def test_a_resumable_build_keeps_its_finished_pieces_for_the_next_call(tmp_path):
    root, seen = tmp_path / "zoo", []

    def interrupted(staging):
        (staging / "piece-1").write_text("done")
        raise KeyboardInterrupt

    def resumed(staging):
        seen.append(sorted(p.name for p in staging.iterdir()))
        (staging / "piece-2").write_text("done")
        (staging / "zoo.json").write_text("{}")

    with pytest.raises(KeyboardInterrupt):
        build_once(root, "zoo.json", interrupted, resumable=True)
    assert not root.exists() and (tmp_path / ".zoo.partial" / "piece-1").is_file()
    assert build_once(root, "zoo.json", resumed, resumable=True) == root
    assert seen == [["piece-1"]]
    assert sorted(p.name for p in root.iterdir()) == ["piece-1", "piece-2", "zoo.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zoo.lock", "zoo"]
