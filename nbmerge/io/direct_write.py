"""A new file written front to back straight to the disk (O_DIRECT), bypassing the page cache.

Why: a buffered ``write`` copies every byte into page-cache pages the kernel allocates for it, and on the VMs
this project runs on, fresh guest memory is slow to touch (the host backs it lazily): writing a 1.5 GB merged
model that way took 1–4.6 s of CPU, varying run to run, where the disk itself takes 1.5 GB in 0.9 s by direct
I/O, with the CPU free meanwhile (``benchmarks/speed.py``). Direct writes also leave the page cache to the
inputs, which a sweep of merges reads again and again.

How: an I/O thread writes in file order while the caller goes on. A piece that starts at an aligned file offset
from page-aligned memory (a merged tensor in a pooled buffer, after a header padded to ``DIRECT_IO_BLOCK``) is written
from the caller's memory itself, its whole ``DIRECT_IO_BLOCK`` blocks at once, no copy; the rest is copied into a few
reused, page-aligned staging buffers of ``STAGE`` bytes, each written once full. The caller's memory stays
referenced until written, and ``IN_FLIGHT_BYTES`` bounds what waits for the disk, so memory stays a few
tensors wide. The last, partial buffer is written zero-padded to the alignment and the file then truncated to
its real length. Where the file system refuses O_DIRECT (EINVAL at open or at a write), everything is written
through the page cache instead, from the caller's memory. ``NBMERGE_DIRECT_WRITE=0`` asks for the page cache
always.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from nbmerge.errors import OutputWriteError

STAGE = 8 * 2**20  # bytes per staging buffer: the disk's full speed (measured 1.7-1.9 GB/s from 8 MiB up)
DEPTH = 3          # staging buffers per file at most
DIRECT_IO_BLOCK = 4096   # file offsets, lengths and memory of direct writes (covers 512 B and 4 KiB logical blocks)
IN_FLIGHT_BYTES = 64 * 2**20  # bytes submitted and not yet written before write() waits (one piece at least)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_writes_enabled() -> bool:
    return _O_DIRECT != 0 and os.environ.get("NBMERGE_DIRECT_WRITE", "1") != "0"


def _as_bytes(data: torch.Tensor | bytes) -> torch.Tensor:
    """A flat uint8 view of a CPU tensor's stored bytes (little-endian, C order), or of a bytes object's."""
    if isinstance(data, torch.Tensor):
        return data.detach().contiguous().reshape(-1).view(torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class DirectFile:
    """``write(bytes or tensor)`` calls in order, then ``close()`` (or ``abort()``). One writing thread."""

    def __init__(self, path: Path):
        self.path = path
        self.direct = direct_writes_enabled()
        self.fd = self._open(path)
        self.size = 0       # bytes accepted so far
        self._offset = 0    # where the next submitted piece goes: aligned whenever no stage is being filled
        self._stage: torch.Tensor | None = None
        self._filled = 0    # bytes of the current stage filled
        self._free_stages: list[torch.Tensor] = []
        self._allocated = 0
        self._in_flight: deque[tuple[Future, int, torch.Tensor | None]] = deque()  # (write, bytes, its stage)
        self._in_flight_bytes = 0
        self._io: ThreadPoolExecutor | None = None

    def _open(self, path: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        if self.direct:
            try:
                return os.open(path, flags | _O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        return os.open(path, flags, 0o666)

    def write(self, data: torch.Tensor | bytes) -> None:
        """Append ``data``: bytes, or a CPU tensor's raw bytes (as stored: little-endian, C order). A tensor may
        be written from its own memory after this returns: the caller must not modify it in place."""
        source = _as_bytes(data)
        taken, total = 0, source.numel()
        if not self.direct:
            if total:
                self._submit(source)
            self.size += total
            return
        if self._filled % DIRECT_IO_BLOCK == 0 and total >= DIRECT_IO_BLOCK and source.data_ptr() % DIRECT_IO_BLOCK == 0:
            if self._filled:  # whole blocks staged before it (a padded header): written first, as they are
                self._submit_stage(self._filled)
            taken = total - total % DIRECT_IO_BLOCK
            self._submit(source[:taken])  # straight from the caller's memory
        while taken < total:
            stage = self._current_stage()
            count = min(total - taken, STAGE - self._filled)
            stage[self._filled:self._filled + count].copy_(source[taken:taken + count])  # releases the GIL
            self._filled += count
            taken += count
            if self._filled == STAGE:
                self._submit_stage(STAGE)
        self.size += total

    def close(self) -> None:
        """Write what is staged, wait for every write, and close the file at its exact length."""
        if self.fd < 0:
            return
        try:
            if self._filled:
                tail = self._filled
                padded = -(-tail // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK
                self._stage[tail:padded].zero_()
                self._submit_stage(padded)
            while self._in_flight:
                self._retire_oldest()
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop writing (writes in flight finish; nothing more is written) and close the file."""
        for future, _, _ in self._in_flight:
            future.cancel()
        try:
            for future, _, _ in self._in_flight:
                if not future.cancelled():
                    future.exception()
        finally:
            self._in_flight.clear()
            self._release()

    # -- submitting and retiring writes -------------------------------------------------------------------------
    def _submit(self, piece: torch.Tensor, stage: torch.Tensor | None = None) -> None:
        """Write ``piece`` (uint8; a view of ``stage`` when staged) at the current offset, in the I/O thread;
        first wait while too much is queued."""
        while self._in_flight and self._in_flight_bytes + piece.numel() > IN_FLIGHT_BYTES:
            self._retire_oldest()
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbmerge-direct-write")
        self._in_flight.append((self._io.submit(self._pwrite, piece, self._offset), piece.numel(), stage))
        self._in_flight_bytes += piece.numel()
        self._offset += piece.numel()

    def _submit_stage(self, length: int) -> None:
        stage, self._stage, self._filled = self._stage, None, 0
        self._submit(stage[:length], stage)

    def _retire_oldest(self) -> None:
        future, nbytes, stage = self._in_flight.popleft()
        self._in_flight_bytes -= nbytes
        future.result()
        if stage is not None:
            self._free_stages.append(stage)

    def _current_stage(self) -> torch.Tensor:
        if self._stage is None:
            while not self._free_stages and self._allocated >= DEPTH:
                self._retire_oldest()
            if self._free_stages:
                self._stage = self._free_stages.pop()
            else:
                self._stage = torch.frombuffer(mmap.mmap(-1, STAGE), dtype=torch.uint8)  # page-aligned
                self._allocated += 1
            self._filled = 0
        return self._stage

    def _pwrite(self, piece: torch.Tensor, offset: int) -> None:
        view = memoryview(piece.numpy())
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    self._stop_direct()  # the device wants a coarser alignment than DIRECT_IO_BLOCK: use the cache
                    continue
                raise OutputWriteError(exc.errno, f"{self.path}: writing the output failed ({exc.strerror}); "
                                                  f"nothing was left in place of the output") from None

    def _stop_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._free_stages.clear()
        self._stage = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
