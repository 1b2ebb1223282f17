"""Plots are checked for what they show: series, values, labels."""

import pytest

from nbmerge.workbench import plots
from nbmerge.workbench.evaluation import EvalReport
from nbmerge.workbench.taskvectors import cosine_matrix, layer_statistics


def _report(name, accuracy):
    return EvalReport(name, "pool", "test", accuracy, {t: 10 for t in accuracy}, {t: 90.0 for t in accuracy})


A = _report("a", {"x": 60.0, "y": 80.0})
B = _report("b", {"x": 70.0, "y": 50.0})


def test_accuracy_bars_heights_and_labels():
    figure = plots.accuracy_bars({"a": A, "b": B})
    axes = figure.axes[0]
    heights = [[bar.get_height() for bar in container] for container in axes.containers]
    assert heights == [[60.0, 80.0, 70.0], [70.0, 50.0, 60.0]]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["x", "y", "average"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["a", "b"]
    assert axes.get_ylim() == (0.0, 100.0)  # from zero, whatever the lowest bar: differences shown to scale
    assert figure._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_curve_series():
    figure = plots.sweep_curve("scaling", [0.1, 0.5], [A, B])
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].lines}
    assert lines == {"x": ([0.1, 0.5], [60.0, 70.0]), "y": ([0.1, 0.5], [80.0, 50.0]),
                     "average": ([0.1, 0.5], [70.0, 60.0])}
    assert figure.axes[0].get_xlabel() == "scaling"
    with pytest.raises(ValueError, match="2 values but 1 reports"):
        plots.sweep_curve("scaling", [0.1, 0.5], [A])


def test_cosine_heatmap_shows_the_matrix(llama_set):
    models = {"m0": llama_set.model_dirs[0], "m1": llama_set.model_dirs[1]}
    figure = plots.cosine_heatmap(models, llama_set.base_dir)
    _, matrix = cosine_matrix(models, llama_set.base_dir)
    axes = figure.axes[0]
    assert axes.images[0].get_array().tolist() == matrix.numpy().tolist()
    assert [t.get_text() for t in axes.texts] == [f"{v:.2f}" for v in matrix.reshape(-1).tolist()]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["m0", "m1"]


def test_layer_conflicts_panels(llama_set):
    figure = plots.layer_conflicts(llama_set.models, llama_set.base)
    stats = layer_statistics(llama_set.models, llama_set.base)
    conflict_axes, norm_axes = figure.axes[:2]
    assert [bar.get_height() for bar in conflict_axes.containers[0]] == pytest.approx(stats.conflict_fraction[:3])
    assert [list(line.get_ydata()) for line in norm_axes.lines] == [norms[:3] for norms in stats.delta_norms.values()]


def test_normalized_accuracy_bars_are_accuracy_over_individual():
    from nbmerge.workbench.bench import BenchResult, BenchRow

    seed1 = _report("a", {"x": 45.0, "y": 90.0})
    bench = BenchResult("pool", [0, 1], [BenchRow("individual", None, [{}, {}], [A, A]),
                                         BenchRow("a", "a", [{}, {}], [A, seed1]), BenchRow("b", "b", [{}], [B])])
    for source in (bench, __import__("json").loads(bench.to_json())):
        axes = plots.normalized_accuracy(source).axes[0]
        widths = [bar.get_width() for bar in axes.patches]
        # a: seed 0 (60/90 + 80/90)/2 = 77.8 %, seed 1 (45/90 + 90/90)/2 = 75 %; b: (70/90 + 50/90)/2 = 66.7 %
        assert widths == pytest.approx([(700 / 9 + 75.0) / 2, 100 * 120 / 180])
        assert [t.get_text() for t in axes.get_yticklabels()] == ["a", "b"]


def test_routing_heatmap_shows_each_tasks_weights():
    import numpy as np

    weights = {"x": np.array([[0.1, 0.9], [0.4, 0.6], [0.3, 0.3]]), "y": np.array([[0.8, 0.2], [0.5, 0.5], [0, 1]])}
    figure = plots.routing_heatmap(weights, ["block 0", "block 1", "head"], ["x", "y"])
    panels = [axes for axes in figure.axes if axes.images and axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["x inputs", "y inputs"]
    for axes, task in zip(panels, weights):
        np.testing.assert_array_equal(axes.images[0].get_array(), weights[task])
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["block 0", "block 1", "head"]
