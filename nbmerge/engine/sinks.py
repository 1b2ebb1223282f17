"""Where merged tensors go: a dict in memory, or a model folder (or one file) written atomically.

A folder is written into a hidden temporary sibling and renamed into place only once complete, so an
interrupted or failed merge never leaves a half-written output that looks finished. Shards are laid out up front
from the plan (``shard_size`` bytes at most each, a larger tensor alone in its shard), each shard's header is
written before its data, and tensors stream to disk from a writer thread as they are merged.

The temporary sibling, ``.<out>.partial-XXXX``, is claimed, locked through the final rename and installed by
``nbmerge.io.output_claim`` (two merges to one output at once: the second is refused; an overwrite is journaled,
so a killed merge leaves the old or the new output whole, and the next merge to ``out`` finishes or undoes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch

from nbmerge.errors import OutputWriteError, ParameterError
from nbmerge.io.output_claim import OutputClaim
from nbmerge.io.safetensors import INDEX_FILE, ShardWriter, shard_names, split_layout
from nbmerge.io.untrusted import CONFIG_FILES, TOKENIZER_FILES, copy_model_file
from nbmerge.model_card import CardSource, read_config

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

    def finish(self, before_install=lambda: None) -> None:
        before_install()

    def abort(self) -> None:
        self.state_dict.clear()


class FolderSink:
    """Writes ``out`` (a folder, or a single file when it ends in .safetensors) atomically; ``layout`` lists every
    output tensor as (name, dtype, shape) in the order ``put`` receives them. A folder gets the config files of
    ``config_folder`` (config.json with ``config_edits`` applied, and the output dtype) and the tokenizer files of
    ``tokenizer_folder`` (default: the config folder), with ``chat_template`` (text) as its chat template when
    given (chat_template.jinja; any other copy of a template removed, so that one is read). ``card`` (a
    ``nbmerge.model_card.CardSource``) gives the folder its README.md model card (with ``evaluation`` when given)
    and the recipe as the user wrote it.

    The output is claimed (``nbmerge.io.output_claim``) when the sink is made and installed by ``finish``; any
    exception, in the constructor, ``put`` or ``finish``, and ``abort`` release the claim (the temporary folder
    deleted, its lock closed), and an OSError while writing is an OutputWriteError naming the file."""

    def __init__(self, out: Path, layout: list[tuple[str, torch.dtype, tuple]], recipe: dict, shard_size: int,
                 overwrite: bool, config_folder: Path | None, tokenizer_folder: Path | None = None,
                 config_edits: dict | None = None, chat_template: str | None = None, card: CardSource | None = None,
                 evaluation: Any = None):
        self.out = out
        self.single_file = out.suffix == ".safetensors"
        self.recipe, self.config_folder = recipe, config_folder
        self.tokenizer_folder = tokenizer_folder or config_folder
        self.config_edits = dict(config_edits or {})
        self.chat_template = chat_template
        self.card, self.evaluation = card, evaluation
        self.bytes_written = 0
        self._writers: list[ShardWriter] = []
        self._thread: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future, Path]] = deque()
        self._claim = OutputClaim(out, overwrite)
        self.partial = self._claim.folder
        try:
            metadata = {"format": "pt", "nbmerge_recipe": json.dumps(recipe, sort_keys=True)}
            shards = [layout] if self.single_file else split_layout(layout, shard_size)
            for name, shard in zip(shard_names(len(shards)), shards):
                with writing(self.partial / name):
                    self._writers.append(ShardWriter(self.partial / name, shard, metadata))
            self._writer_of = {entry[0]: writer for writer in self._writers for entry in writer.layout}
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbmerge-write")
        except BaseException:
            self.abort()
            raise

    def put(self, name: str, tensor: torch.Tensor) -> None:
        writer = self._writer_of[name]
        self._pending.append((self._thread.submit(writer.write, name, tensor), writer.path))
        self.bytes_written += tensor.numel() * tensor.element_size()
        while len(self._pending) > PENDING_WRITES:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, path = self._pending.popleft()
        with writing(path):
            future.result()

    def finish(self, before_install=lambda: None) -> None:
        """Wait for every write, add the index, config, tokenizer and recipe files, call ``before_install`` (which
        may still refuse the output by raising: the inputs' last check), and move the folder into place."""
        while self._pending:
            self._wait_oldest()
        self._thread.shutdown()
        for writer in self._writers:
            with writing(writer.path):
                writer.close()
        if not self.single_file:
            if len(self._writers) > 1:
                weight_map = {entry[0]: w.path.name for w in self._writers for entry in w.layout}
                index = {"metadata": {"total_size": sum(w.data_bytes for w in self._writers)},
                         "weight_map": weight_map}
                self._write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
            self._copy_config_files()
            self._write_text(RECIPE_FILE, json.dumps(self.recipe, indent=2) + "\n")
            if self.card is not None:
                card_files = self.card.files(self.recipe, read_config(self.partial), self.out.name, self.evaluation)
                for name, text in card_files.items():
                    self._write_text(name, text)
        before_install()
        self._claim.install(self._writers[0].path.name if self.single_file else None)

    def abort(self) -> None:
        """Stop writing and delete the temporary folder; the claim is released whatever fails on the way."""
        try:
            for future, _ in self._pending:
                future.cancel()
            if self._thread is not None:
                self._thread.shutdown(wait=True)
            for writer in self._writers:
                with contextlib.suppress(Exception):
                    writer.abort()
        finally:
            self._pending.clear()
            self._claim.release()

    def _write_text(self, name: str, text: str) -> None:
        with writing(self.partial / name):
            (self.partial / name).write_text(text)

    def _copy_config_files(self) -> None:
        for folder, names in ((self.config_folder, CONFIG_FILES), (self.tokenizer_folder, TOKENIZER_FILES)):
            for name in names if folder is not None else ():
                with writing(self.partial / name):
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
        self._write_text("config.json", json.dumps(config, indent=2) + "\n")


    def _write_chat_template(self) -> None:
        (self.partial / "chat_template.json").unlink(missing_ok=True)
        tokenizer_config = self.partial / "tokenizer_config.json"
        if tokenizer_config.exists():
            settings = json.loads(tokenizer_config.read_text())
            if settings.pop("chat_template", None) is not None:
                self._write_text("tokenizer_config.json", json.dumps(settings, indent=2) + "\n")
        self._write_text("chat_template.jinja", self.chat_template)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` (full disk, no inode left, too many open files, an I/O error) becomes an
    OutputWriteError naming it."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"{path}: writing the output failed ({exc.strerror or exc}); nothing "
                                          f"was left in place of the output") from None


def copy_model_folder(folder: Path, out: Path, overwrite: bool, files: dict[str, str]) -> Path:
    """Copy a written model (a folder, or one .safetensors file) to ``out`` as an output is written (claimed,
    installed atomically), with ``files`` (name -> text) written over the copy's; ``out`` the model itself: only
    ``files`` are replaced, each atomically."""
    if out.resolve() == folder.resolve():
        for name, text in files.items():
            staged = out / f".{name}.partial"
            with writing(staged):
                staged.write_text(text)
                os.replace(staged, out / name)
        return out
    claim = OutputClaim(out, overwrite)
    try:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    with writing(claim.folder / entry.name):
                        shutil.copy2(entry, claim.folder / entry.name)
            for name, text in files.items():
                with writing(claim.folder / name):
                    (claim.folder / name).write_text(text)
            claim.install()
        else:
            with writing(claim.folder / out.name):
                shutil.copy2(folder, claim.folder / out.name)
            claim.install(out.name)
    finally:
        claim.release()
    return out
