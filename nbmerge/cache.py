"""Folders built once on this machine and cached (the model zoo, the exported causal LM, its fine-tuned variants).

``build_once(root, marker, build)``: when ``root/marker`` exists the folder is built; otherwise ``build(staging)``
writes it into a hidden staging folder beside it, renamed to ``root`` only when complete, so an interrupted or
failed build leaves nothing that looks built. An exclusive lock on ``.<name>.lock`` beside it allows one build at
a time: a second process waits for the first, then finds the folder built.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable


def build_once(root: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``root``, built by ``build(staging)`` unless ``root / marker`` is already there."""
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / marker).is_file():  # another process built it while this one waited
            return root
        staging = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            build(staging)
            if not (staging / marker).is_file():
                raise AssertionError(f"the build of {root.name} did not write {marker}")
            try:
                staging.rename(root)
            except OSError:  # a root only ever appears complete; another writer finishing first is fine
                if not (root / marker).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root
