"""Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``), loaded as untrusted files.

torch's ``weights_only=True`` unpickler accepts torch's own list of globals and also every class the user's
session added with ``torch.serialization.add_safe_globals`` — a list that is the user's choice for their own
files, not for a checkpoint downloaded from elsewhere. So nbmerge reads the pickle's opcodes first
(``pickletools``, nothing executed) and refuses any global outside torch's built-in list
(``_weights_only_unpickler._get_allowed_globals``: tensors, storages, OrderedDict, ...), and any opcode that
imports otherwise (STACK_GLOBAL, INST, OBJ, EXT*), before torch unpickles anything. The old tar format
(torch < 0.4) is refused.

``load_checkpoint`` memory-maps a zip checkpoint only where the caller holds a read lease on it
(``nbmerge.io.leases``): a file truncated under a mapping would kill the process with SIGBUS; without a lease
its storages are read into memory.
"""

from __future__ import annotations

import io
import pickletools
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from nbmerge.errors import ModelInputError, shown

IMPORTING_OPCODES = ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4")
LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, storage keys; then raw storage bytes


def allowed_globals() -> frozenset[str]:
    """torch's built-in weights-only allow-list (not including what ``add_safe_globals`` added)."""
    from torch import _weights_only_unpickler

    return frozenset(_weights_only_unpickler._get_allowed_globals())


def check_globals(file, where: str) -> None:
    """Refuse a checkpoint whose pickles import anything outside ``allowed_globals`` (``file`` is rewound)."""
    allowed = allowed_globals()
    file.seek(0)
    if zipfile.is_zipfile(file):
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            pickles = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        for data in pickles:
            _check_opcodes(io.BytesIO(data), allowed, where)
    else:
        file.seek(0)
        try:
            is_tar = tarfile.is_tarfile(file)
        except (OSError, EOFError):
            is_tar = False
        if is_tar:
            raise ModelInputError(f"{where}: a tar checkpoint (torch < 0.4); nbmerge does not read this format")
        file.seek(0)
        for _ in range(LEGACY_PICKLES):
            _check_opcodes(file, allowed, where)
    file.seek(0)


def _check_opcodes(stream, allowed: frozenset[str], where: str) -> None:
    try:
        for opcode, argument, _ in pickletools.genops(stream):
            if opcode.name in IMPORTING_OPCODES:
                raise ModelInputError(f"{where} could not be loaded as a weights-only checkpoint: its pickle "
                                      f"uses {opcode.name}, which nbmerge does not allow")
            if opcode.name == "GLOBAL":
                full = ".".join(str(argument).split(" ", 1))
                if full not in allowed:
                    raise ModelInputError(f"{where} could not be loaded as a weights-only checkpoint: it imports "
                                          f"{shown(full)}, which is not one of torch's weights-only globals "
                                          f"(a class allowed with add_safe_globals is not trusted in a model "
                                          f"file)")
    except ModelInputError:
        raise
    except Exception as exc:  # pickletools raises ValueError and others on malformed opcodes
        raise ModelInputError(f"{where} could not be loaded as a weights-only checkpoint: its pickle is "
                              f"malformed ({shown(str(exc), 200)[1:-1]})") from None


def load_checkpoint(file, path: Path, label: str, mapped_path: str | None) -> Mapping[str, Any]:
    """The state dict of the open checkpoint ``file`` (its globals checked first); memory-mapped through
    ``mapped_path`` (a path naming the same open file) when given and the format allows."""
    where = f"{label}: {path}"
    check_globals(file, where)
    try:
        loaded = None
        if mapped_path is not None and zipfile.is_zipfile(file):
            file.seek(0)
            loaded = torch.load(mapped_path, map_location="cpu", weights_only=True, mmap=True)
        if loaded is None:
            file.seek(0)
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for malicious or corrupt pickles
        raise ModelInputError(f"{where} could not be loaded as a weights-only checkpoint: "
                              f"{(str(exc).splitlines() or [type(exc).__name__])[0][:300]}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelInputError(f"{where} does not hold a state dict")
    return loaded
