"""The safetensors file format, read and written directly so that nothing is buffered beyond one tensor.

Layout: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}`` (plus an
optional ``__metadata__`` of strings), then the raw little-endian tensor bytes. Reading parses the header alone
(all checks run on it before any data is read); each tensor is then mapped (``nbmerge.io.mapping.map_tensor``)
or, where mapping fails, read with one ``preadv`` into a fresh or a pooled buffer (``read_tensor``).
Writing knows every output shape up front, so a shard's header is written first and tensors stream after it.
A model too large for one file is sharded as Hugging Face does: ``model-0000i-of-0000n.safetensors`` files and an
index ``model.safetensors.index.json`` mapping every tensor to its shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from nbmerge.errors import ModelInputError, shown
from nbmerge.io.buffers import BufferPool
from nbmerge.io.direct_write import DIRECT_IO_BLOCK, DirectFile
from nbmerge.io.untrusted import open_regular, parse_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"

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
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ModelInputError(f"{path}: not a safetensors file (header length {header_len} "
                                      f"does not fit in {size} bytes)")
            text = f.read(header_len)
    except OSError as exc:
        raise ModelInputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = parse_json(text, f"{path}: header", object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as duplicate:
        raise ModelInputError(f"{path}: the header names tensor {shown(duplicate.args[0])} twice") from None
    except ModelInputError as exc:
        raise ModelInputError(f"{path}: not a safetensors file (header is not JSON: "
                              f"{str(exc).removeprefix(f'{path}: header: ')})") from None
    if not isinstance(header, dict):
        raise ModelInputError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelInputError(f"{path}: the header's __metadata__ must map names to strings")
    data_start = 8 + header_len
    entries = {}
    for name, spec in header.items():
        entry = _entry(path, name, spec, data_start, size)
        entries[name] = entry
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)))
    previous = None
    for name, entry in ordered.items():
        if previous is not None and entry.start < ordered[previous].end and entry.nbytes:
            raise ModelInputError(f"{path}: tensors {shown(previous)} and {shown(name)} overlap in the file "
                                  f"(bytes [{ordered[previous].start - data_start}, {ordered[previous].end - data_start}) "
                                  f"and [{entry.start - data_start}, {entry.end - data_start}))")
        if entry.nbytes:
            previous = name
    return ordered, metadata


def _entry(path: Path, name: str, spec, data_start: int, size: int) -> TensorEntry:
    """One header entry, every field typed and bounded: a known dtype name, a shape of non-negative integers,
    and [begin, end) non-negative integers (not floats, booleans or strings) that fit the file and the shape."""
    malformed = ModelInputError(f"{path}: tensor {shown(name)} has a malformed header entry {shown(spec)}")
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise malformed
    dtype_name, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise malformed
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise malformed
    for field, values in (("shape", shape), ("data_offsets", offsets)):
        for value in values:
            if type(value) is not int or value < 0:  # bool is an int subclass: refused by the type test
                raise ModelInputError(f"{path}: tensor {shown(name)}: {field} must hold non-negative integers, "
                                      f"got {shown(values)}")
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if begin > end or end - begin != expected or data_start + end > size:
        raise ModelInputError(f"{path}: tensor {shown(name)} byte range [{begin}, {end}) does not match its "
                              f"shape {shown(shape)} and dtype {dtype_name} (file truncated?)")
    return TensorEntry(path, dtype, tuple(shape), data_start + begin, data_start + end)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of duplicate keys silently; a safetensors header must name each tensor once."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


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
        # the data section starts on an DIRECT_IO_BLOCK boundary (the format allows trailing spaces in the header), so
        # that tensors whose sizes are whole blocks go to the disk straight from their memory (DirectFile)
        encoded += b" " * (-(8 + len(encoded)) % DIRECT_IO_BLOCK)
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


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names: model.safetensors, or model-0000i-of-0000n.safetensors when sharded."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_layout(layout: list, shard_size: int) -> list[list]:
    """Consecutive groups of (name, dtype, shape) of at most ``shard_size`` bytes (a larger tensor alone)."""
    shards: list[list] = [[]]
    filled = 0
    for entry in layout:
        nbytes = entry[1].itemsize * math.prod(entry[2])
        if shards[-1] and filled + nbytes > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += nbytes
    return shards
