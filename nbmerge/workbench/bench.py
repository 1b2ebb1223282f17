"""``nbmerge bench``: every registered method on a task pool, next to the pretrained and the individual models.

For each seed (one zoo per seed: its own splits and fine-tuning runs) the bench evaluates on the test split
- ``pretrained`` (``zero_shot`` on a pool of zero-shot heads: the pool's ``base_label``): the base encoder with
  the pool's task heads;
- ``individual``: each task under the model fine-tuned on it alone;
- every applicable method with its declared defaults;
- ``METHOD (tuned)``: the point of the method's declared grid (``Param.grid``, product over parameters) with the
  best average accuracy on the validation split, then evaluated once on test;
- ``best_static``: of every static (tensor-wise) method's defaults and tuned point, the one with the best
  validation average, on test (its row names the choice). Module-building methods (we_moe, adamerging) adapt on
  the test inputs, so they are never the static choice;
- for a module-building method with a grid (the objective): one row per grid point, ``we_moe (objective=…)``,
  each built once, and the row ``we_moe``: the point with the best validation average.
Methods that read a task pool's inputs (RegMean, Fisher, AdaMerging, WE-MoE) read the unlabeled inputs of
``data_split`` (default ``test``: test-time adaptation; FusionBench's RegMean and Fisher read ``train``); a row
built on another split names it (``data_split=train``).
``labels`` renames a method's rows (``{"we_moe": "we_moe_task_batches"}``: a second run of one method with other
settings, added to the same table). Rows report the per-task mean and standard deviation over seeds
(population), the average's mean ± standard deviation and the normalised average (accuracy / individual
accuracy, mean over tasks and seeds). A causal-LM pool's domains add a perplexity column each (lower is better;
the individual row: each domain under the model fine-tuned on it); the average, the tuning and ``best_static``
use the classification tasks' accuracy.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

from nbmerge.api import merge
from nbmerge.engine.stream import torch_threads
from nbmerge.errors import ParameterError
from nbmerge.io.text_files import write_text_atomically
from nbmerge.method.params import validate_params
from nbmerge.plugins import all_methods, task_pool
from nbmerge.taskpool import PerplexityTask, TaskPool
from nbmerge.workbench.evaluation import EvalReport, evaluate, individual_accuracy
from nbmerge.workbench.models.training import SPLITS


@dataclass
class BenchRow:
    """One line of the table: a model recipe evaluated once per seed."""

    label: str
    method: str | None
    params: list[dict]
    reports: list[EvalReport]

    @property
    def tasks(self) -> list[str]:
        """The classification tasks, then the language-modelling domains (their perplexity)."""
        return list(self.reports[0].accuracy) + list(self.reports[0].perplexity)

    def task_values(self, task: str) -> list[float]:
        """Per seed: the task's accuracy, or its perplexity for a language-modelling domain (NaN where a report
        lacks it: the individual row of a task no model was fine-tuned on)."""
        return [r.accuracy[task] if task in r.accuracy else r.perplexity.get(task, math.nan) for r in self.reports]

    def task_mean(self, task: str) -> float:
        return statistics.fmean(self.task_values(task))

    def task_spread(self, task: str) -> float:
        return _spread(self.task_values(task))

    @property
    def average(self) -> float:
        return statistics.fmean(r.average for r in self.reports)

    @property
    def spread(self) -> float:
        return _spread([r.average for r in self.reports])

    @property
    def normalized(self) -> float | None:
        values = [r.normalized_average for r in self.reports]
        return None if None in values else statistics.fmean(values)

    def params_text(self) -> str:
        if not self.params or not self.params[0]:
            return ""
        names = list(self.params[0])
        return ", ".join(f"{name}={'/'.join(_short(p[name]) for p in self.params)}"
                         if len({json.dumps(p[name]) for p in self.params}) > 1 else f"{name}={_short(self.params[0][name])}"
                         for name in names)


def _mean(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"


def _spread(values: list[float]) -> float:
    """Population standard deviation; NaN when a value is (a row without that task)."""
    return math.nan if any(math.isnan(v) for v in values) else statistics.pstdev(values)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class BenchResult:
    """The whole table, with the methods that could not run on this pool and why."""

    pool: str
    seeds: list[int]
    rows: list[BenchRow]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, label: str) -> BenchRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")

    def __str__(self) -> str:
        tasks = self.rows[0].tasks
        width = max(len(r.label) for r in self.rows) + 2
        header = f"{'model':<{width}}" + "".join(f"{self._column(t)[:13]:>14}" for t in tasks) + f"{'average':>16}{'norm.':>8}  params"
        measures = "test accuracy, %; ppl: perplexity" if self.rows[0].reports[0].perplexity else "test accuracy, %"
        lines = [f"nbmerge bench on {self.pool}, seeds {', '.join(map(str, self.seeds))} ({measures})",
                 header, "-" * len(header)]
        for row in self.rows:
            norm = "" if row.normalized is None else f"{row.normalized:.1f}"
            lines.append(f"{row.label:<{width}}" + "".join(f"{_mean(row.task_mean(t)):>14}" for t in tasks)
                         + f"{row.average:>10.1f} ± {row.spread:<3.1f}{norm:>8}  {row.params_text()}")
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        tasks = self.rows[0].tasks
        head = "".join(f"<th>{escape(self._column(t))}</th>" for t in tasks)
        body = "".join(
            f"<tr><td>{escape(r.label)}</td>" + "".join(f"<td>{r.task_mean(t):.1f}</td>" for t in tasks)
            + f"<td>{r.average:.1f} ± {r.spread:.1f}</td><td>{'' if r.normalized is None else f'{r.normalized:.1f}'}"
            f"</td><td>{escape(r.params_text())}</td></tr>" for r in self.rows)
        return (f"<table><caption>nbmerge bench on {escape(self.pool)}, seeds {self.seeds}</caption><thead><tr>"
                f"<th>model</th>{head}<th>average</th><th>normalized</th><th>params</th></tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def _column(self, task: str) -> str:
        return f"ppl {task}" if task in self.rows[0].reports[0].perplexity else task

    def to_json(self, path: str | Path | None = None) -> str:
        data = {"pool": self.pool, "seeds": self.seeds, "skipped": self.skipped, "seconds": self.seconds,
                "rows": [{"label": r.label, "method": r.method, "params": r.params, "average": r.average,
                          "spread": r.spread, "normalized": r.normalized,
                          "tasks": {task: {"mean": r.task_mean(task), "std": r.task_spread(task)} for task in r.tasks},
                          "reports": [asdict(report) for report in r.reports]} for r in self.rows]}
        text = json.dumps(data, indent=1)
        if path is not None:
            write_text_atomically(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "BenchResult":
        """The table a ``to_json`` file holds."""
        data = json.loads(Path(path).read_text())
        rows = [BenchRow(row["label"], row["method"], row["params"], [EvalReport(**report) for report in row["reports"]])
                for row in data["rows"]]
        return cls(data["pool"], data["seeds"], rows, data.get("skipped", {}), data.get("seconds", 0.0))

    def check_addable(self, pool: str, seeds: Sequence[int]) -> None:
        """A run on ``pool`` and ``seeds`` can be added to this table only when both are the same."""
        if (pool, list(seeds)) != (self.pool, self.seeds):
            raise ParameterError(f"bench: cannot add a run on {pool} seeds {list(seeds)} to one on "
                                 f"{self.pool} seeds {self.seeds}")

    def added_to(self, earlier: "BenchResult") -> "BenchResult":
        """``earlier``'s table with this run's rows added (a row of the same label replaced): a bench run in parts,
        e.g. the static methods first and the adaptive ones later, on the same pool and seeds."""
        earlier.check_addable(self.pool, self.seeds)
        shared = {"pretrained", "zero_shot", "individual"}  # the same in both runs: kept from the earlier one
        mine, theirs = {row.label for row in self.rows}, {row.label for row in earlier.rows}
        rows = [row for row in earlier.rows if row.label not in mine or row.label in shared] + \
               [row for row in self.rows if row.label not in shared or row.label not in theirs]
        skipped = {name: reason for name, reason in {**earlier.skipped, **self.skipped}.items()
                   if not any(row.method == name for row in rows)}
        return BenchResult(self.pool, self.seeds, rows, skipped, round(earlier.seconds + self.seconds, 1))


def combine_seeds(results: Sequence["BenchResult"]) -> "BenchResult":
    """One table from runs of the same pool on different seeds (e.g. one run per seed, each in stages): every
    run must have the same row labels in the same order; each row's per-seed params and reports are joined."""
    if not results:
        raise ParameterError("bench: no tables to combine")
    first = results[0]
    seeds = [seed for result in results for seed in result.seeds]
    if len(set(seeds)) != len(seeds):
        raise ParameterError(f"bench: cannot combine tables that share a seed ({seeds})")
    for result in results[1:]:
        if result.pool != first.pool or [r.label for r in result.rows] != [r.label for r in first.rows]:
            raise ParameterError(f"bench: cannot combine a table of {result.pool} rows "
                                 f"{[r.label for r in result.rows]} with one of {first.pool} rows "
                                 f"{[r.label for r in first.rows]}")
    rows = [BenchRow(row.label, row.method, [p for result in results for p in result.row(row.label).params],
                     [r for result in results for r in result.row(row.label).reports]) for row in first.rows]
    skipped = {name: reason for result in results for name, reason in result.skipped.items()}
    return BenchResult(first.pool, seeds, rows, skipped, round(sum(result.seconds for result in results), 1))


def run_bench(pool: str = "minilm-tiny", methods: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
              tune: bool = True, cache_dir: str | Path | None = None, progress: bool = True,
              threads: int | None = 1, overrides: dict[str, dict[str, Any]] | None = None,
              labels: dict[str, str] | None = None, data_split: str = "test") -> BenchResult:
    """Run the bench (see the module docstring) and return its table.

    overrides: {method: {param: value}} fixed for that method in every row (e.g. fewer adaptation steps).
    labels: {method: row name} for that method's rows (default: the method's name).
    data_split: the split whose unlabeled inputs the data-reading methods see.
    threads: torch threads while evaluating (default 1: on a busy 2-core machine two threads made these small
    matrix products several times slower); None leaves torch's setting alone.
    """
    with torch_threads(threads):
        return _run_bench(pool, methods, seeds, tune, cache_dir, progress, overrides or {}, labels or {}, data_split)


def _run_bench(pool, methods, seeds, tune, cache_dir, progress, overrides, labels, data_split) -> BenchResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    registered = all_methods()
    chosen = list(methods) if methods else list(registered)
    unknown = [name for name in chosen if name not in registered]
    if unknown:
        raise ParameterError(f"bench: unknown method {unknown[0]!r}; registered: {', '.join(registered)}")
    for name, fixed in overrides.items():
        if name not in chosen:
            raise ParameterError(f"bench: parameters set for {name!r}, which is not among the methods run")
        validate_params(name, registered[name].params, fixed)
    if data_split not in SPLITS:
        raise ParameterError(f"bench: data_split must be one of {', '.join(SPLITS)}, got {data_split!r}")
    for name in labels:
        if name not in chosen:
            raise ParameterError(f"bench: a row name set for {name!r}, which is not among the methods run")
    rows: dict[str, BenchRow] = {}
    skipped: dict[str, str] = {}
    if not methods:
        # module-building methods train at test time (minutes to hours on a CPU): only when asked for by name
        skipped.update({name: f"builds a module adapted on unlabeled inputs (slow); ask for it: methods=[{name!r}]"
                        for name, method in registered.items() if method.build_module is not None})
    for seed in seeds:
        pools = task_pool(pool, seed=seed, cache_dir=cache_dir, progress=progress)
        runnable = [name for name in chosen if name not in skipped and _applicable(registered[name], pools, skipped)]
        total = 2 + sum(2 * len(_grid(registered[n])) if tune and registered[n].build_module is not None
                        and _grid(registered[n]) else 1 + (len(_grid(registered[n])) + 1 if tune and
                        _grid(registered[n]) else 0) + (tune and registered[n].build_module is None)
                        for n in runnable)
        bar = tqdm(total=total, desc=f"bench {pool} seed {seed}", unit="eval", disable=not progress)
        base_label = pools.base_label
        _add(rows, base_label, None, {}, evaluate(pools.base, pools, name=base_label, progress=False))
        individual = individual_accuracy(pools, "test", [t.name for t in pools.tasks])
        _add(rows, "individual", None, {}, EvalReport("individual", pools.name, "test", individual,
                                                      _examples(pools), individual,
                                                      perplexity=_individual_perplexity(pools)))
        bar.update(2)
        static_choices: list[tuple[float, str, dict, EvalReport]] = []  # (validation average, row, params, test)
        for name in runnable:
            method = registered[name]
            label = labels.get(name, name)
            fixed = dict(overrides.get(name, {}))
            grid = [dict(point, **fixed) for point in _grid(method, exclude=fixed)] if tune else []
            merged = functools.partial(_merged, method, pools, data_split=data_split)
            shown = (lambda params: params) if method.build_module is None or data_split == "test" else (
                lambda params: dict(params, data_split=data_split))
            if method.build_module is not None and grid:
                _add_adapted(rows, label, method, pools, grid, bar, merged, shown)
                continue
            defaults = evaluate(merged(fixed), pools, name=label, progress=False)
            _add(rows, label, name, shown(fixed), defaults)
            bar.update(1)
            static = method.build_module is None
            if tune and static:
                static_choices.append((_validation_average(merged, pools, fixed, bar), label, fixed, defaults))
            if grid:
                scores = [_validation_average(merged, pools, point, bar) for point in grid]
                best_score = max(scores)
                best = grid[scores.index(best_score)]
                tuned = evaluate(merged(best), pools, name=f"{label} (tuned)", progress=False)
                _add(rows, f"{label} (tuned)", name, shown(best), tuned)
                bar.update(1)
                if static:
                    static_choices.append((best_score, f"{label} (tuned)", best, tuned))
        if static_choices:
            _, label, params, report = max(static_choices, key=lambda choice: choice[0])
            _add(rows, "best_static", None, {"choice": label, **params}, report)
        bar.close()
    return BenchResult(pool, list(seeds), list(rows.values()), skipped, round(time.perf_counter() - started, 1))


def _add_adapted(rows: dict[str, BenchRow], name: str, method, pool: TaskPool, grid: list[dict], bar, merged,
                 shown) -> None:
    """A module-building method under row name ``name``: one row per grid point (``we_moe
    (objective=information_max)``), each built once and evaluated on validation and test, and the row ``name``:
    the point with the best validation average."""
    points = []
    for point in grid:
        module = merged(point)
        validation = evaluate(module, pool, split="validation", progress=False).average
        label = f"{name} ({', '.join(f'{key}={_short(value)}' for key, value in point.items() if key in _axes(method))})"
        test = evaluate(module, pool, name=label, progress=False)
        _add(rows, label, method.name, shown(point), test)
        points.append((validation, point, test))
        bar.update(2)
    validation, point, test = max(points, key=lambda choice: choice[0])
    _add(rows, name, method.name, shown(point), test)


def _axes(method, exclude=()) -> set[str]:
    return {param.name for param in method.params if param.grid and param.name not in exclude}


def _add(rows: dict[str, BenchRow], label: str, method: str | None, params: dict, report: EvalReport) -> None:
    row = rows.setdefault(label, BenchRow(label, method, [], []))
    row.params.append(params)
    row.reports.append(report)


def _examples(pool: TaskPool) -> dict[str, int]:
    return {task.name: len(task.texts("test") if isinstance(task, PerplexityTask) else task.labels("test"))
            for task in pool.tasks}


def _individual_perplexity(pool: TaskPool) -> dict[str, float]:
    """Each language-modelling domain's perplexity under the model fine-tuned on that domain (when there is one)."""
    individual = pool.individual_models()
    return {task.name: evaluate(individual[task.name], pool, tasks=[task.name], progress=False).perplexity[task.name]
            for task in pool.tasks if isinstance(task, PerplexityTask) and task.name in individual}


def _applicable(method, pool: TaskPool, skipped: dict[str, str]) -> bool:
    try:
        method.validate({}, len(pool.tasks), method.base == "required")
    except ParameterError as error:
        skipped[method.name] = str(error).removeprefix(f"{method.name}: ")
        return False
    return True


def _grid(method, exclude=()) -> list[dict]:
    axes = [(param.name, param.grid) for param in method.params if param.grid and param.name not in exclude]
    points = [dict(zip([name for name, _ in axes], values)) for values in itertools.product(*[g for _, g in axes])]
    return points if axes else []


def _merged(method, pool: TaskPool, params: dict, data_split: str = "test"):
    models = pool.individual_models()
    base = pool.base if method.base == "required" else None
    if method.build_module is not None:
        params = dict(params, pool=pool, split=data_split)
    return merge(method.name, models, base=base, progress=False, **params)


def _validation_average(merged, pool: TaskPool, params: dict, bar) -> float:
    report = evaluate(merged(params), pool, split="validation", progress=False)
    bar.update(1)
    return report.average
