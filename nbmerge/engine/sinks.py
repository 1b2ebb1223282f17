"""Where merged tensors go: a dict in memory, or a model folder (or one file) written atomically.

A folder is written into a hidden temporary sibling and renamed into place only once complete, so an
interrupted or failed merge never leaves a half-written output that looks finished. Shards are laid out up front
from the plan (``shard_size`` bytes at most each, a larger tensor alone in its shard), each shard's header is
written before its data, and tensors stream to disk from a writer thread as they are merged.

The temporary sibling, ``.<out>.partial-XXXX``, is held under an exclusive ``flock`` while its merge runs. A
merge to ``out`` first looks at the siblings of that name: a locked one means another merge is writing ``out``
now (refused: two merges to one output at once); an unlocked one was left by a merge that was killed (SIGKILL,
power loss) and is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from nbmerge.errors import OutputExistsError, OutputWriteError, ParameterError
from nbmerge.io.safetensors import INDEX_FILE, ShardWriter, shard_names, split_layout
from nbmerge.io.untrusted import CONFIG_FILES, TOKENIZER_FILES, copy_model_file

RECIPE_FILE = "nbmerge_recipe.json"
PENDING_WRITES = 2
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a text like "5GB", "500MiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = str(size).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ParameterError(f"shard_size: cannot read {size!r} as a size (e.g. 5GB, 500MiB, 1000000)") from None
    if value <= 0:
        raise ParameterError(f"shard_size must be positive, got {size!r}")
    return int(value)


class MemorySink:
    def __init__(self):
        self.state_dict: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.state_dict[name] = tensor

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        self.state_dict.clear()


class FolderSink:
    """Writes ``out`` (a folder, or a single file when it ends in .safetensors) atomically; ``layout`` lists every
    output tensor as (name, dtype, shape) in the order ``put`` receives them. A folder gets the config files of
    ``config_folder`` (config.json with ``config_edits`` applied, and the output dtype) and the tokenizer files of
    ``tokenizer_folder`` (default: the config folder), with ``chat_template`` (text) as its chat template when
    given (chat_template.jinja; any other copy of a template removed, so that one is read)."""

    def __init__(self, out: Path, layout: list[tuple[str, torch.dtype, tuple]], recipe: dict, shard_size: int,
                 overwrite: bool, config_folder: Path | None, tokenizer_folder: Path | None = None,
                 config_edits: dict | None = None, chat_template: str | None = None):
        self.out = out
        self.single_file = out.suffix == ".safetensors"
        check_output_free(out, overwrite)
        self.recipe, self.config_folder = recipe, config_folder
        self.tokenizer_folder = tokenizer_folder or config_folder
        self.config_edits = dict(config_edits or {})
        self.chat_template = chat_template
        self.bytes_written = 0
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.partial, self._lock = claim_partial(out)
        except OutputExistsError:
            raise
        except OSError as exc:  # a read-only or full file system, a missing permission
            raise OutputWriteError(f"{out}: cannot create the output there ({exc.strerror or exc})") from None
        metadata = {"format": "pt", "nbmerge_recipe": json.dumps(recipe, sort_keys=True)}
        shards = [layout] if self.single_file else split_layout(layout, shard_size)
        self._writers = [ShardWriter(self.partial / name, shard, metadata)
                         for name, shard in zip(shard_names(len(shards)), shards)]
        self._writer_of = {entry[0]: writer for writer in self._writers for entry in writer.layout}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbmerge-write")
        self._pending: deque[Future] = deque()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._pending.append(self._thread.submit(self._writer_of[name].write, name, tensor))
        self.bytes_written += tensor.numel() * tensor.element_size()
        while len(self._pending) > PENDING_WRITES:
            self._pending.popleft().result()

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._thread.shutdown()
        for writer in self._writers:
            writer.close()
        if self.single_file:
            os.replace(self._writers[0].path, self.out)
            shutil.rmtree(self.partial)
            os.close(self._lock)
            return
        if len(self._writers) > 1:
            weight_map = {entry[0]: w.path.name for w in self._writers for entry in w.layout}
            index = {"metadata": {"total_size": sum(w.data_bytes for w in self._writers)}, "weight_map": weight_map}
            (self.partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self._copy_config_files()
        (self.partial / RECIPE_FILE).write_text(json.dumps(self.recipe, indent=2) + "\n")
        _move_into_place(self.partial, self.out)
        os.close(self._lock)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._thread.shutdown(wait=True)
        for writer in self._writers:
            writer.abort()
        shutil.rmtree(self.partial, ignore_errors=True)
        os.close(self._lock)

    def _copy_config_files(self) -> None:
        for folder, names in ((self.config_folder, CONFIG_FILES), (self.tokenizer_folder, TOKENIZER_FILES)):
            for name in names if folder is not None else ():
                copy_model_file(folder, name, self.partial / name)  # links kept inside the model's repository
        if self.chat_template is not None:
            self._write_chat_template()
        edits = dict(self.config_edits)
        out_dtype = self.recipe.get("out_dtype")
        config_path = self.partial / "config.json"
        if not config_path.exists() or not (edits or out_dtype):
            return
        config = json.loads(config_path.read_text())
        if out_dtype:
            edits.update({key: out_dtype for key in ("torch_dtype", "dtype") if key in config})
        config.update(edits)
        config_path.write_text(json.dumps(config, indent=2) + "\n")


    def _write_chat_template(self) -> None:
        (self.partial / "chat_template.json").unlink(missing_ok=True)
        tokenizer_config = self.partial / "tokenizer_config.json"
        if tokenizer_config.exists():
            settings = json.loads(tokenizer_config.read_text())
            if settings.pop("chat_template", None) is not None:
                tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
        (self.partial / "chat_template.jinja").write_text(self.chat_template)


def check_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and out.is_dir() != (out.suffix != ".safetensors"):
        raise OutputExistsError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; "
                                f"it cannot be replaced by a merged {'file' if out.is_dir() else 'folder'}")


def claim_partial(out: Path, kind: str = "partial") -> tuple[Path, int]:
    """A new temporary sibling of ``out``, ``.<out>.<kind>-XXXX``, locked (its descriptor is returned), after the
    siblings of that kind left by killed merges to ``out`` are removed; OutputExistsError if another merge is
    writing ``out`` now. (kind "intermediates": a recipe chain's intermediate merges, nbmerge.recipe_chain.)

    The folder is created and locked under a ``.starting-`` name and only then renamed to ``.<kind>-``, so a
    merge that scans the ``.<kind>-`` siblings never sees one whose writer has not locked it yet."""
    prefix = f".{out.name}.{kind}-"  # matched by name: an output name may hold glob characters
    for sibling in sorted(out.parent / name for name in os.listdir(out.parent) if name.startswith(prefix)):
        try:
            fd = _lock_dir(sibling, wait=False)
        except FileNotFoundError:  # its merge just finished and moved it into place
            continue
        if fd is None:
            raise OutputExistsError(f"another merge is writing {out} now (its temporary folder {sibling.name}); "
                                    f"wait for it, or choose another output")
        shutil.rmtree(sibling, ignore_errors=True)  # left by a merge that was killed
        os.close(fd)
    starting = Path(tempfile.mkdtemp(prefix=f".{out.name}.starting-", dir=out.parent))
    fd = _lock_dir(starting, wait=True)
    partial = starting.with_name(starting.name.replace(".starting-", f".{kind}-", 1))
    os.rename(starting, partial)
    return partial, fd


def _lock_dir(folder: Path, wait: bool) -> int | None:
    """An exclusive flock on ``folder`` (its descriptor), or None if another holder has it and ``wait`` is false."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an existing ``out`` (overwrite) is moved aside first, then removed."""
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, aside / out.name)
        os.replace(partial, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(partial, out)
