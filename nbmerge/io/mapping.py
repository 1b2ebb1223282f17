"""The C library calls behind reading mapped tensors: ``mmap``/``madvise``/``mincore``/``munmap`` bound through
ctypes (which releases the GIL for the call; Python's ``mmap.madvise`` keeps it), the page-cache probe, and a
tensor mapped from its file's byte range with its pages populated by the reading thread.

These change for other reasons than the file format (``safetensors``): a kernel's advice flags, a libc's
symbols, a file system that cannot map. Everything here degrades: where a call is missing, the probe answers
"not cached" and the populate faults the pages in by reading them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import warnings

import torch

from nbmerge.errors import ModelInputError
from nbmerge.io.safetensors import TensorEntry

_PAGE = mmap.ALLOCATIONGRANULARITY

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+: map the pages in, read-only


def libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    """A function of the C library through ctypes, which releases the GIL for the call; None where the C
    library has none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_MADVISE = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])  # mmap.madvise keeps the GIL

_MMAP = libc_function("mmap", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_long], ctypes.c_void_p)

_MINCORE = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])

_MUNMAP = libc_function("munmap", [ctypes.c_void_p, ctypes.c_size_t])

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
