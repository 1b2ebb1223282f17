"""Whole state dicts: read one from anything a user holds, and check that one fits a module before loading it."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import ModelInputError


def state_dict_of(model: Any) -> Mapping[str, torch.Tensor]:
    """Every tensor of a path (file or folder), a MergeResult or a state dict, by name."""
    from .api import MergeResult
    from .sources import open_model

    if isinstance(model, MergeResult):
        model = model.state_dict if model.state_dict is not None else model.path
    if isinstance(model, Mapping):
        return model
    source = open_model(model, str(model))
    try:
        return {name: source.read(name) for name in source.infos}
    finally:
        source.close()


def check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], what: str,
               noun: str = "weight", allow_extra: bool = True, hint: str = "") -> None:
    """Raise ModelInputError naming the first tensor of ``expected`` (name -> shape) that ``state`` lacks or holds
    in another shape, or (unless ``allow_extra``) the first name ``state`` holds that ``expected`` has not."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise ModelInputError(f"{what} lacks {len(missing)} {noun}(s), e.g. {missing[0]!r}{hint}")
    extra = [] if allow_extra else [key for key in state if key not in expected]
    if extra:
        raise ModelInputError(f"{what} holds {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}{hint}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ModelInputError(f"{what}: tensor {key!r} has shape {tuple(state[key].shape)}, expected "
                                  f"{tuple(shape)}")
