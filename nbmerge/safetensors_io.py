"""The safetensors file format, read and written directly so that nothing is buffered beyond one tensor.

Layout: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}`` (plus an
optional ``__metadata__`` of strings), then the raw little-endian tensor bytes. Reading parses the header alone
(all checks run on it before any data is read); each tensor is then mapped (``map_tensor``: a private mapping of
its own byte range, populated by the reading thread, so nothing is copied and the page cache's pages are used as
they are) or, where mapping fails, read with one ``preadv`` into a fresh or a pooled buffer.
Writing knows every output shape up front, so a shard's header is written first and tensors stream after it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .buffers import BufferPool
from .direct_write import ALIGNMENT, DirectFile
from .errors import ModelInputError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range (relative to the file start)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: the tensor entries in file order, and the string metadata."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ModelInputError(f"{path}: not a safetensors file (header length {header_len} "
                                      f"does not fit in {size} bytes)")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise ModelInputError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelInputError(f"{path}: not a safetensors file (header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries = {}
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelInputError(f"{path}: tensor {name!r} has a malformed header entry {spec!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise ModelInputError(f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match its "
                                  f"shape {list(shape)} and dtype {spec['dtype']} (file truncated?)")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].start))
    return ordered, metadata


_PAGE = mmap.ALLOCATIONGRANULARITY
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+: map the pages in, read-only


def _libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    """A function of the C library through ctypes, which releases the GIL for the call; None where the C
    library has none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_MADVISE = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])  # mmap.madvise keeps the GIL
_MMAP = _libc_function("mmap", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_long], ctypes.c_void_p)
_MINCORE = _libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
_MUNMAP = _libc_function("munmap", [ctypes.c_void_p, ctypes.c_size_t])
_MAP_FAILED = ctypes.c_void_p(-1).value


def page_cached(file, offset: int) -> bool:
    """Whether the page holding byte ``offset`` of ``file`` is in the page cache: ``mincore`` on a one-page
    mapping of it (~10 µs; no read, so no readahead started, unlike a RWF_NOWAIT read). False where that cannot
    be asked."""
    if None in (_MMAP, _MINCORE, _MUNMAP):
        return False
    address = _MMAP(None, _PAGE, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), offset - offset % _PAGE)
    if address in (None, _MAP_FAILED):
        return False
    try:
        residency = ctypes.create_string_buffer(1)
        return _MINCORE(address, _PAGE, residency) == 0 and residency.raw[0] & 1 == 1
    finally:
        _MUNMAP(address, _PAGE)


def _populate(mapping: mmap.mmap, address: int) -> None:
    """Map every page of ``mapping`` (which starts at ``address``) in, reading it from disk where it is not
    cached, with the GIL released: through ``mmap.madvise`` a cold populate in the reader thread stopped every
    other Python thread until the disk answered (cold tensor-scope TIES on the large speed set: 15 s, 9 s
    without). Kernels without MADV_POPULATE_READ fault the pages in by reading one byte of each (in torch,
    which also releases the GIL). Pages that cannot be read raise OSError here (the caller then reads the
    tensor with ``preadv``, whose errors name the file) instead of faulting later in a kernel."""
    mapping.madvise(mmap.MADV_SEQUENTIAL)  # large readahead when the pages are not cached
    if _MADVISE is not None:
        if _MADVISE(address, len(mapping), _MADV_POPULATE_READ) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS):  # the pages could not be read (EIO, EFAULT): never touch them
            raise OSError(error, f"populating a mapped tensor: {os.strerror(error)}")
    mapping.madvise(mmap.MADV_WILLNEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(mapping, dtype=torch.uint8)[::_PAGE].sum()


def map_tensor(file, entry: TensorEntry) -> torch.Tensor:
    """The tensor as a private (copy-on-write) mapping of its byte range in ``file``: no copy and no anonymous
    memory. Its pages are mapped in here, in the calling (reader) thread, reading them from disk if they are
    not cached, so the thread that computes on the tensor does not stop on page faults. The mapping lives as
    long as the tensor or a view of it. Raises OSError where the file cannot be mapped (the caller reads it)."""
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if os.fstat(file.fileno()).st_size < entry.end:
        raise ModelInputError(f"{entry.path}: file ended inside a tensor (truncated while reading?)")
    start = entry.start - entry.start % _PAGE
    mapping = mmap.mmap(file.fileno(), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
    with warnings.catch_warnings():  # frombuffer warns for any buffer it cannot prove writable; this one is
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(mapping, dtype=entry.dtype, count=entry.nbytes // entry.dtype.itemsize,
                                offset=entry.start - start)
    _populate(mapping, flat.data_ptr() - (entry.start - start))
    return flat.reshape(entry.shape)


def read_tensor(file, entry: TensorEntry, pool: BufferPool | None = None) -> torch.Tensor:
    """Read one tensor from an open binary file into a new CPU tensor, or into a buffer lent by ``pool``
    (the file is not memory-mapped)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8) if pool is None else pool.empty((entry.nbytes,), torch.uint8)
    if entry.nbytes:
        view = memoryview(buffer.numpy())
        got = os.preadv(file.fileno(), [view], entry.start)
        while got < entry.nbytes:  # short reads happen on some file systems
            more = os.preadv(file.fileno(), [view[got:]], entry.start + got)
            if more == 0:
                raise ModelInputError(f"{entry.path}: file ended inside a tensor (truncated while reading?)")
            got += more
    return buffer.view(entry.dtype).reshape(entry.shape)


class ShardWriter:
    """Writes one safetensors file whose header is known before any tensor data is.

    ``layout`` is the ordered list of (name, dtype, shape); ``write`` must then be called in that order.
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple]], metadata: dict[str, str]):
        self.path = path
        self.layout = layout
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        # the data section starts on an ALIGNMENT boundary (the format allows trailing spaces in the header), so
        # that tensors whose sizes are whole blocks go to the disk straight from their memory (DirectFile)
        encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)
        self.data_bytes = offset
        self._file = DirectFile(path)
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.layout[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"writer expected {expected_name} {dtype} {shape}, got {name} "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
        self._file.write(tensor)
        self._next += 1
        if self._next == len(self.layout):
            self._file.close()  # complete: its staging memory is given back now, not when the last shard is done

    def close(self) -> None:
        if self._next != len(self.layout):
            self._file.abort()
            raise AssertionError(f"{self.path}: closed after {self._next} of {len(self.layout)} tensors")
        if not self.layout:
            self._file.close()

    def abort(self) -> None:
        self._file.abort()
