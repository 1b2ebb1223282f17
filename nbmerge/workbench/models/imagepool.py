"""Image-classification tasks on one convolutional backbone: pooled features and one linear head per task.

logits(x) = W_task · f(x) + b_task, where f(x) is the backbone's pooled feature vector. Every model evaluated on
a pool shares the pool's heads; only the backbone weights differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.method import check_fits
from nbmerge.results import MergeResult
from nbmerge.taskpool import Task, TaskPool
from nbmerge.workbench.models.statedicts import state_dict_of
from nbmerge.workbench.models.training import SPLITS

EVAL_BATCH = 256


class ImageTask(Task):
    """A task whose inputs are images ([3, S, S] float tensors in [0, 1]); ``head`` maps features to logits."""

    def __init__(self, name: str, classes: Sequence[str], splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 head: torch.nn.Linear):
        self.name = name
        self.classes = tuple(classes)
        self._splits = splits
        self.head = head

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self._splits[split]

    def inputs(self, split: str) -> torch.Tensor:
        """The split's images, [N, 3, S, S] (indexing gives one image)."""
        return self._split(split)[0]

    def labels(self, split: str) -> torch.Tensor:
        return self._split(split)[1]

    def logits(self, model: torch.nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        images = inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs))
        return self.head(model(images))

    def predict(self, model: torch.nn.Module, split: str) -> torch.Tensor:
        images = self.inputs(split)
        with torch.inference_mode():
            return torch.cat([self.logits(model, images[i:i + EVAL_BATCH]).argmax(-1)
                              for i in range(0, len(images), EVAL_BATCH)])


class ImageTaskPool(TaskPool):
    """Tasks sharing one backbone architecture (``new_backbone()``); ``base`` is the pretrained backbone's file."""

    def __init__(self, name: str, base: Path, tasks: list[ImageTask], individual: Mapping[str, Path],
                 new_backbone: Callable[[], torch.nn.Module]):
        self.name = name
        self.base = Path(base)
        self.tasks = tasks
        self._individual = dict(individual)
        self._new_backbone = new_backbone

    def individual_models(self) -> dict[str, Path]:
        return dict(self._individual)

    def load_encoder(self, model: Any) -> torch.nn.Module:
        """A backbone (eval mode) from a path, a state dict, a MergeResult or a module (a module is used as is; a
        module-building method's result is its module)."""
        if isinstance(model, MergeResult) and model.module is not None:
            model = model.module
        if isinstance(model, torch.nn.Module):
            return model
        state = state_dict_of(model)
        backbone = self._new_backbone()
        wanted = backbone.state_dict()
        check_fits(state, {key: value.shape for key, value in wanted.items()}, f"model for task pool {self.name!r}",
                   noun="backbone weight", hint=f": is it a {type(backbone).__name__} checkpoint?")
        backbone.load_state_dict({key: state[key] for key in wanted})
        return backbone.eval()
