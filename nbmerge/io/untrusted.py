"""Reading files other people wrote: only regular files, only inside the model's repository, JSON bounded in size
and depth.

Every file nbmerge parses goes through here (safetensors headers, shard indexes, config, tokenizer and adapter
JSON, pickle checkpoints), so that one set of rules holds for all of them:

- ``open_regular``: a FIFO, socket or device is refused before it can block a read (the file is opened with
  O_NONBLOCK and ``fstat`` must say "regular"); a file removed since it was found is a ModelInputError.
- ``in_repository``: a file of a model folder, its symbolic links resolved, must lie inside the model's
  repository: the folder itself, or — for a Hugging Face cache snapshot ``…/models--org--name/snapshots/<rev>/``
  whose files link to ``../../blobs/<sha>`` — that ``models--org--name`` folder. A link to anywhere else (a
  private key, another user's file) is refused, so it is neither read nor copied into an output.
- ``load_json``: at most ``MAX_JSON_BYTES`` bytes and ``MAX_DEPTH`` levels of nesting, integers of at most
  ``MAX_INT_DIGITS`` digits; anything else is a ModelInputError naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from nbmerge.errors import ModelInputError

CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MAX_JSON_BYTES = 256 * 1024 * 1024  # tokenizer.json of large vocabularies: tens of MB
MAX_DEPTH = 64
MAX_INT_DIGITS = 40  # a byte offset or a shape fits in 20; the value is checked where it is used


def open_regular(path: Path, where: str = ""):
    """``path`` opened for binary reading, refused unless it is a regular file (never blocks on a FIFO)."""
    prefix = f"{where}: " if where else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelInputError(f"{prefix}{path}: no such file (removed after it was found?)") from None
    except OSError as exc:
        raise ModelInputError(f"{prefix}{path}: cannot open it ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "not a regular file"
            raise ModelInputError(f"{prefix}{path} is {kind}, not a regular file; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int = MAX_JSON_BYTES, where: str = "") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    with open_regular(path, where) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ModelInputError(f"{where + ': ' if where else ''}{path} holds {size} bytes, more than the "
                                  f"{limit} nbmerge reads from such a file")
        return f.read(limit + 1)[:limit]


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def parse_json(data: bytes | str, where: str, object_pairs_hook: Callable | None = None) -> Any:
    """JSON text parsed with bounded integers, then checked for depth; ModelInputError naming ``where``.
    (Exceptions raised by ``object_pairs_hook`` pass through.)"""
    try:
        value = json.loads(data, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise ModelInputError(f"{where}: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ModelInputError(f"{where}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") \
            from None
    except ValueError as exc:  # a bounded integer, or Python's own limit on integer digits
        raise ModelInputError(f"{where}: not valid JSON ({exc})") from None
    check_depth(value, where)
    return value


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH, error: type = ModelInputError) -> None:
    """Raise ``error`` if lists and mappings nest deeper than ``limit`` (walked without recursion, each shared
    object once)."""
    seen: set[int] = set()
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise error(f"{where}: nested deeper than {limit} levels")
        if id(item) in seen:
            continue
        seen.add(id(item))
        stack.extend((child, depth + 1) for child in children)


def load_json(path: Path, where: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """A bounded JSON file (``read_bytes`` then ``parse_json``)."""
    return parse_json(read_bytes(path, limit, where), f"{where + ': ' if where else ''}{path}")


def load_json_object(path: Path, where: str = "") -> dict:
    """A bounded JSON file that must hold an object."""
    value = load_json(path, where)
    if not isinstance(value, dict):
        raise ModelInputError(f"{where + ': ' if where else ''}{path} does not hold a JSON object")
    return value


def repository_root(folder: Path) -> Path:
    """The folder a model's files must resolve into: the folder (resolved), or for a Hugging Face cache snapshot
    (``…/models--org--name/snapshots/<revision>``) the ``models--org--name`` folder that holds its blobs."""
    resolved = Path(folder).resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return resolved


def in_repository(folder: Path, name: str, where: str = "") -> Path:
    """``folder / name`` with its links resolved, refused (ModelInputError) if that lies outside the model's
    repository (``repository_root``); ``name`` must be a plain relative name without ``..``."""
    prefix = f"{where}: " if where else ""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ModelInputError(f"{prefix}{folder}: {name!r} names a file outside the model folder")
    resolved = (Path(folder) / relative).resolve()
    root = repository_root(folder)
    if resolved != root and root not in resolved.parents:
        raise ModelInputError(f"{prefix}{Path(folder) / name} links outside the model's repository "
                              f"({root}) to {resolved}; nbmerge reads only the model's own files")
    return resolved


def model_file(folder: Path | None, name: str, where: str = "") -> Path | None:
    """``folder / name`` where the model has that file (its links resolved inside the repository, see
    ``in_repository``), else None."""
    if folder is None:
        return None
    path = Path(folder) / name
    if not path.exists() and not path.is_symlink():
        return None
    in_repository(folder, name, where)
    return path


def model_json(folder: Path | None, name: str, where: str = "") -> Any:
    """The bounded JSON of a model's file ``name`` (``load_json``), or None where the model has none."""
    path = model_file(folder, name, where)
    return None if path is None else load_json(path, where)


def model_text(folder: Path | None, name: str, where: str = "") -> str | None:
    """The text of a model's file ``name`` (UTF-8, bounded), or None where the model has none."""
    path = model_file(folder, name, where)
    if path is None:
        return None
    try:
        return read_bytes(path, MAX_JSON_BYTES, where).decode()
    except UnicodeDecodeError:
        raise ModelInputError(f"{where + ': ' if where else ''}{path} is not UTF-8 text") from None


def check_model_files(folder: Path | None, names: tuple[str, ...], where: str = "") -> None:
    """Before a merge writes anything: each of ``names`` the model has lies inside its repository, is a regular
    file of bounded size, and a ``.json`` one holds a JSON object (what ``copy_model_file`` then copies)."""
    for name in names:
        path = model_file(folder, name, where)
        if path is None:
            continue
        if name.endswith(".json"):
            if not isinstance(load_json(path, where), dict):
                raise ModelInputError(f"{where + ': ' if where else ''}{path} does not hold a JSON object")
        else:
            read_bytes(path, MAX_JSON_BYTES, where)


def copy_model_file(folder: Path, name: str, destination: Path) -> bool:
    """Copy the model's file ``name`` (checked as ``check_model_files`` does: inside the repository, a regular
    file) to ``destination``; False where the model has no such file."""
    import shutil

    path = model_file(folder, name)
    if path is None:
        return False
    with open_regular(path) as source, open(destination, "wb") as target:
        shutil.copyfileobj(source, target)
    return True
