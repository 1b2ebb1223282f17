"""``evaluate(model, pool)``: accuracy of one model on every task of a task pool, as an ``EvalReport``.

accuracy_t = 100 · mean(argmax logits_t(x) = y) over the split of task t; average = mean over tasks;
normalized_t = accuracy_t / accuracy of task t's individual fine-tuned model on the same split (when the pool has
individual models), normalized_average = mean over tasks. predicted_t = how many of the split's examples the model
assigned to each class of task t (in the task's class order): a collapse onto one class shows there.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

import torch

from nbmerge.taskpool import TaskPool


@dataclass
class EvalReport:
    """Per-task accuracy (percent) of one model on one pool split, with the individual models' accuracy."""

    model: str
    pool: str
    split: str
    accuracy: dict[str, float]
    examples: dict[str, int]
    individual: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    predicted: dict[str, list[int]] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def normalized(self) -> dict[str, float]:
        return {task: 100 * acc / self.individual[task] for task, acc in self.accuracy.items()
                if self.individual.get(task)}

    @property
    def normalized_average(self) -> float | None:
        values = self.normalized
        return sum(values.values()) / len(values) if len(values) == len(self.accuracy) else None

    def rows(self) -> list[tuple[str, int, float, float | None]]:
        normalized = self.normalized
        return [(task, self.examples[task], acc, normalized.get(task)) for task, acc in self.accuracy.items()]

    def __str__(self) -> str:
        lines = [f"{self.model} on {self.pool} ({self.split})",
                 f"{'task':<16}{'n':>6}{'accuracy':>10}{'normalized':>12}"]
        for task, n, acc, norm in self.rows():
            lines.append(f"{task:<16}{n:>6}{acc:>10.1f}{_fmt(norm):>12}")
        lines.append(f"{'average':<16}{sum(self.examples.values()):>6}{self.average:>10.1f}"
                     f"{_fmt(self.normalized_average):>12}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><td>{escape(task)}</td><td>{n}</td><td>{acc:.1f}</td><td>{_fmt(norm)}</td></tr>"
                        for task, n, acc, norm in self.rows())
        return (f"<table><caption>{escape(self.model)} on {escape(self.pool)} ({escape(self.split)})</caption>"
                "<thead><tr><th>task</th><th>n</th><th>accuracy</th><th>normalized</th></tr></thead>"
                f"<tbody>{cells}<tr><th>average</th><th>{sum(self.examples.values())}</th>"
                f"<th>{self.average:.1f}</th><th>{_fmt(self.normalized_average)}</th></tr></tbody></table>")

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self) | {"average": self.average,
                                          "normalized_average": self.normalized_average}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "EvalReport":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        return cls(**{key: data[key] for key in ("model", "pool", "split", "accuracy", "examples", "individual",
                                                 "seconds")}, predicted=data.get("predicted", {}))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def evaluate(model: Any, pool: TaskPool | str, split: str = "test", tasks: Sequence[str] | None = None,
             name: str | None = None, progress: bool = True) -> EvalReport:
    """Accuracy of ``model`` (path, state dict, MergeResult or module) on each task of ``pool``.

    pool: a TaskPool or the name of a registered one. tasks: a subset of the pool's task names.
    """
    from tqdm.auto import tqdm

    from nbmerge.plugins import task_pool

    if isinstance(pool, str):
        pool = task_pool(pool)
    chosen = [pool.task(t) for t in tasks] if tasks else list(pool.tasks)
    started = time.perf_counter()
    encoder = pool.load_encoder(model)
    accuracy, examples, predicted = {}, {}, {}
    for task in tqdm(chosen, desc=f"evaluate on {pool.name}", unit="task", disable=not progress, leave=False):
        labels, predictions = task.labels(split), task.predict(encoder, split)
        accuracy[task.name], examples[task.name] = _accuracy(predictions, labels), len(labels)
        predicted[task.name] = torch.bincount(predictions, minlength=len(task.classes)).tolist()
    return EvalReport(name or _model_name(model), pool.name, split, accuracy, examples,
                      individual_accuracy(pool, split, [t.name for t in chosen]),
                      round(time.perf_counter() - started, 2), predicted)


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (predictions == labels).double().mean().item()


def task_accuracy(encoder: torch.nn.Module, task, split: str) -> tuple[float, int]:
    """(100 · fraction of correct predictions, number of examples) of one task's split."""
    labels = task.labels(split)
    return _accuracy(task.predict(encoder, split), labels), len(labels)


def individual_accuracy(pool: TaskPool, split: str, task_names: Sequence[str]) -> dict[str, float]:
    """Each task's accuracy under the model fine-tuned on that task alone (cached per pool object and split)."""
    individual = pool.individual_models()
    cache = pool.__dict__.setdefault("_individual_accuracy", {})
    for name in task_names:
        if name in individual and (split, name) not in cache:
            cache[split, name] = task_accuracy(pool.load_encoder(individual[name]), pool.task(name), split)[0]
    return {name: cache[split, name] for name in task_names if (split, name) in cache}


def _model_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name or str(model)
    recipe = getattr(model, "recipe", None)
    if recipe:
        return recipe.get("method", "layer stack")
    return type(model).__name__
