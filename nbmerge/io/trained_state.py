"""Trained-state files: the tensors a module-building method trained, with the recipe that rebuilds the module.

A safetensors file holding the tensors, and under the metadata key ``nbmerge_recipe`` the recipe as JSON
(method, checked parameters, model names, the split adapted on, and a fingerprint of the base and of every
model), so that loading rebuilds on the same models and refuses others with an error naming the model that
differs. Written atomically: in a locked ``.<name>.partial-XXXX`` folder beside it, renamed into place when
complete (``nbmerge.io.output_claim``: two writers of one file, one is refused; a failure leaves nothing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nbmerge.errors import ModelInputError, OutputExistsError, OutputWriteError, ParameterError, shown
from nbmerge.io.output_claim import OutputClaim
from nbmerge.io.untrusted import open_regular, parse_json

RECIPE_KEY = "nbmerge_recipe"
SAMPLES_PER_TENSOR = 4096


def checked_out_path(out, overwrite: bool) -> Path | None:
    """``out`` as the path of a trained-state file to write: one ``.safetensors`` file, not already there unless
    ``overwrite``; None stays None (nothing is written)."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise ParameterError(f"out={shown(str(out))}: a built module's trained state is one .safetensors file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path


def write_trained(tensors: dict[str, torch.Tensor], recipe: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``recipe`` to a ``.safetensors`` file, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = checked_out_path(path, overwrite)
    stored = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    claim = OutputClaim(path, overwrite)
    try:
        try:
            save_file(stored, str(claim.folder / path.name), metadata={RECIPE_KEY: json.dumps(recipe)})
        except (OSError, SafetensorError) as exc:  # safetensors reports an I/O error as a SafetensorError
            raise OutputWriteError(getattr(exc, "errno", None), f"{path}: writing the trained state failed "
                                   f"({getattr(exc, 'strerror', None) or exc}); nothing was left in its place") from None
        claim.install(path.name)
    finally:
        claim.release()
    return path


def read_trained(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and the recipe of a file written by ``write_trained``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    open_regular(path).close()  # never a FIFO, which safe_open would block on
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ModelInputError(f"{path}: cannot read a trained-state file: {exc}") from None
    if RECIPE_KEY not in metadata:
        raise ModelInputError(f"{path}: not an nbmerge trained-state file (no {shown(RECIPE_KEY)} in its metadata)")
    recipe = parse_json(metadata[RECIPE_KEY], f"{path}: metadata {RECIPE_KEY!r}")
    if not isinstance(recipe, dict):
        raise ModelInputError(f"{path}: metadata {RECIPE_KEY!r} is not a JSON object")
    return tensors, recipe


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's tensors: every name, dtype and shape, and up to 4096 evenly spaced values of each.

    Cheap on any model size, and different for any two models that differ in more than a handful of entries.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        if flat.numel() > SAMPLES_PER_TENSOR:
            flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR).long()]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
