"""``evaluate(model, pool)``: the score of one model on every task of a task pool, as an ``EvalReport``.

accuracy_t = 100 · mean(argmax logits_t(x) = y) over the split of a classification task t; average = mean over
those tasks; normalized_t = accuracy_t / accuracy of task t's individual fine-tuned model on the same split (when
the pool has individual models), normalized_average = mean over tasks. predicted_t = how many of the split's
examples the model assigned to each class of task t (in the task's class order): a collapse onto one class shows
there. A language-modelling task d (a ``PerplexityTask``) reports perplexity_d = exp(Σ NLL / Σ predicted tokens)
over its texts (lower is better); it is not part of the average.

The model is loaded once per call (``pool.load_encoder``); ``on_progress`` receives a ``ProgressEvent`` (phase
"evaluate", ``done`` / ``total`` tasks, ``tensor`` = the task being scored) before each task and after the last.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nbmerge.engine.progress import ProgressEvent, check_cancel
from nbmerge.errors import ParameterError
from nbmerge.io.text_files import write_text_atomically
from nbmerge.taskpool import PerplexityTask, TaskPool


@dataclass
class EvalReport:
    """Per-task accuracy (percent) of one model on one pool split, with the individual models' accuracy, and the
    perplexity of each language-modelling task (``perplexity``; ``examples`` counts its texts)."""

    model: str
    pool: str
    split: str
    accuracy: dict[str, float]
    examples: dict[str, int]
    individual: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    perplexity: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, list[int]] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Mean accuracy over the classification tasks (NaN when the report has none)."""
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else math.nan

    @property
    def normalized(self) -> dict[str, float]:
        return {task: 100 * acc / self.individual[task] for task, acc in self.accuracy.items()
                if self.individual.get(task)}

    @property
    def normalized_average(self) -> float | None:
        values = self.normalized
        return sum(values.values()) / len(values) if values and len(values) == len(self.accuracy) else None

    def rows(self) -> list[tuple[str, int, float, float | None]]:
        """(task, examples, accuracy, normalized) of each classification task."""
        normalized = self.normalized
        return [(task, self.examples[task], acc, normalized.get(task)) for task, acc in self.accuracy.items()]

    def __str__(self) -> str:
        lines = [f"{self.model} on {self.pool} ({self.split})"]
        if self.perplexity:
            lines.append(f"{'domain':<16}{'texts':>6}{'perplexity':>12}")
            lines += [f"{task:<16}{self.examples[task]:>6}{ppl:>12.2f}" for task, ppl in self.perplexity.items()]
        if self.accuracy:
            lines.append(f"{'task':<16}{'n':>6}{'accuracy':>10}{'normalized':>12}")
            for task, n, acc, norm in self.rows():
                lines.append(f"{task:<16}{n:>6}{acc:>10.1f}{_fmt(norm):>12}")
            lines.append(f"{'average':<16}{sum(self.examples[t] for t in self.accuracy):>6}{self.average:>10.1f}"
                         f"{_fmt(self.normalized_average):>12}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        caption = f"<caption>{escape(self.model)} on {escape(self.pool)} ({escape(self.split)})</caption>"
        tables = []
        if self.perplexity:
            cells = "".join(f"<tr><td>{escape(task)}</td><td>{self.examples[task]}</td><td>{ppl:.2f}</td></tr>"
                            for task, ppl in self.perplexity.items())
            tables.append(f"<table>{caption}<thead><tr><th>domain</th><th>texts</th><th>perplexity ↓</th></tr>"
                          f"</thead><tbody>{cells}</tbody></table>")
            caption = ""
        if self.accuracy:
            cells = "".join(f"<tr><td>{escape(task)}</td><td>{n}</td><td>{acc:.1f}</td><td>{_fmt(norm)}</td></tr>"
                            for task, n, acc, norm in self.rows())
            tables.append(f"<table>{caption}<thead><tr><th>task</th><th>n</th><th>accuracy</th><th>normalized</th>"
                          f"</tr></thead><tbody>{cells}<tr><th>average</th>"
                          f"<th>{sum(self.examples[t] for t in self.accuracy)}</th><th>{self.average:.1f}</th>"
                          f"<th>{_fmt(self.normalized_average)}</th></tr></tbody></table>")
        return "".join(tables)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self) | {"average": self.average,
                                          "normalized_average": self.normalized_average}, indent=1)
        if path is not None:
            write_text_atomically(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "EvalReport":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        return cls(**{key: data[key] for key in ("model", "pool", "split", "accuracy", "examples", "individual",
                                                 "seconds")}, perplexity=data.get("perplexity", {}),
                          predicted=data.get("predicted", {}))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def evaluate(model: Any, pool: TaskPool | str, split: str = "test", tasks: Sequence[str] | None = None,
             name: str | None = None, progress: bool = True,
             on_progress: Callable[[ProgressEvent], None] | None = None, cancel=None) -> EvalReport:
    """Accuracy (or perplexity) of ``model`` (path, state dict, MergeResult or module) on each task of ``pool``.

    pool: a TaskPool or the name of a registered one. tasks: a subset of the pool's task names.
    on_progress: called with a ProgressEvent before each task and after the last; cancel: a threading.Event
    checked between tasks (MergeCancelled when set).
    """
    from tqdm.auto import tqdm

    from nbmerge.plugins import task_pool

    if isinstance(pool, str):
        pool = task_pool(pool)
    chosen = [pool.task(t) for t in tasks] if tasks else list(pool.tasks)
    started = time.perf_counter()
    encoder = pool.load_encoder(model)
    accuracy, examples, perplexity, predicted = {}, {}, {}, {}
    for done, task in enumerate(tqdm(chosen, desc=f"evaluate on {pool.name}", unit="task", disable=not progress,
                                     leave=False)):
        check_cancel(cancel, f"before evaluating task {task.name!r}")
        if on_progress is not None:
            on_progress(ProgressEvent("evaluate", done, len(chosen), task.name))
        if isinstance(task, PerplexityTask):
            perplexity[task.name], examples[task.name] = task_perplexity(encoder, task, split)
            continue
        labels, predictions = task.labels(split), task.predict(encoder, split)
        accuracy[task.name], examples[task.name] = _accuracy(predictions, labels), len(labels)
        predicted[task.name] = torch.bincount(predictions, minlength=len(getattr(task, "classes", ()))).tolist()
    if on_progress is not None:
        on_progress(ProgressEvent("evaluate", len(chosen), len(chosen), ""))
    scored = [t.name for t in chosen if not isinstance(t, PerplexityTask)]
    return EvalReport(name or _model_name(model), pool.name, split, accuracy, examples,
                      individual_accuracy(pool, split, scored), round(time.perf_counter() - started, 2),
                      perplexity, predicted)


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (predictions == labels).double().mean().item()


def task_perplexity(model: torch.nn.Module, task: PerplexityTask, split: str) -> tuple[float, int]:
    """(exp(Σ NLL / Σ predicted tokens), number of texts) of one language-modelling task's split."""
    with torch.inference_mode():
        nll, tokens = task.negative_log_likelihood(model, split)
    return math.exp(nll / tokens), len(task.texts(split))


def task_accuracy(encoder: torch.nn.Module, task, split: str) -> tuple[float, int]:
    """(100 · fraction of correct predictions, number of examples) of one task's split."""
    labels = task.labels(split)
    return _accuracy(task.predict(encoder, split), labels), len(labels)


def individual_accuracy(pool: TaskPool, split: str, task_names: Sequence[str]) -> dict[str, float]:
    """Each task's accuracy under the model fine-tuned on that task alone (cached per pool object and split)."""
    individual = pool.individual_models()
    cache = pool.__dict__.setdefault("_individual_accuracy", {})
    for name in task_names:
        if isinstance(pool.task(name), PerplexityTask):
            continue
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


@dataclass
class ReportTable:
    """Several models' reports side by side, one row per model: perplexity per domain (``ppl DOMAIN``, lower is
    better), accuracy per classification task, and their average. ``rows`` is what ``pandas.DataFrame`` takes."""

    reports: dict[str, EvalReport]

    @property
    def columns(self) -> list[str]:
        first = next(iter(self.reports.values()))
        return ([f"ppl {domain}" for domain in first.perplexity] + list(first.accuracy)
                + (["average"] if len(first.accuracy) > 1 else []))

    @property
    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for label, report in self.reports.items():
            row: dict[str, Any] = {"model": label}
            row.update({f"ppl {domain}": value for domain, value in report.perplexity.items()})
            row.update(report.accuracy)
            if len(report.accuracy) > 1:
                row["average"] = report.average
            rows.append(row)
        return rows

    def __str__(self) -> str:
        columns, width = self.columns, max(len(label) for label in self.reports) + 2
        lines = [f"{'model':<{width}}" + "".join(f"{c[:18]:>20}" for c in columns)]
        lines += [f"{row['model']:<{width}}" + "".join(f"{_cell(row.get(c)):>20}" for c in columns)
                  for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        first = next(iter(self.reports.values()))
        head = "".join(f"<th>{escape(c)}{' ↓' if c.startswith('ppl ') else ''}</th>" for c in self.columns)
        body = "".join(f"<tr><td>{escape(row['model'])}</td>"
                       + "".join(f"<td>{_cell(row.get(c))}</td>" for c in self.columns) + "</tr>" for row in self.rows)
        return (f"<table><caption>{escape(first.pool)} ({escape(first.split)}): perplexity (lower is better) and "
                f"accuracy, %</caption><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def compare_reports(reports: dict[str, EvalReport]) -> ReportTable:
    """A table of several models' reports on the same pool and split (e.g. base, fine-tunes and merges)."""
    if not reports:
        raise ParameterError("compare_reports: give {label: EvalReport} for one or more models")
    where = {(report.pool, report.split) for report in reports.values()}
    if len(where) > 1:
        raise ParameterError(f"compare_reports: the reports come from different pools or splits: {sorted(where)}")
    return ReportTable(dict(reports))
