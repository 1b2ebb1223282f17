"""A new file written front to back straight to the disk (O_DIRECT), bypassing the page cache.

Why: a buffered ``write`` copies every byte into page-cache pages the kernel allocates for it, and on the VMs
this project runs on, fresh guest memory is slow to touch (the host backs it lazily): writing a 1.5 GB merged
model that way took 1–4.6 s of CPU, varying run to run, where the disk itself takes 1.5 GB in 0.9 s by direct
I/O, with the CPU free meanwhile (``benchmarks/speed.py``). Direct writes also leave the page cache to the
inputs, which a sweep of merges reads again and again.

How: the bytes are copied into a few reused, page-aligned staging buffers of ``STAGE`` bytes; a full buffer is
written at its (aligned) offset by an I/O thread while the next one fills, so the disk never waits for the
copy. The last, partial buffer is written zero-padded to the alignment and the file then truncated to its real
length. Where the file system refuses O_DIRECT (tmpfs, some network file systems: EINVAL at open or at the first
write), the same buffers are written through the page cache instead. ``NBMERGE_DIRECT_WRITE=0`` asks for the
page cache always.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import OutputWriteError

STAGE = 8 * 2**20  # bytes per staging buffer: the disk's full speed (measured 1.7-1.9 GB/s from 8 MiB up)
DEPTH = 3          # staging buffers per file: one filling, up to two being written
ALIGNMENT = 4096   # file offsets, lengths and memory of direct writes (covers 512 B and 4 KiB logical blocks)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_writes_enabled() -> bool:
    return _O_DIRECT != 0 and os.environ.get("NBMERGE_DIRECT_WRITE", "1") != "0"


class DirectFile:
    """``write(bytes-like)`` calls in order, then ``close()`` (or ``abort()``). Not thread-safe: one writer."""

    def __init__(self, path: Path):
        self.path = path
        self.direct = direct_writes_enabled()
        self.fd = self._open(path)
        self.size = 0  # bytes accepted so far
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._stage: torch.Tensor | None = None
        self._stage_offset = 0  # where the current (next) stage goes in the file: stages are STAGE bytes apart
        self._filled = 0        # bytes of the current stage filled
        self._in_flight: deque[tuple[Future, torch.Tensor]] = deque()
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
        """Append ``data``: bytes, or a CPU tensor's raw bytes (as stored: little-endian, C order)."""
        if isinstance(data, torch.Tensor):
            source = data.detach().contiguous().reshape(-1).view(torch.uint8)
        else:
            source = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        taken, total = 0, source.numel()
        while taken < total:
            stage = self._current_stage()
            count = min(total - taken, STAGE - self._filled)
            stage[self._filled:self._filled + count].copy_(source[taken:taken + count])  # releases the GIL
            self._filled += count
            taken += count
            if self._filled == STAGE:
                self._submit(STAGE)
        self.size += total

    def close(self) -> None:
        """Write what is staged, wait for every write, and close the file at its exact length."""
        if self.fd < 0:
            return
        try:
            if self._filled:
                tail = self._filled
                padded = -(-tail // ALIGNMENT) * ALIGNMENT
                self._stage[tail:padded].zero_()
                self._submit(padded)
            self._drain()
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop writing (writes in flight finish; nothing more is written) and close the file."""
        for future, _ in self._in_flight:
            future.cancel()
        try:
            for future, _ in self._in_flight:
                if not future.cancelled():
                    future.exception()
        finally:
            self._in_flight.clear()
            self._release()

    # -- staging ------------------------------------------------------------------------------------------------
    def _current_stage(self) -> torch.Tensor:
        if self._stage is None:
            if self._free:
                self._stage = self._free.pop()
            elif self._allocated < DEPTH:
                self._stage = torch.frombuffer(mmap.mmap(-1, STAGE), dtype=torch.uint8)  # page-aligned
                self._allocated += 1
            else:
                self._stage = self._wait_oldest()
            self._filled = 0
        return self._stage

    def _submit(self, length: int) -> None:
        """Write the current stage's first ``length`` bytes at its offset, in the I/O thread."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbmerge-direct-write")
        stage, self._stage, self._filled = self._stage, None, 0
        self._in_flight.append((self._io.submit(self._pwrite, stage, length, self._stage_offset), stage))
        self._stage_offset += STAGE

    def _pwrite(self, stage: torch.Tensor, length: int, offset: int) -> None:
        view = memoryview(stage.numpy())[:length]
        done = 0
        while done < length:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:
                    self._stop_direct()  # the device wants a coarser alignment than ALIGNMENT: use the cache
                    continue
                raise OutputWriteError(exc.errno, f"{self.path}: writing the output failed ({exc.strerror}); "
                                                  f"nothing was left in place of the output") from None

    def _stop_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False

    def _wait_oldest(self) -> torch.Tensor:
        future, stage = self._in_flight.popleft()
        future.result()
        return stage

    def _drain(self) -> None:
        while self._in_flight:
            self._free.append(self._wait_oldest())

    def _release(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._free.clear()
        self._stage = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
