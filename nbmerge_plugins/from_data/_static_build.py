"""What the data-driven static merges (RegMean, RegMean++, Fisher merging) share around their data pass: the
models' tensors checked against the base's architecture, and the built result.

The base gives the architecture only (FusionBench loads its ``_pretrained_`` model the same way and overwrites
every merged tensor): the result is a copy of the base holding the merged state. What is saved and reloaded
(``BuiltModule.trained``) is that whole merged state, so ``nbmerge.load_trained`` rebuilds it without running
the data pass again.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from nbmerge.errors import ModelInputError
from nbmerge.method import BuiltModule, ModuleJob, check_fits


def model_states(job: ModuleJob, owner: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every fine-tuned model's state dict (detached), checked to hold exactly the base's tensors and shapes."""
    expected = {name: tensor.shape for name, tensor in job.base.state_dict().items()}
    states = {}
    for label, model in job.models.items():
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        check_fits(state, expected, f"{owner}: fine-tuned model {label!r}", noun="tensor", allow_extra=False,
                   hint=" (it must have the base's architecture)")
        states[label] = state
    return states


def agreed_integer_tensor(name: str, values: Sequence[torch.Tensor], labels: Sequence[str],
                          owner: str) -> torch.Tensor:
    """An integer tensor (position ids, ...) that every model must hold equal: a copy of it, else an error naming
    the first model that differs."""
    for label, value in zip(labels, values):
        if not torch.equal(value, values[0]):
            raise ModelInputError(f"{owner}: integer tensor {name!r} of model {label!r} differs from model "
                                  f"{labels[0]!r}'s; it cannot be merged")
    return values[0].clone()


def built(base: nn.Module, state: dict[str, torch.Tensor], owner: str, record: dict | None = None) -> BuiltModule:
    """A copy of ``base`` (eval mode, no gradients) holding ``state``, which must name every tensor of it."""
    module = copy.deepcopy(base).eval().requires_grad_(False)
    check_fits(state, {name: t.shape for name, t in module.state_dict().items()}, f"{owner}: the merged state",
               noun="tensor", allow_extra=False)
    module.load_state_dict(state)
    return BuiltModule(module, {name: tensor.detach().clone() for name, tensor in state.items()}, None,
                       record or {})
