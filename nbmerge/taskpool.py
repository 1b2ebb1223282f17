"""What an evaluator plugin provides: a task pool — tasks with labelled splits, a way to turn any model the user
holds into the module the tasks run, and (optionally) the individual fine-tuned model of each task.

A task is either a ``Task`` (classification, scored by accuracy: higher is better) or a ``PerplexityTask``
(language modelling, scored by perplexity = exp(Σ NLL / Σ predicted tokens): lower is better).

Pools are registered through the ``register_task_pools(register)`` hook; ``nbmerge.task_pool(name)`` builds one.
``nbmerge.evaluate`` needs nothing else from a pool than what this module declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


class Task:
    """One classification task: labelled splits and the logits of a model on a batch of inputs."""

    name: str
    classes: Sequence[str]

    def inputs(self, split: str) -> Sequence[Any]:
        raise NotImplementedError

    def labels(self, split: str) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, model: torch.nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
        """[len(inputs), len(classes)] logits; differentiable with respect to ``model``'s parameters."""
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, split: str) -> torch.Tensor:
        """Predicted class index for every example of ``split`` (no gradients). Pools may batch this better."""
        with torch.inference_mode():
            return self.logits(model, self.inputs(split)).argmax(-1)


class PerplexityTask:
    """One language-modelling task (a domain of texts): scored by perplexity, lower is better."""

    name: str

    def texts(self, split: str) -> Sequence[str]:
        raise NotImplementedError

    def negative_log_likelihood(self, model: torch.nn.Module, split: str) -> tuple[float, int]:
        """(Σ next-token negative log-likelihood in nats, number of predicted tokens) over ``split``'s texts."""
        raise NotImplementedError


class TaskPool:
    """A named set of tasks. ``load_encoder`` turns a path, state dict, MergeResult or module into a module."""

    name: str
    tasks: list[Task | PerplexityTask]
    base: Any = None  # the pretrained model the individual models were fine-tuned from
    any_depth: bool = False  # load_encoder takes a layer stack of another depth (a data-flow search needs it)
    base_label: str = "pretrained"  # what a table calls the base scored on the tasks ("zero_shot" with zero-shot heads)

    def load_encoder(self, model: Any) -> torch.nn.Module:
        raise NotImplementedError

    def individual_models(self) -> dict[str, Any]:
        """Task name -> the model fine-tuned on that task alone (empty when the pool has none)."""
        return {}

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"task pool {self.name!r} has no task {name!r}; its tasks: "
                       f"{', '.join(t.name for t in self.tasks)}")


@dataclass(frozen=True)
class TaskPoolSpec:
    """A registered pool: its name, a one-line description and the factory that builds it (keyword options)."""

    name: str
    description: str
    build: Callable[..., TaskPool]
    plugin: str = ""
