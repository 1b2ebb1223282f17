"""Model inputs, opened for streaming: what tensors a model has (from headers alone) and reading one of them.

Accepted inputs: a ``.safetensors`` file; a Hugging Face model folder (``model.safetensors``, or shards listed by
``model.safetensors.index.json``); a pickle checkpoint (``.bin``/``.pt``/``.pth`` or a folder holding
``pytorch_model.bin``), loaded with ``weights_only=True`` and torch's built-in allow-list only
(``nbmerge.io.pickles``), memory-mapped where a read lease is held; an in-memory state dict; an ``nn.Module``;
any of these with a PEFT LoRA adapter applied (``WithLora``, nbmerge.io.lora). Inputs are never modified. Files
are opened anew for every merge, and every file a merge reads or copies (weights of any format, a shard index,
config and tokenizer files, an adapter's files) is watched from before it is read and checked unchanged before the
output is installed, so a notebook that rewrites a checkpoint between merges never gets stale tensors, and one
rewritten during a merge fails it with nothing written. Files are read as untrusted (``nbmerge.io.untrusted``):
regular files only, a folder's files inside the model's repository; a model file with no tensor, or with FP8 or
complex tensors, is refused by name.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from nbmerge.errors import ModelInputError, shown
from nbmerge.io import leases
from nbmerge.io.buffers import BufferPool
from nbmerge.io.file_watch import FileWatch
from nbmerge.io.mapping import map_tensor, page_cached
from nbmerge.io.pickles import load_checkpoint
from nbmerge.io.safetensors import INDEX_FILE, TensorEntry, read_header, read_tensor
from nbmerge.io.untrusted import CONFIG_FILES, TOKENIZER_FILES, in_repository, load_json, open_regular

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """What the header says of one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * self.numel


class ModelSource:
    """A model opened for streaming. ``label`` names it in errors and recipes; ``folder`` holds its config files."""

    label: str
    folder: Path | None = None
    infos: dict[str, TensorInfo]

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """The tensor ``name``; a file-backed source reads it into a buffer lent by ``pool`` when given."""
        raise NotImplementedError

    def where(self, name: str) -> str:
        """Where ``name`` comes from, for errors: the model's label (and, for a file, the file)."""
        return self.label

    def file_of(self, name: str) -> Path | None:
        """The file that holds ``name`` where the source knows it."""
        return None

    def paths(self) -> list[Path]:
        """The files and folder this model is read from (none for an in-memory model)."""
        return [] if self.folder is None else [self.folder]

    def advise(self, name: str) -> None:
        """Hint that ``name`` will be read soon (a file-backed source starts reading it from disk meanwhile)."""

    def check_unchanged(self) -> None:
        """Raise ModelInputError if a file changed since it was opened (checked before an output is finalised)."""

    def check_no_writer(self) -> None:
        """Raise ModelInputError if another process is waiting to truncate or write an input file (checked once per
        tensor; the file's read lease holds that process back until this source closes)."""

    def release_leases(self) -> None:
        """Give up the files' read leases (``nbmerge.io.leases``) until ``take_leases``."""

    def take_leases(self) -> None:
        """Take a read lease on each file where one can be taken."""

    def close(self) -> None:
        """Release open files."""


class SourceView(ModelSource):
    """A view of another source (a layer window, rows permuted to another vocabulary): reads, files, checks and
    leases go to ``source`` under ``inner(name)``; its owner opens and closes ``source``."""

    def __init__(self, source: ModelSource):
        self.source = source
        self.label, self.folder = source.label, source.folder

    def inner(self, name: str) -> str:
        """The name of tensor ``name`` in ``source``."""
        return name

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        return self.source.read(self.inner(name), pool)

    def where(self, name: str) -> str:
        return self.source.where(self.inner(name))

    def file_of(self, name: str) -> Path | None:
        return self.source.file_of(self.inner(name))

    def paths(self) -> list[Path]:
        return self.source.paths()

    def advise(self, name: str) -> None:
        self.source.advise(self.inner(name))

    def check_unchanged(self) -> None:
        self.source.check_unchanged()

    def check_no_writer(self) -> None:
        self.source.check_no_writer()

    def release_leases(self) -> None:
        self.source.release_leases()

    def take_leases(self) -> None:
        self.source.take_leases()


class FileBackedSource(ModelSource):
    """A model read from files: each is watched for change (``nbmerge.io.file_watch``) from before its first byte
    is read, opened as a regular file only (``open_regular``: a FIFO, socket or device is refused, never blocks),
    kept open and read-leased (``nbmerge.io.leases``); the files of its folder that a merge copies to its output
    (config and tokenizer files) and a shard index are watched too. ``check_unchanged`` names the first that
    changed."""

    def _watch_files(self, files: list[Path], also: list[Path]) -> None:
        """Watch ``files`` (opened and leased) and ``also`` (their index, adapter config, ...), then the folder's
        config and tokenizer files that exist."""
        self._watch = FileWatch()
        self._files: dict[Path, Any] = {}
        self._leased: list = []
        try:
            for path in [*files, *also, *self._folder_files()]:
                self._watch.add(path)
            for path in files:
                self._files[path] = open_regular(path, self.label)
        except BaseException:
            self.close()
            raise
        self.take_leases()

    def _folder_files(self) -> list[Path]:
        if self.folder is None:
            return []
        return [self.folder / name for name in (*CONFIG_FILES, *TOKENIZER_FILES) if (self.folder / name).is_file()]

    def paths(self) -> list[Path]:
        return list(self._files) + ([] if self.folder is None else [self.folder])

    def check_unchanged(self) -> None:
        changed = self._watch.changed()
        if changed is not None:
            raise ModelInputError(f"{changed}: the file changed while it was being merged ({self.label}); nothing "
                                  f"was written; merge again")

    def check_no_writer(self) -> None:
        for path, f in self._files.items():  # by path: a file from open_regular is named by its descriptor
            if any(f is held for held in self._leased) and leases.breaking(f.fileno()):
                raise ModelInputError(f"{path}: this input is being truncated or written (by another process "
                                      f"or thread) while it is merged; the merge stopped and nothing was written "
                                      f"(the writer goes on now)")

    def take_leases(self) -> None:
        if not self._leased:  # idempotent: several layer windows share one source
            self._leased = [f for f in self._files.values() if leases.take(f.fileno())]

    def release_leases(self) -> None:
        for f in self._leased:
            leases.release(f.fileno())
        self._leased = []

    def close(self) -> None:
        self.release_leases()
        for f in self._files.values():
            f.close()
        self._watch.close()


class SafetensorsSource(FileBackedSource):
    def __init__(self, files: list[Path], label: str, folder: Path | None, also_watch: tuple[Path, ...] = ()):
        self.label, self.folder = label, folder
        self._entries: dict[str, TensorEntry] = {}
        if not files:
            raise ModelInputError(f"{label}: no safetensors file to read")
        self._watch_files(files, list(also_watch))
        try:
            for path in files:
                entries, _ = read_header(path)
                for name, entry in entries.items():
                    if name in self._entries:
                        raise ModelInputError(f"{label}: tensor {shown(name)} appears in both "
                                              f"{self._entries[name].path.name} and {path.name}")
                    self._entries[name] = entry
        except BaseException:
            self.close()
            raise
        self.infos = {name: TensorInfo(e.dtype, e.shape) for name, e in self._entries.items()}
        self._mappable = True

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        entry = self._entries[name]
        if self._mappable:
            try:
                return map_tensor(self._files[entry.path], entry)
            except OSError:  # a file system that cannot map: read from now on
                self._mappable = False
        return read_tensor(self._files[entry.path], entry, pool)

    def where(self, name: str) -> str:
        return f"{self.label} ({self._entries[name].path})"

    def file_of(self, name: str) -> Path | None:
        return self._entries[name].path

    def advise(self, name: str) -> None:
        """posix_fadvise(WILLNEED) on the tensor's bytes, unless its last byte is already in the page cache.

        The advice walks the page cache over its range in the calling (engine's) thread: ~0.1 ms a tensor even
        when every page is cached, once per input, tensor and pass (a model-scope TIES merge of the large speed
        set, warm: 3200 calls, 0.3 s of the thread that merges). ``mincore`` on the page of the tensor's last
        byte tells (~10 µs, reading nothing); the last byte, because the readahead of the tensor before often
        reaches into the start of this one."""
        entry = self._entries[name]
        if not entry.nbytes or not hasattr(os, "posix_fadvise"):
            return
        file = self._files[entry.path]
        if not page_cached(file, entry.end - 1):
            os.posix_fadvise(file.fileno(), entry.start, entry.nbytes, os.POSIX_FADV_WILLNEED)


class StateDictSource(ModelSource):
    def __init__(self, state_dict: Mapping[str, Any], label: str, folder: Path | None = None):
        self.label, self.folder = label, folder
        self._tensors = {}
        for name, value in state_dict.items():
            if not isinstance(name, str):
                raise ModelInputError(f"{label}: a state dict key is a {type(name).__name__}, not a tensor name: "
                                      f"{shown(name)}")
            if not isinstance(value, torch.Tensor):
                raise ModelInputError(f"{label}: entry {shown(name)} is a {type(value).__name__}, not a tensor")
            unmergeable = unmergeable_kind(value)
            if unmergeable:
                raise ModelInputError(f"{label}: tensor {shown(name)} is {unmergeable}; nbmerge merges dense real "
                                      f"tensors (convert it first)")
            self._tensors[name] = value.detach()
        self.infos = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        return self._tensors[name]


class PickleSource(FileBackedSource, StateDictSource):
    """Pickle checkpoints, which are untrusted (``nbmerge.io.pickles``: ``weights_only=True`` with torch's
    built-in allow-list only, opcodes checked before unpickling). Like a safetensors file, each is watched, kept
    open and read-leased; memory-mapped only where every file holds a read lease (a truncation then waits, and the
    merge stops with an error instead of a SIGBUS), read into memory otherwise."""

    def __init__(self, files: list[Path], label: str, folder: Path | None, also_watch: tuple[Path, ...] = ()):
        self.label, self.folder = label, folder
        self._tensors = {}
        self._watch_files(files, list(also_watch))
        try:
            mapped = len(self._leased) == len(self._files) and Path("/proc/self/fd").is_dir()
            merged: dict[str, Any] = {}
            for path, f in self._files.items():
                merged.update(load_checkpoint(f, path, label, f"/proc/self/fd/{f.fileno()}" if mapped else None))
            StateDictSource.__init__(self, merged, label, folder)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._tensors = {}  # the mapped storages go before their files close
        super().close()


def unmergeable_kind(tensor: torch.Tensor) -> str | None:
    """What makes ``tensor`` one nbmerge cannot merge (sparse, meta, quantized, complex, FP8), or None."""
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    if tensor.is_meta:
        return "a meta tensor (shape only, no values)"
    if tensor.is_quantized:
        return "a quantized tensor"
    return unmergeable_dtype(tensor.dtype)


def unmergeable_dtype(dtype: torch.dtype) -> str | None:
    """FP8 values go with scale tensors (per tensor or per block) that a merge of the raw values would ignore;
    complex numbers have no order for TIES, DARE, etc.: both are refused by name."""
    if dtype.is_complex:
        return f"complex ({dtype})"
    if dtype.is_floating_point and dtype.itemsize == 1:
        return (f"FP8 ({str(dtype).removeprefix('torch.')}), whose values go with scale tensors a merge would "
                f"ignore; dequantize the model to bfloat16 first")
    return None


def open_model(model: Any, label: str) -> ModelSource:
    """Open one model input for streaming; raise ModelInputError naming the input if it cannot be."""
    opens_itself = getattr(model, "open_source", None)  # e.g. nbmerge.io.lora.WithLora
    if callable(opens_itself):
        return opens_itself(label)
    if isinstance(model, torch.nn.Module):
        return StateDictSource(model.state_dict(), label)
    if isinstance(model, Mapping):
        return StateDictSource(model, label)
    if isinstance(model, (str, os.PathLike)):
        from nbmerge.io.hub import hub_folder, is_hub_id

        path = hub_folder(model, label) if is_hub_id(model) else Path(model).expanduser()
        source = _open_path(path, label)
        if not source.infos:
            source.close()
            raise ModelInputError(f"{label}: {model} holds no tensors")
        for name, info in source.infos.items():
            unmergeable = unmergeable_dtype(info.dtype)
            if unmergeable:
                source.close()
                raise ModelInputError(f"{source.where(name)}: tensor {shown(name)} is {unmergeable}")
        return source
    raise ModelInputError(f"{label}: expected a path, a state dict, an nn.Module or a WithLora, got "
                          f"{type(model).__name__}")


def _open_path(path: Path, label: str) -> ModelSource:
    if path.is_dir():
        return _open_folder(path, label)
    if not path.exists():
        raise ModelInputError(f"{label}: no such file or folder: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsSource([path], label, None)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleSource([path], label, None)
    raise ModelInputError(f"{label}: {path} is neither a .safetensors file, a pickle checkpoint "
                          f"({', '.join(PICKLE_SUFFIXES)}) nor a model folder")


def _open_folder(folder: Path, label: str) -> ModelSource:
    """A model folder; each file it reads resolves inside the model's repository (``in_repository``: the folder,
    or the ``models--org--name`` folder of a Hugging Face cache snapshot)."""
    for index_name, opener in ((INDEX_FILE, SafetensorsSource),
                               ("pytorch_model.bin.index.json", PickleSource)):
        index_path = folder / index_name
        if index_path.exists() or index_path.is_symlink():
            weight_map = _index_weight_map(index_path, label)
            source = opener(list(dict.fromkeys(weight_map.values())), label, folder, (index_path,))
            try:
                _check_index(source, weight_map, f"{label}: {index_path}")
            except BaseException:
                source.close()
                raise
            return source
    for name, opener in (("model.safetensors", SafetensorsSource), ("pytorch_model.bin", PickleSource)):
        if (folder / name).exists() or (folder / name).is_symlink():
            return opener([in_repository(folder, name, label)], label, folder)
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return SafetensorsSource([in_repository(folder, path.name, label) for path in found], label, folder)
    raise ModelInputError(f"{label}: the folder {folder} holds no model.safetensors, "
                          f"model.safetensors.index.json, pytorch_model.bin or *.safetensors file")


def _index_weight_map(index_path: Path, label: str) -> dict[str, Path]:
    """{tensor: shard file} of a shard index, each shard a file named in the index's folder whose links resolve
    inside the model's repository (a name that climbs out with ``..``, an absolute path or a link to elsewhere is
    refused: an index must not read other files; a Hugging Face cache snapshot's links to its blobs are the
    model's own). An index with no tensor is refused."""
    folder = index_path.parent
    in_repository(folder, index_path.name, label)
    index = load_json(index_path, label)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if weight_map is None:
        raise ModelInputError(f"{label}: {index_path} is not a valid shard index (no weight_map)")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ModelInputError(f"{label}: {index_path}: weight_map must map tensor names to shard file names")
    if not weight_map:
        raise ModelInputError(f"{label}: {index_path}: weight_map is empty (an index must list every tensor)")
    shards: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).is_absolute() or len(Path(shard).parts) != 1 or shard in (".", ".."):
            raise ModelInputError(f"{label}: {index_path.name} names a shard outside its folder: {shown(shard)}")
        shards[shard] = folder / shard
    missing = [name for name, path in shards.items() if not path.exists() and not path.is_symlink()]
    if missing:
        raise ModelInputError(f"{label}: {index_path.name} lists shards that do not exist: "
                              f"{', '.join(missing)[:300]}")
    for shard in shards:  # opened by their names in the folder, so that errors name them as the index does
        in_repository(folder, shard, f"{label}: {index_path.name}")
    return {tensor: shards[shard] for tensor, shard in weight_map.items()}


def _check_index(source: ModelSource, weight_map: dict[str, Path], where: str) -> None:
    """Every tensor the index lists is in the shard it names."""
    for tensor, shard in weight_map.items():
        if tensor not in source.infos:
            raise ModelInputError(f"{where} lists tensor {shown(tensor)} in {shard.name}, which does not hold it")
        found = source.file_of(tensor)
        if found is not None and found != shard:
            raise ModelInputError(f"{where} lists tensor {shown(tensor)} in {shard.name}, but it is in {found.name}")
