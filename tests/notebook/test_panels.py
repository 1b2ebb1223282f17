"""MergePanel and SweepPanel through widget state: Button.click() runs the same path as a click in the browser
(the work runs in a background thread; ``click`` below waits for it)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_state_close, task_arithmetic

import nbmerge
from nbmerge.notebook.panels import MergePanel


def click(button, panel) -> None:
    """Click a panel's Merge/Sweep button and wait for the background run to end."""
    button.click()
    panel.wait(120)
    assert not panel.running


def input_bytes(*state_dicts) -> int:
    return sum(t.numel() * t.element_size() for sd in state_dicts for t in sd.values())


def test_merge_button_merges_with_the_controls_values(llama_set):
    panel = MergePanel(llama_set.models[:2], base=llama_set.base)
    assert panel.method.value == "task_arithmetic"
    assert "simple_average" not in panel.method.options  # takes no base: not offered when one is given
    assert set(panel.controls) == {"scaling", "weights", "normalize"}
    panel.controls["scaling"].value = 0.7
    panel.controls["weights"].value = "1, 0.5"
    click(panel.merge_button, panel)
    assert panel.error is None
    assert_state_close(panel.result.state_dict, task_arithmetic(llama_set.base, llama_set.models[:2], 0.7, [1, 0.5]))
    total = input_bytes(llama_set.base, *llama_set.models[:2])
    assert (panel.progress.value, panel.progress.max, panel.progress.bar_style) == (total, total, "success")
    assert panel.progress_text.value == f"{nbmerge.display.human_bytes(total)} / {nbmerge.display.human_bytes(total)}"
    assert ("task_arithmetic(scaling=0.7, weights=[1.0, 0.5], normalize=false) of 2 model(s) onto base"
            in panel.status.value)


def test_switching_method_rebuilds_controls_from_its_declaration(llama_set):
    panel = MergePanel(llama_set.models, base=llama_set.base)
    panel.method.value = "ties"
    density = panel.controls["density"]
    assert (density.min, density.max, density.value) == (pytest.approx(0.01), 1.0, 0.2)
    assert panel.controls["trim_scope"].options == (("tensor", "tensor"), ("model", "model"))
    assert list(panel.params_box.children) == list(panel.controls.values())
    density.value = 0.45
    panel.controls["sign"].value = "count"
    click(panel.merge_button, panel)
    expected = nbmerge.merge("ties", llama_set.models, base=llama_set.base, density=0.45, sign="count",
                             progress=False).state_dict
    assert_state_close(panel.result.state_dict, expected, atol=0)
    # TIES (trim_scope=model) streams whole-model passes for its global threshold first: the bar counts them all
    assert panel.progress.value == panel.progress.max > input_bytes(llama_set.base, *llama_set.models)


def test_errors_are_shown_in_the_panel_and_cleared_by_a_good_merge(llama_set):
    panel = MergePanel(llama_set.models[:2], base=llama_set.base)
    panel.controls["weights"].value = "1, 2, 3"
    click(panel.merge_button, panel)
    assert panel.result is None and panel.error == "task_arithmetic: parameter 'weights' has 3 values for 2 models"
    assert "error: task_arithmetic: parameter &#x27;weights&#x27; has 3 values" in panel.status.value
    assert panel.progress.bar_style == "danger" and not panel.merge_button.disabled
    panel.controls["weights"].value = ""
    click(panel.merge_button, panel)
    assert panel.error is None and panel.result is not None and "error" not in panel.status.value


def test_interrupt_leaves_no_output_and_says_so(llama_set, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    panel = MergePanel(llama_set.model_dirs, base=llama_set.base_dir, out=out)
    events = []

    def interrupt_midway(event):
        events.append(event)
        if len(events) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(panel.progress_bar, "update", interrupt_midway)
    click(panel.merge_button, panel)
    assert panel.error == "interrupted; nothing was written" and panel.result is None
    assert 0 < events[-1].done < events[-1].total
    assert not out.exists() and list(tmp_path.iterdir()) == []


def gate_after(count: int, callback):
    """Wrap ``callback``: on its ``count``-th call, signal ``reached`` and hold the worker thread until ``release``
    (the test clicks Stop meanwhile, as a user would while the merge runs)."""
    reached, release, calls = threading.Event(), threading.Event(), []

    def gated(*args, **kwargs):
        result = callback(*args, **kwargs)
        calls.append(args)
        if len(calls) == count:
            reached.set()
            assert release.wait(60)
        return result

    return gated, reached, release, calls


def test_stop_button_stops_a_merge_at_the_next_tensor_and_writes_nothing(llama_set, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    panel = MergePanel(llama_set.model_dirs, base=llama_set.base_dir, out=out)
    assert panel.stop_button.disabled
    gated, reached, release, events = gate_after(3, panel.progress_bar.update)  # the pass starts, then two tensors
    monkeypatch.setattr(panel.progress_bar, "update", gated)
    panel.merge_button.click()
    assert reached.wait(60), "the merge did not start"
    # the kernel's thread is free while the merge runs: the Stop click is handled now, not after the merge
    assert panel.running and panel.merge_button.disabled and not panel.stop_button.disabled
    panel.stop_button.click()
    assert panel.stop_button.disabled
    release.set()
    panel.wait(60)
    assert not panel.running and panel.result is None
    tensor = events[-1][0].tensor
    assert panel.error == f"stopped after tensor {tensor!r}; nothing was written"
    assert len(events) == 3 and 0 < events[-1][0].done < events[-1][0].total  # no tensor after the one in hand
    assert "stopped after tensor" in panel.status.value and panel.progress.bar_style == "warning"
    assert list(tmp_path.iterdir()) == []  # no output folder, no hidden partial folder
    assert not panel.merge_button.disabled and panel.stop_button.disabled
    # the Merge button works again, with the controls' values
    monkeypatch.undo()
    panel.controls["scaling"].value = 0.7
    click(panel.merge_button, panel)
    assert panel.error is None and panel.result.path == out
    merged = load_folder(out)
    assert_state_close(merged, task_arithmetic(llama_set.base, llama_set.models, 0.7, [1, 1, 1]))


def load_folder(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_merge_without_waiting_returns_at_once_and_wait_joins(llama_set):
    panel = MergePanel(llama_set.models[:2], base=llama_set.base)
    assert panel.merge(wait=False) is None
    result = panel.wait(60)
    assert result is panel.result and panel.error is None
    assert_state_close(result.state_dict, task_arithmetic(llama_set.base, llama_set.models[:2], 0.3, [1, 1]))


def test_slerp_anchors_typed_in_the_panel_schedule_t_over_depth(llama_set):
    a, b = llama_set.models[:2]
    panel = MergePanel([a, b], method="slerp")
    t = panel.controls["t"]
    t.anchors.value = "0, 1"  # t = 0 at the first layer, 1 at the last; tensors outside the layers take 0
    click(panel.merge_button, panel)
    assert panel.error is None and panel.result.recipe["params"]["t"] == [0.0, 1.0]
    merged = panel.result.state_dict
    last = max(int(k.split(".")[2]) for k in a if k.startswith("model.layers."))
    for name in a:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer in (None, 0):
            assert torch.allclose(merged[name], a[name], atol=1e-6), name  # slerp at t = 0 is the first endpoint
        elif layer == last:
            assert torch.allclose(merged[name], b[name], atol=1e-6), name
    middle = [k for k in a if k.startswith("model.layers.1.")]
    t.anchors.value = ""
    t.slider.value = 0.5  # layer 1 of 0..2 sits at depth 0.5: the anchors give it t = 0.5
    click(panel.merge_button, panel)
    assert_state_close({k: merged[k] for k in middle}, {k: panel.result.state_dict[k] for k in middle}, atol=1e-6)
    t.anchors.value = "0, 1.5"
    assert "must be in [0, 1], got 1.5" in t.message.value
    click(panel.merge_button, panel)
    assert panel.error == "slerp: parameter 't' must be in [0, 1], got 1.5" and "error" in panel.status.value


def test_a_method_that_cannot_merge_the_models_is_refused():
    import torch

    with pytest.raises(ValueError, match="method 'slerp' cannot merge these models"):
        MergePanel([{"w": torch.ones(2)}] * 3, method="slerp")


# -- with the workbench's task pool ----------------------------------------------------------------------------
TASKS = ["sentiment", "subjectivity"]


def test_merge_panel_evaluates_and_plots_every_merge(tiny_zoo):
    from nbmerge.notebook.panels import SweepPanel  # noqa: F401  (both panels live in one module)

    panel = MergePanel(list(tiny_zoo.models.values()), base=tiny_zoo.base, pool=tiny_zoo.pool, tasks=TASKS)
    panel.controls["scaling"].value = 0.0  # θ₀ itself: the pretrained model's accuracy
    click(panel.merge_button, panel)
    pretrained = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, tasks=TASKS, progress=False)
    assert panel.error is None and panel.report.accuracy == pretrained.accuracy
    panel.controls["scaling"].value = 0.3
    click(panel.merge_button, panel)
    assert list(panel.reports) == ["task_arithmetic(scaling=0.0)", "task_arithmetic()"]  # 0.3 is the default
    table, chart = panel.output.outputs
    assert f"<td>sentiment</td><td>100</td><td>{panel.report.accuracy['sentiment']:.1f}</td>" in \
        table["data"]["text/html"]
    assert chart["data"]["image/png"]  # the per-task bars of both merges


def test_save_writes_the_last_in_memory_merge_to_the_output_field(llama_set, tmp_path):
    from safetensors.torch import load_file

    panel = MergePanel(llama_set.model_dirs, base=llama_set.base_dir)
    assert panel.out is None and not panel.overwrite.value and panel.save_button.disabled
    panel.save()
    assert panel.error == "nothing to save: merge first"
    click(panel.merge_button, panel)
    assert panel.result.path is None and not panel.save_button.disabled
    panel.out_folder.value = str(tmp_path / "merged")
    panel.save_button.click()
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(saved[name], panel.result.state_dict[name]) for name in saved)
    assert "task_arithmetic" in (tmp_path / "merged" / "README.md").read_text()
    assert panel.error is None and "saved to" in panel.status.value
    panel.save()  # the folder exists now and overwrite is not ticked: refused, shown, nothing changed
    assert "already exists" in panel.error


def test_a_merge_written_by_the_panel_gets_its_evaluation_in_its_model_card(tiny_zoo, tmp_path):
    panel = MergePanel(list(tiny_zoo.models.values()), base=tiny_zoo.base, pool=tiny_zoo.pool, tasks=TASKS,
                       out=tmp_path / "merged")
    assert panel.overwrite.value  # out given by the caller: each merge replaces the last
    click(panel.merge_button, panel)
    click(panel.merge_button, panel)
    assert panel.error is None and panel.result.path == tmp_path / "merged"
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Evaluation" in card and str(panel.report) in card


def test_sweep_panel_grows_the_curve_and_reports_the_best(tiny_zoo):
    from nbmerge.notebook.panels import SweepPanel

    panel = SweepPanel(list(tiny_zoo.models.values()), base=tiny_zoo.base, pool=tiny_zoo.pool,
                       method="task_arithmetic", tasks=TASKS)
    assert panel.param.options == ("scaling",)
    panel.span.value, panel.points.value = (0.0, 0.6), 2
    assert panel.values() == [0.0, 0.6]
    click(panel.sweep_button, panel)
    result = panel.result
    assert panel.error is None and result.values == [0.0, 0.6] and panel.progress.value == 2
    pretrained = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, tasks=TASKS, progress=False)
    assert result.reports[0].accuracy == pretrained.accuracy
    assert f"best scaling = {result.best}" in panel.status.value
    assert len(panel.output.outputs) == 1 and panel.output.outputs[0]["data"]["image/png"]
    panel.method.value = "ties"
    assert panel.param.value == "density" and panel.span.max == 1.0
    panel.span.value, panel.points.value = (0.0, 0.5), 2  # density 0 is outside (0, 1]
    click(panel.sweep_button, panel)
    assert panel.error == "ties: parameter 'density' must be in (0, 1], got 0" and "error" in panel.status.value


def test_stop_ends_we_moe_adaptation_at_the_next_step(tiny_zoo, tmp_path, monkeypatch):
    out = tmp_path / "routers.safetensors"
    models = {task: tiny_zoo.models[task] for task in TASKS}
    panel = MergePanel(models, base=tiny_zoo.base, pool=tiny_zoo.pool, method="we_moe", out=out, tasks=TASKS)
    panel.controls["steps"].value, panel.controls["batch_size"].value = 50, 4
    gated, reached, release, events = gate_after(2, panel.progress_bar.update)
    monkeypatch.setattr(panel.progress_bar, "update", gated)
    panel.merge_button.click()
    assert reached.wait(120), "adaptation did not start"
    assert [e[0].phase for e in events] == ["adapt", "adapt"] and events[-1][0].done == 2
    assert panel.progress_text.value == "training step 2 / 50"
    panel.stop_button.click()
    release.set()
    panel.wait(60)
    assert panel.error == "stopped after training step 2 of 50; nothing was written" and panel.result is None
    assert len(events) == 2 and list(tmp_path.iterdir()) == []


def test_stop_ends_a_sweep_after_the_point_in_progress(tiny_zoo, monkeypatch):
    from nbmerge.notebook.panels import SweepPanel
    from nbmerge.workbench import evaluation

    panel = SweepPanel(list(tiny_zoo.models.values()), base=tiny_zoo.base, pool=tiny_zoo.pool,
                       method="task_arithmetic", tasks=TASKS)
    panel.span.value, panel.points.value = (0.0, 0.6), 3
    gated, reached, release, _ = gate_after(1, evaluation.evaluate)  # hold the worker inside the first point
    monkeypatch.setattr(evaluation, "evaluate", gated)
    panel.sweep_button.click()
    assert reached.wait(120)
    panel.stop_button.click()
    release.set()
    panel.wait(60)
    assert panel.error == "stopped after 1 of 3 points" and "stopped" in panel.status.value
    pretrained = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, tasks=TASKS, progress=False)
    assert panel.result.values == [0.0] and panel.result.reports[0].accuracy == pretrained.accuracy
    assert panel.progress.value == 1 and panel.output.outputs[0]["data"]["image/png"]  # the curve so far stays
    monkeypatch.undo()
    panel.points.value = 2
    click(panel.sweep_button, panel)
    assert panel.error is None and panel.result.values == [0.0, 0.6]
