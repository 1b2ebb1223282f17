"""sweep(): one merge and one evaluation per value, checked against merging and scoring by hand."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from nbmerge.errors import ParameterError
from nbmerge.workbench.sweep import SweepResult, sweep

TASKS = ["sentiment", "subjectivity"]


def accuracy_by_hand(pool, state_dict, task_name: str) -> float:
    task = pool.task(task_name)
    predictions = task.predict(pool.load_encoder(state_dict), "test")
    return 100.0 * (predictions == task.labels("test")).double().mean().item()


def test_each_point_is_the_merge_with_that_value_evaluated(tiny_zoo):
    base = load_file(tiny_zoo.base / "model.safetensors")
    models = [load_file(folder / "model.safetensors") for folder in tiny_zoo.models.values()]
    seen = []
    result = sweep("task_arithmetic", list(tiny_zoo.models.values()), tiny_zoo.base, param="scaling",
                   values=[0.0, 0.4], pool=tiny_zoo.pool, tasks=TASKS, on_point=lambda r: seen.append(len(r.values)))
    assert seen == [1, 2] and result.values == [0.0, 0.4]
    for value, report in zip(result.values, result.reports):
        merged = {k: base[k] + value * sum(m[k] - base[k] for m in models) for k in base}
        for task in TASKS:
            assert report.accuracy[task] == pytest.approx(accuracy_by_hand(tiny_zoo.pool, merged, task))
    assert result.best == max(result.values, key=lambda v: result.reports[result.values.index(v)].average)


def test_sweep_mistakes_name_the_parameter(tiny_zoo):
    models = list(tiny_zoo.models.values())
    with pytest.raises(ParameterError, match="cannot sweep 'densty'"):
        sweep("ties", models, tiny_zoo.base, param="densty", values=[0.1], pool=tiny_zoo.pool)
    with pytest.raises(ParameterError, match="'density' is swept; do not also fix it"):
        sweep("ties", models, tiny_zoo.base, param="density", values=[0.1], pool=tiny_zoo.pool, density=0.2)
    with pytest.raises(ParameterError, match="at least one value"):
        sweep("ties", models, tiny_zoo.base, param="density", values=[], pool=tiny_zoo.pool)


def test_sweep_result_table_marks_the_best_value():
    from nbmerge.workbench.evaluation import EvalReport

    reports = [EvalReport("m", "p", "test", {"a": acc, "b": 50.0}, {"a": 10, "b": 10}) for acc in (60.0, 80.0, 70.0)]
    result = SweepResult("ties", "density", [0.1, 0.2, 0.3], reports)
    assert result.best == 0.2 and result.averages == [55.0, 65.0, 60.0]
    assert "<tr style='font-weight:bold'><td>0.2</td><td>80.0</td><td>50.0</td><td>65.0</td></tr>" in \
        result._repr_html_()
    assert str(result).splitlines()[3].split() == ["0.2", "80.0", "50.0", "65.0"]
