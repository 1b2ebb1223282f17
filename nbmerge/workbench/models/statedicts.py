"""Whole state dicts: every tensor of anything a user holds (a path, a MergeResult, a state dict), by name."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nbmerge.io.sources import open_model
from nbmerge.results import MergeResult


def state_dict_of(model: Any) -> Mapping[str, torch.Tensor]:
    """Every tensor of a path (file or folder), a MergeResult or a state dict, by name."""
    if isinstance(model, MergeResult):
        model = model.state_dict if model.state_dict is not None else model.path
    if isinstance(model, Mapping):
        return model
    source = open_model(model, str(model))
    try:
        return {name: source.read(name) for name in source.infos}
    finally:
        source.close()
