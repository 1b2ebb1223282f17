"""Model inputs, opened for streaming: what tensors a model has (from headers alone) and reading one of them.

Accepted inputs: a ``.safetensors`` file; a Hugging Face model folder (``model.safetensors``, or shards listed by
``model.safetensors.index.json``); a pickle checkpoint (``.bin``/``.pt``/``.pth`` or a folder holding
``pytorch_model.bin``), loaded with ``weights_only=True`` and memory-mapped; an in-memory state dict; an
``nn.Module``; any of these with a PEFT LoRA adapter applied (``WithLora``, nbmerge.io.lora). Inputs are never
modified. Files are opened anew for every merge, and every file a merge reads or copies (weights of any format, a
shard index, config and tokenizer files, an adapter's files) is watched from before it is read and checked
unchanged before the output is installed, so a notebook that rewrites a checkpoint between merges never gets
stale tensors, and one rewritten during a merge fails it with nothing written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from nbmerge.errors import ModelInputError
from nbmerge.io import leases
from nbmerge.io.buffers import BufferPool
from nbmerge.io.file_watch import FileWatch
from nbmerge.io.mapping import map_tensor, page_cached
from nbmerge.io.safetensors import (CONFIG_FILES, INDEX_FILE, TOKENIZER_FILES, TensorEntry, read_header,
                                    read_tensor)

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
    is read, kept open and read-leased (``nbmerge.io.leases``); so are the files of its folder that a merge copies
    to its output (config and tokenizer files) and a shard index. ``check_unchanged`` names the first that
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
                try:
                    self._files[path] = open(path, "rb")
                except OSError as exc:  # no permission, too many open files
                    raise ModelInputError(f"{self.label}: {path}: cannot open it ({exc.strerror or exc})") from None
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
        for f in self._leased:
            if leases.breaking(f.fileno()):
                raise ModelInputError(f"{f.name}: this input is being truncated or written (by another process "
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
        self._watch_files(files, list(also_watch))
        try:
            for path in files:
                entries, _ = read_header(path)
                for name, entry in entries.items():
                    if name in self._entries:
                        raise ModelInputError(f"{label}: tensor {name!r} appears in both "
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
            if not isinstance(value, torch.Tensor):
                raise ModelInputError(f"{label}: entry {name!r} is a {type(value).__name__}, not a tensor")
            self._tensors[name] = value.detach()
        self.infos = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        return self._tensors[name]


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

        return _open_path(hub_folder(model, label) if is_hub_id(model) else Path(model).expanduser(), label)
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
    for index_name, opener in ((INDEX_FILE, SafetensorsSource),
                               ("pytorch_model.bin.index.json", PickleSource)):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = _index_weight_map(index_path, label)
            source = opener(list(dict.fromkeys(weight_map.values())), label, folder, (index_path,))
            _check_index(source, weight_map, f"{label}: {index_path}")
            return source
    if (folder / "model.safetensors").exists():
        return SafetensorsSource([folder / "model.safetensors"], label, folder)
    if (folder / "pytorch_model.bin").exists():
        return PickleSource([folder / "pytorch_model.bin"], label, folder)
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return SafetensorsSource(found, label, folder)
    raise ModelInputError(f"{label}: the folder {folder} holds no model.safetensors, "
                          f"model.safetensors.index.json, pytorch_model.bin or *.safetensors file")


def _index_weight_map(index_path: Path, label: str) -> dict[str, Path]:
    """{tensor: shard file} of a shard index, each shard a file inside the index's folder (a name that climbs out
    with ``..``, an absolute path or a link to elsewhere is refused: an index must not read other files; in a
    Hugging Face cache snapshot a shard links into its repository's blobs/, where every cached file lives)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelInputError(f"{label}: {index_path} is not a valid shard index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ModelInputError(f"{label}: {index_path}: weight_map must map tensor names to shard file names")
    folder = index_path.parent.resolve()
    shards: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        path = index_path.parent / shard
        linked_in_hub_cache = _hub_blob(index_path.parent, path)
        if Path(shard).is_absolute() or (path.resolve().parent != folder and not linked_in_hub_cache):
            raise ModelInputError(f"{label}: {index_path.name} names a shard outside its folder: {shard!r}")
        shards[shard] = path
    missing = [name for name, path in shards.items() if not path.is_file()]
    if missing:
        raise ModelInputError(f"{label}: {index_path.name} lists shards that do not exist: {', '.join(missing)}")
    return {tensor: shards[shard] for tensor, shard in weight_map.items()}


def _hub_blob(folder: Path, shard: Path) -> bool:
    """A shard named directly in a Hugging Face cache snapshot (models--org--name/snapshots/<revision>/) that links
    to a file of the same repository's blobs/ folder, as every cached file does."""
    repository = folder.parent.parent
    return (shard.parent == folder and folder.parent.name == "snapshots" and repository.name.startswith("models--")
            and shard.resolve().is_relative_to((repository / "blobs").resolve()))


def _check_index(source: ModelSource, weight_map: dict[str, Path], where: str) -> None:
    """Every tensor the index lists is in the shard it names."""
    for tensor, shard in weight_map.items():
        if tensor not in source.infos:
            raise ModelInputError(f"{where} lists tensor {tensor!r} in {shard.name}, which does not hold it")
        found = source.file_of(tensor)
        if found is not None and found != shard:
            raise ModelInputError(f"{where} lists tensor {tensor!r} in {shard.name}, but it is in {found.name}")


class PickleSource(FileBackedSource):
    """Pickle checkpoints, which are untrusted: loaded only with ``weights_only=True``, memory-mapped where the
    format allows (so, like a safetensors file, watched and leased: a rewrite during a merge is noticed)."""

    def __init__(self, files: list[Path], label: str, folder: Path | None, also_watch: tuple[Path, ...] = ()):
        self.label, self.folder = label, folder
        self._watch_files(files, list(also_watch))
        try:
            merged: dict[str, Any] = {}
            for path in files:
                merged.update(_load_pickle(path, label))
            self._tensors = StateDictSource(merged, label)
        except BaseException:
            self.close()
            raise
        self.infos = self._tensors.infos

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        return self._tensors.read(name)


def _load_pickle(path: Path, label: str) -> Mapping:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for malicious or corrupt pickles
        raise ModelInputError(f"{label}: {path} could not be loaded as a weights-only checkpoint: "
                              f"{str(exc).splitlines()[0]}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelInputError(f"{label}: {path} does not hold a state dict")
    return loaded
