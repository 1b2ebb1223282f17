"""Read leases on input files, so that a file truncated or rewritten during a merge stops it with an error instead
of a SIGBUS.

A merge maps its inputs' tensors; if another process truncates a file under such a mapping, the next touch of a
vanished page kills the process (SIGBUS — in a notebook, the kernel). With a read lease (Linux
``fcntl(F_SETLEASE, F_RDLCK)`` on the read-only descriptor) the kernel makes that process's truncate or open for
writing wait until the lease is released (at most /proc/sys/fs/lease-break-time seconds, 45 by default) and marks
the lease as breaking: ``F_GETLEASE`` then reads F_UNLCK. The engine polls that once per tensor and stops with a
ModelInputError naming the file; closing the source releases the lease and the other process goes on.

The kernel announces a break with SIGIO, whose default action ends the process; Python installs handlers only from
the main thread, and merges also run in panel threads, so while any lease is held SIGIO is ignored process-wide
(set through libc, only where nothing else handles SIGIO, and restored when the last lease goes). Where a lease
cannot be taken — not Linux, a file system without leases, a file someone has open for writing, a file of another
user without CAP_LEASE, a SIGIO handler in place — nothing changes: the files' sizes and times are still compared
before the output is finalised.
"""

from __future__ import annotations

import ctypes
import fcntl
import signal
import sys
import threading

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", None)
_SIG_DFL, _SIG_IGN = 0, 1

_lock = threading.Lock()
_held = 0  # leases held by this process (SIGIO is ignored while > 0)
_signal = None


def _libc_signal():
    global _signal
    if _signal is None:
        function = ctypes.CDLL(None, use_errno=True).signal
        function.restype, function.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p)
        _signal = function
    return _signal


def _ignore_sigio() -> bool:
    """Ignore SIGIO for the first lease; False where something else handles it (no lease is taken then)."""
    global _held
    if _held == 0:
        previous = _libc_signal()(signal.SIGIO, _SIG_IGN) or _SIG_DFL
        if previous not in (_SIG_DFL, _SIG_IGN):
            _libc_signal()(signal.SIGIO, previous)
            return False
    _held += 1
    return True


def _restore_sigio() -> None:
    global _held
    _held -= 1
    if _held == 0:
        _libc_signal()(signal.SIGIO, _SIG_DFL)


def take(fd: int) -> bool:
    """Take a read lease on ``fd`` (open read-only); False where none can be taken."""
    if _F_SETLEASE is None or not sys.platform.startswith("linux"):
        return False
    with _lock:
        if not _ignore_sigio():
            return False
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            _restore_sigio()
            return False
    return True


def breaking(fd: int) -> bool:
    """Whether another process is waiting to truncate or write the file (its lease is being broken)."""
    try:
        return fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK
    except OSError:
        return False


def release(fd: int) -> None:
    """Give the lease up (a process waiting to write then goes on)."""
    with _lock:
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass
        _restore_sigio()
