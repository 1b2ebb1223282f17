"""Noticing that an input file changed while a merge read it, whatever its format and however it was changed.

Two witnesses, both taken before a byte of the file is read:

* its stamp (device, inode, size, modification time in ns), compared by path: catches a file replaced by a rename
  (another inode), deleted, truncated or extended, and most in-place writes;
* a Linux inotify watch on it (IN_MODIFY, IN_MOVE_SELF, IN_DELETE_SELF): catches every write, truncation, move
  and deletion of that inode, also a same-size rewrite within one tick of the file system's clock, which leaves
  the stamp as it was (timestamps come from a coarse clock, a few ms per tick).

Where inotify is missing (not Linux) or refused (the per-user limit of instances or watches reached), the stamps
alone are compared.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

_IN_MODIFY, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x2, 0x400, 0x800
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
_libc = None


def _inotify():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.inotify_init1.argtypes, libc.inotify_add_watch.argtypes = (ctypes.c_int,), (
                ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def stamp(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of ``path``, or None if it is gone."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class FileWatch:
    """``changed()``: the first watched file that changed since it was added, or None; ``close()`` frees the
    inotify descriptor."""

    def __init__(self):
        self._stamps: dict[Path, tuple | None] = {}
        self._watches: dict[int, Path] = {}
        self._changed: Path | None = None
        self._fd = -1
        libc = _inotify()
        if libc:
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            self._fd = fd if fd >= 0 else -1

    def add(self, path: Path) -> None:
        """Watch ``path`` from now on (a path already watched keeps its first stamp)."""
        if path in self._stamps:
            return
        if self._fd >= 0:
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY | _IN_DELETE_SELF | _IN_MOVE_SELF)
            if wd >= 0:
                self._watches[wd] = path
        self._stamps[path] = stamp(path)

    def changed(self) -> Path | None:
        if self._changed is None:
            self._changed = self._first_event() or next(
                (path for path, before in self._stamps.items() if stamp(path) != before), None)
        return self._changed

    def _first_event(self) -> Path | None:
        if self._fd < 0:
            return None
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return None
        wd = _EVENT.unpack_from(data)[0]
        return self._watches.get(wd, next(iter(self._stamps), None))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
