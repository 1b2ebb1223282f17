"""Claiming an output path, writing it in a locked temporary sibling, and installing it with a journaled rename.

Every writer of a merged output (``FolderSink``, a recipe chain's intermediate folder, a trained-state file) goes
through ``OutputClaim``, so that whatever happens the output is either absent, the old one whole, or the new one
whole:

* The temporary sibling ``.<out>.<kind>-XXXX`` is created and ``flock``-ed while its writer runs; the lock is held
  through the final rename.
* Claiming and installing both run under an exclusive ``flock`` on the output's parent folder (held for the
  checks and renames only, not while tensors are written). A claim therefore sees every other writer of ``out``
  (a locked ``.partial-`` sibling: refused with OutputExistsError) or its installed output (refused unless
  ``overwrite``); an install checks again that ``out`` is still absent unless ``overwrite``. Two merges to one
  output can never both succeed, in threads of one process or in two processes.
* Overwriting a folder swaps the two names atomically where the file system can (Linux
  ``renameat2(RENAME_EXCHANGE)``): ``out`` is the old or the new folder at every instant, and the old one, left
  under the temporary's name, is renamed to ``.<out>.trash-XXXX`` and deleted. Elsewhere it is journaled: ``out``
  into ``.<out>.replaced-XXXX/`` (the journal: its name says an old output waits there), then the new folder to
  ``out`` (the commit point), then the old one to the trash. A process killed at any step leaves one of: the old
  output at ``out`` (plus a complete or partial unlocked temporary), ``out`` absent with the old output whole in
  ``.replaced-`` (journaled path, between its renames), or the new output at ``out`` (plus the old under an
  unlocked temporary's name, in ``.replaced-`` or in ``.trash-``). The next claim of ``out`` finishes or undoes it
  (``recover``): an old output in ``.replaced-`` goes back to ``out`` when ``out`` is absent (undone: a killed
  merge reported no success), and is deleted when ``out`` is there (the overwrite had committed); unlocked
  temporaries and trash are deleted. A single ``.safetensors`` file is replaced by one atomic rename.
* ``release`` (any failure, any exception) deletes the temporary and closes its lock, so the next merge to ``out``
  in the same process is not refused.

The locks are advisory ``flock``s on folders (local file systems; on NFS, as the kernel emulates them there).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from nbmerge.errors import OutputExistsError, OutputWriteError

TEMPORARY_KINDS = ("starting", "partial", "intermediates")  # locked by their writer while it runs


def reached(step: str) -> None:
    """Called at each step of claiming and installing (a test replaces it to stop a process at ``step``):
    "claimed", "written", "installed", "trashed", and on the journaled path "moved-aside" between its renames."""


def check_output_free(out: Path, overwrite: bool) -> None:
    """OutputExistsError if ``out`` exists and ``overwrite`` is false, or exists as the other kind (a folder where
    a .safetensors file goes, or a file where a folder goes)."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    wants_file = out.suffix == ".safetensors"
    if out.is_dir() == wants_file:  # a link counts as what it points to (and only the link is replaced)
        raise OutputExistsError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; it cannot be "
                                f"replaced by a merged {'file' if wants_file else 'folder'}")


class OutputClaim:
    """The right to write ``out``: ``folder`` is the locked temporary sibling to write into; ``install()`` puts it
    (or one file of it) in place of ``out``; ``release()`` deletes it. OutputExistsError when ``out`` exists
    (without ``overwrite``) or another writer holds a claim of the same ``kind`` on it; OutputWriteError when the
    temporary cannot be made."""

    def __init__(self, out: Path, overwrite: bool, kind: str = "partial"):
        self.out, self.overwrite, self.kind = out, overwrite, kind
        self.folder: Path | None = None
        self._lock: int | None = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with _parent_locked(out):
                recover(out)
                check_output_free(out, overwrite)
                _refuse_live_writer(out, kind)
                self.folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
                self._lock = _lock_folder(self.folder, wait=False)
        except OutputExistsError:
            self.release()
            raise
        except OSError as exc:  # a read-only or full file system, no inode left, too many open files
            self.release()
            raise OutputWriteError(exc.errno, f"{out}: cannot create the output there "
                                              f"({exc.strerror or exc})") from None
        except BaseException:
            self.release()
            raise
        reached("claimed")

    def install(self, file_name: str | None = None) -> None:
        """Put the temporary folder (or its file ``file_name``, for a single-file output) in place of ``out``, then
        release the claim. OutputExistsError if ``out`` appeared meanwhile and ``overwrite`` is false (another
        merge finished first: this one is discarded); OutputWriteError if a rename fails (``out`` unchanged)."""
        reached("written")
        trash = None
        try:
            with _parent_locked(self.out):
                if os.path.lexists(self.out) and not self.overwrite:
                    raise OutputExistsError(f"{self.out} was written by another merge while this one ran; this "
                                            f"one's result was discarded (pass overwrite=True to replace it)")
                check_output_free(self.out, self.overwrite)
                if file_name is not None:
                    os.replace(self.folder / file_name, self.out)  # atomic, also over an existing file
                    reached("installed")
                elif not os.path.lexists(self.out):
                    os.rename(self.folder, self.out)
                    self.folder = None
                    reached("installed")
                else:
                    trash = self._replace_folder()
        except OSError as exc:
            if isinstance(exc, OutputExistsError):
                raise
            raise OutputWriteError(exc.errno, f"{self.out}: could not move the finished output into place "
                                              f"({exc.strerror or exc}); the earlier output is unchanged") from None
        finally:
            self.release()
        if trash is not None:
            _remove(trash)

    def _replace_folder(self) -> Path:
        """Overwrite a folder (under the parent's lock), leaving the old one under a name that ``recover`` clears;
        returns where the old one now is, to be deleted. Where the file system can swap two names atomically
        (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs) ``out`` is the old or the new folder at
        every instant; elsewhere, the journaled two renames."""
        if _exchange(self.folder, self.out):  # out is the new folder; the old one sits unlocked under our name
            old, self.folder = self.folder, None
            reached("installed")
        else:
            old = self._journaled_replace()
        trash = old.with_name(f".{self.out.name}.trash-{old.name.rsplit('-', 1)[1]}")
        try:
            os.rename(old, trash)
        except OSError:  # committed all the same: the old output is deleted from where it is
            return old
        reached("trashed")
        return trash

    def _journaled_replace(self) -> Path:
        """``out`` into ``.<out>.replaced-XXXX/`` (the journal), then the new folder to ``out`` (the commit); an
        error or interrupt before the commit puts the old one back. Returns the journal folder."""
        aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.replaced-", dir=self.out.parent))
        committed = False
        try:
            os.rename(self.out, aside / self.out.name)
            reached("moved-aside")
            os.rename(self.folder, self.out)
            committed = True
            self.folder = None
            reached("installed")
        finally:
            if not committed:  # an error or interrupt before the commit: the old output goes back
                if not os.path.lexists(self.out) and os.path.lexists(aside / self.out.name):
                    os.rename(aside / self.out.name, self.out)
                shutil.rmtree(aside, ignore_errors=True)
        return aside

    def release(self) -> None:
        """Delete the temporary folder (if still there) and close its lock; safe to call more than once."""
        folder, self.folder = self.folder, None
        lock, self._lock = self._lock, None
        try:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            if lock is not None:
                os.close(lock)


def siblings(out: Path, kinds: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(kind, path) of the folders ``.<out>.<kind>-XXXX`` beside ``out`` (matched by name, not glob: an output
    name may hold glob characters; the random part has no dot or dash, so another output's are never matched)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(kinds)})-[A-Za-z0-9_]+")
    found = (pattern.fullmatch(name) for name in sorted(os.listdir(out.parent)))
    return [(match.group(1), out.parent / match.group(0)) for match in found if match]


def recover(out: Path) -> None:
    """Finish or undo what writers of ``out`` killed mid-way left (call under the parent's lock): an old output in
    ``.replaced-`` goes back to ``out`` if ``out`` is absent, else is deleted; ``.trash-`` folders and unlocked
    temporaries are deleted."""
    for kind, path in siblings(out, ("replaced", "trash", *TEMPORARY_KINDS)):
        if kind == "replaced":
            if not os.path.lexists(out) and os.path.lexists(path / out.name):
                os.rename(path / out.name, out)  # undo: the overwrite never reached its commit
            _remove(path)
        elif kind == "trash":
            _remove(path)
        elif kind in TEMPORARY_KINDS and path.is_symlink():  # an output that was a link, swapped out: the link
            _remove(path)
        elif kind in TEMPORARY_KINDS:
            try:
                fd = _lock_folder(path, wait=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if fd is not None:  # nobody holds it: left by a writer that was killed
                try:
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(fd)


def _remove(path: Path) -> None:
    """Delete a folder with what it holds, or a file or link (an output that was a link: only the link)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _refuse_live_writer(out: Path, kind: str) -> None:
    for _, path in siblings(out, (kind,)):
        try:
            fd = _lock_folder(path, wait=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if fd is None:
            raise OutputExistsError(f"another merge is writing {out} now (its temporary folder {path.name}); wait "
                                    f"for it, or choose another output")
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2 = None


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the platform, the C library
    or the file system cannot (nothing changed then)."""
    global _renameat2
    if _renameat2 is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            _renameat2 = function
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not on this file system: the journaled renames instead
    raise OSError(error, os.strerror(error), str(second))


@contextlib.contextmanager
def _parent_locked(out: Path) -> Iterator[None]:
    """An exclusive flock on ``out``'s parent folder while claims and installs of its children are decided."""
    fd = _lock_folder(out.parent, wait=True)
    try:
        yield
    finally:
        os.close(fd)


def _lock_folder(folder: Path, wait: bool) -> int | None:
    """An exclusive flock on ``folder`` (its descriptor), or None if another holder has it and ``wait`` is false."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
