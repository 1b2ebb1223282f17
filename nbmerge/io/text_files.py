"""Small text outputs (a recipe, a results table, a search checkpoint) written whole or not at all.

``write_text_atomically(path, text)`` writes a hidden sibling ``.<name>.partial-<pid>``, flushes it to disk and
renames it over ``path`` (atomic on one file system): an interrupted write leaves the old file whole, or none,
never a truncated one that looks complete. The sibling is removed when the write fails.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
