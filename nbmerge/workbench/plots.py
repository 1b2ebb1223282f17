"""The plots people look at after a merge. Each function returns a matplotlib Figure (shown inline in notebooks);
nothing here computes accuracy or statistics: reports come from ``nbmerge.evaluate`` / ``nbmerge bench``, task-
vector statistics from ``nbmerge.workbench.taskvectors``.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

from nbmerge.workbench.evaluation import EvalReport
from nbmerge.workbench.taskvectors import cosine_matrix, layer_statistics


def _figure(width: float, height: float):
    """A Figure outside pyplot (no global state, nothing to close) that renders itself as PNG in notebooks."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return NotebookFigure(figsize=(width, height), layout="constrained")


def accuracy_bars(reports: Mapping[str, EvalReport] | Any, include_average: bool = True):
    """Grouped bars: one group per task (and the average), one bar per model; heights are accuracy in percent.

    ``reports``: {label: EvalReport}, or a BenchResult (its per-task means over seeds).
    """
    if hasattr(reports, "rows"):
        series = {row.label: {t: row.task_mean(t) for t in row.tasks} | {"average": row.average}
                  for row in reports.rows}
    else:
        series = {label: dict(r.accuracy) | {"average": r.average} for label, r in reports.items()}
    tasks = [t for t in next(iter(series.values())) if include_average or t != "average"]
    figure = _figure(max(6.0, 1.3 * len(tasks) + 0.25 * len(series) * len(tasks)), 3.8)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for i, (label, accuracy) in enumerate(series.items()):
        axes.bar([k + (i - (len(series) - 1) / 2) * width for k in range(len(tasks))],
                 [accuracy[t] for t in tasks], width, label=label)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)  # from zero: bars cut at a higher floor exaggerate the differences
    axes.set_title("accuracy per task")
    axes.legend(fontsize="small", ncols=min(4, len(series)))
    return figure


def perplexity_bars(reports: Mapping[str, EvalReport]):
    """Grouped bars: one group per language-modelling domain, one bar per model; heights are perplexity (lower is
    better), on a log scale when the models differ by more than a factor of 10."""
    series = {label: dict(r.perplexity) for label, r in reports.items() if r.perplexity}
    domains = list(next(iter(series.values())))
    figure = _figure(max(6.0, 1.3 * len(domains) + 0.25 * len(series) * len(domains)), 3.8)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for i, (label, perplexity) in enumerate(series.items()):
        axes.bar([k + (i - (len(series) - 1) / 2) * width for k in range(len(domains))],
                 [perplexity.get(d, float("nan")) for d in domains], width, label=label)
    values = [v for perplexity in series.values() for v in perplexity.values()]
    if max(values) > 10 * min(values):
        axes.set_yscale("log")
    axes.set_xticks(range(len(domains)), domains, rotation=20, ha="right")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title("perplexity per domain")
    axes.legend(fontsize="small", ncols=min(4, len(series)))
    return figure


def report_figures(reports: Mapping[str, EvalReport]) -> list:
    """The figures for a set of reports: accuracy bars when they hold accuracy, perplexity bars when they hold
    perplexity (a causal-LM pool may hold both)."""
    figures = []
    if any(r.accuracy for r in reports.values()):
        figures.append(accuracy_bars({label: r for label, r in reports.items() if r.accuracy}))
    if any(r.perplexity for r in reports.values()):
        figures.append(perplexity_bars(reports))
    return figures


def sweep_curve(param: str, values: Sequence[float], reports: Sequence[EvalReport]):
    """Accuracy of every task (thin lines) and the average (thick) against a swept parameter's values."""
    if len(values) != len(reports):
        raise ValueError(f"sweep_curve: {len(values)} values but {len(reports)} reports")
    figure = _figure(6.0, 3.8)
    axes = figure.add_subplot()
    for task in reports[0].accuracy:
        axes.plot(values, [r.accuracy[task] for r in reports], marker="o", linewidth=1, alpha=0.7, label=task)
    axes.plot(values, [r.average for r in reports], marker="o", linewidth=3, color="black", label="average")
    axes.set_xlabel(param)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"accuracy vs {param}")
    axes.legend(fontsize="small")
    return figure


def search_curve(generations: Sequence[Any]):
    """A search's validation fitness per generation: every candidate (dots), the generation's best and mean, and
    the best so far."""
    figure = _figure(6.0, 3.8)
    axes = figure.add_subplot()
    steps = range(1, len(generations) + 1)
    for step, generation in zip(steps, generations):
        axes.scatter([step] * len(generation.fitness), generation.fitness, s=8, color="grey", alpha=0.5)
    axes.plot(steps, [g.mean for g in generations], marker="o", linewidth=1, label="generation mean")
    axes.plot(steps, [g.best for g in generations], marker="o", linewidth=1, label="generation best")
    best_so_far = [max(g.best for g in generations[:i]) for i in steps]
    axes.plot(steps, best_so_far, linewidth=3, color="black", label="best so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("search fitness")
    axes.legend(fontsize="small")
    return figure


def cosine_heatmap(models: Sequence[Any] | Mapping[str, Any], base: Any):
    """Heatmap of the task vectors' pairwise cosine similarity, each cell annotated with its value."""
    labels, matrix = cosine_matrix(models, base)
    figure = _figure(1.1 * len(labels) + 2.5, 1.0 * len(labels) + 1.5)
    axes = figure.add_subplot()
    image = axes.imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="small")
    axes.set_title("task-vector cosine similarity")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def layer_conflicts(models: Sequence[Any] | Mapping[str, Any], base: Any):
    """Two panels over the layer stack: sign-conflict fraction, and each model's delta norm ‖τ‖ per layer."""
    stats = layer_statistics(models, base)
    indices = [i for i, layer in enumerate(stats.layers) if layer is not None]
    layers = [stats.layers[i] for i in indices]
    figure = _figure(7.0, 5.0)
    conflict_axes, norm_axes = figure.subplots(2, 1, sharex=True)
    conflict_axes.bar(layers, [stats.conflict_fraction[i] for i in indices], color="tab:red")
    conflict_axes.set_ylabel("sign-conflict fraction")
    conflict_axes.set_ylim(0, 1)
    conflict_axes.set_title("where task vectors disagree")
    for label, norms in stats.delta_norms.items():
        norm_axes.plot(layers, [norms[i] for i in indices], marker="o", label=label)
    norm_axes.set_xlabel("layer")
    norm_axes.set_ylabel("‖τ‖₂")
    norm_axes.legend(fontsize="small")
    return figure


def normalized_accuracy(bench: Any):
    """Horizontal bars: each bench row's normalised accuracy (accuracy / individual accuracy, %), mean over seeds,
    with the seeds' spread as error bars; the individual models' 100 % is the dashed line.

    ``bench``: a BenchResult (``nbmerge bench`` / ``run_bench``) or the dict its ``to_json`` wrote.
    """
    rows = bench["rows"] if isinstance(bench, Mapping) else [
        {"label": r.label, "reports": [{"accuracy": rep.accuracy, "individual": rep.individual} for rep in r.reports]}
        for r in bench.rows]
    labels, means, spreads = [], [], []
    for row in rows:
        values = [_normalized(report) for report in row["reports"]]
        if None in values or row["label"] == "individual":
            continue
        labels.append(row["label"])
        means.append(sum(values) / len(values))
        spreads.append((sum((v - means[-1]) ** 2 for v in values) / len(values)) ** 0.5)
    figure = _figure(6.5, 0.35 * len(labels) + 1.4)
    axes = figure.add_subplot()
    axes.barh(range(len(labels)), means, xerr=spreads, color="tab:blue", alpha=0.8)
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.axvline(100.0, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel("normalised accuracy (% of the individual models')")
    axes.set_title("normalised accuracy per method (mean ± std over seeds)")
    return figure


def _normalized(report: Mapping[str, Any]) -> float | None:
    individual = report.get("individual") or {}
    if not individual:
        return None
    return 100.0 * sum(report["accuracy"][t] / individual[t] for t in individual) / len(individual)


def routing_heatmap(weights: Mapping[str, Any], layers: Sequence[str], experts: Sequence[str]):
    """WE-MoE routing weights per layer and task: one panel per task whose inputs were routed, rows the routed
    layers, columns the experts, each cell the routing weight averaged over that task's inputs.

    ``weights``: {task: [layers, experts] array}; ``layers`` / ``experts``: the row and column labels.
    """
    import numpy as np

    tasks = list(weights)
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    figure = _figure(2.6 * columns + 1.2, 0.16 * len(layers) * rows + 1.2 * rows)
    grids = figure.subplots(rows, columns, squeeze=False, sharey=True)
    arrays = {task: np.asarray(weights[task], dtype=float) for task in tasks}
    low = min(a.min() for a in arrays.values())
    high = max(a.max() for a in arrays.values())
    image = None
    for index, axes in enumerate(grids.flat):
        if index >= len(tasks):
            axes.set_visible(False)
            continue
        task = tasks[index]
        image = axes.imshow(arrays[task], aspect="auto", cmap="viridis", vmin=low, vmax=high)
        axes.set_title(f"{task} inputs", fontsize="small")
        axes.set_xticks(range(len(experts)), experts, rotation=90, fontsize="x-small")
        axes.set_yticks(range(len(layers)), layers, fontsize="x-small")
    figure.colorbar(image, ax=grids, shrink=0.6, label="routing weight")
    figure.suptitle("WE-MoE routing weights per layer (rows) and expert (columns)")
    return figure
