"""Peak resident memory of this process over a stretch of work (Linux: VmHWM, reset through clear_refs)."""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

from nbmerge.io.mapping import libc_function

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Make the kernel forget the process's peak RSS so far; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last successful reset (or since the process started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_malloc_trim = libc_function("malloc_trim", [ctypes.c_size_t])  # glibc only: None elsewhere


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps freed buffers below its mmap threshold, which
    otherwise lets RSS drift with what was merged before, instead of following the largest tensor)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
