"""``sweep``: merge once per value of one parameter, evaluate each merge on a task pool, keep the curve.

For each value v of ``param``: result_v = merge(method, models, base, param=v, **fixed) in memory, then
report_v = evaluate(result_v, pool, split). ``on_point(sweep_so_far)`` is called after each point, so a notebook
can redraw the curve as it grows. A set ``cancel`` event stops the sweep before the next point (and the merge in
progress at its next tensor) with MergeCancelled. ``SweepResult.best`` is the value with the highest average accuracy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from html import escape
from typing import Any, Callable, Sequence

from nbmerge.errors import ParameterError


@dataclass(repr=False)
class SweepResult:
    """The swept values and the evaluation report of the merge made with each."""

    method: str
    param: str
    values: list = field(default_factory=list)
    reports: list = field(default_factory=list)

    @property
    def averages(self) -> list[float]:
        return [report.average for report in self.reports]

    @property
    def best(self):
        """The value whose merge has the highest average accuracy."""
        if not self.reports:
            raise ValueError("the sweep has no points yet")
        averages = self.averages
        return self.values[max(range(len(averages)), key=averages.__getitem__)]

    def figure(self):
        from nbmerge.workbench import plots

        return plots.sweep_curve(self.param, self.values, self.reports)

    def __str__(self) -> str:
        tasks = list(self.reports[0].accuracy) if self.reports else []
        lines = [f"{self.method}: sweep of {self.param}", f"{self.param:>12}" + "".join(f"{t[:12]:>13}" for t in tasks)
                 + f"{'average':>10}"]
        for value, report in zip(self.values, self.reports):
            lines.append(f"{value!s:>12}" + "".join(f"{report.accuracy[t]:>13.1f}" for t in tasks)
                         + f"{report.average:>10.1f}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        tasks = list(self.reports[0].accuracy) if self.reports else []
        head = "".join(f"<th>{escape(t)}</th>" for t in [self.param, *tasks, "average"])
        best = self.best if self.reports else None
        bold = " style='font-weight:bold'"
        rows = "".join(
            f"<tr{bold if value == best else ''}><td>{escape(str(value))}</td>"
            + "".join(f"<td>{report.accuracy[t]:.1f}</td>" for t in tasks) + f"<td>{report.average:.1f}</td></tr>"
            for value, report in zip(self.values, self.reports))
        return (f"<table class='nbmerge-sweep'><caption>{escape(self.method)}: accuracy against "
                f"{escape(self.param)} (best in bold)</caption><tr>{head}</tr>{rows}</table>")


def sweep(method: str, models, base: Any = None, *, param: str, values: Sequence, pool, split: str = "test",
          tasks: Sequence[str] | None = None, on_point: Callable[[SweepResult], None] | None = None,
          device: str = "auto", cancel: threading.Event | None = None, **fixed: Any) -> SweepResult:
    """Merge with each value of ``param`` (other parameters from ``fixed``) and evaluate each merge on ``pool``."""
    from nbmerge.api import merge
    from nbmerge.engine.progress import check_cancel
    from nbmerge.plugins import get_method, task_pool
    from nbmerge.workbench.evaluation import evaluate

    declared = [p.name for p in get_method(method).params]
    if param not in declared:
        raise ParameterError(f"{method}: cannot sweep {param!r}: not one of its parameters ({', '.join(declared)})")
    if param in fixed:
        raise ParameterError(f"{method}: {param!r} is swept; do not also fix it")
    if not values:
        raise ParameterError(f"{method}: give at least one value of {param!r} to sweep")
    if isinstance(pool, str):
        pool = task_pool(pool)
    result = SweepResult(method, param)
    for index, value in enumerate(values):
        check_cancel(cancel, f"after {index} of {len(values)} points")
        merged = merge(method, models, base=base, device=device, progress=False, cancel=cancel, **{param: value},
                       **fixed)
        report = evaluate(merged, pool, split=split, tasks=tasks, name=f"{method} {param}={value}", progress=False)
        result.values.append(value)
        result.reports.append(report)
        if on_point is not None:
            on_point(result)
    return result
