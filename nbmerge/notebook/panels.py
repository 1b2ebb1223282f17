"""Widget panels. ``MergePanel``: pick a method, set its parameters, merge, see progress, result and scores.
``SweepPanel``: pick a method, a parameter and a range; watch the accuracy curve grow point by point.

The panels are thin: their controls come from the methods' ``Param`` declarations (``nbmerge.notebook.controls``) and their
buttons call ``nbmerge.merge`` / ``nbmerge.workbench.sweep.sweep`` — the API the magics call. Errors (bad values, unreadable
models, an interrupt) are shown in the panel and kept in ``.error``. With a task pool, MergePanel evaluates every
merge and shows the report and a per-task bar chart of the merges so far.

A button runs its work in a background thread, so the kernel stays free to receive the next widget message: a
click on **Stop** sets the run's ``cancel`` event, and the API stops at the next tensor (a merge), the next training
step (a module-building method) or the next point (a sweep), writing nothing. From code, ``panel.merge()`` /
``panel.sweep()`` run in the calling thread and return the result (``wait=False`` does what the button does;
``panel.wait()`` joins).
"""

from __future__ import annotations

import html
import threading
from typing import Any, Callable

import ipywidgets as widgets

from nbmerge.display import merge_summary
from nbmerge.errors import MergeCancelled, NBMergeError, ParameterError
from nbmerge.notebook.controls import control_value, make_control
from nbmerge.notebook.progress_bar import ProgressBar
from nbmerge.plugins import all_methods, get_method, task_pool
from nbmerge.results import model_count

HISTORY = 6  # merges kept in the panel's bar chart


class _BackgroundPanel(widgets.VBox):
    """A Run button and a Stop button around one unit of work that may run in a background thread.

    Subclasses build ``run_button`` and call ``_launch(work, wait)``; ``work`` gets the run's ``cancel`` event
    and reports its own outcome in the panel (it must not raise).
    """

    def _make_stop_button(self) -> widgets.Button:
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="stop at the next tensor, training step or sweep point")
        self.stop_button.on_click(lambda _button: self.stop())
        return self.stop_button

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Ask the running work to stop (what the Stop button does); it stops at its next checkpoint."""
        if self.running or self.run_button.disabled:
            self._cancel.set()
            self.stop_button.disabled = True

    def wait(self, timeout: float | None = None):
        """Wait for work started with ``wait=False`` (or by a click); returns ``.result`` (None after an error)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result if self.error is None else None

    def _check_idle(self) -> None:
        if self.running:
            raise RuntimeError("this panel is already running; stop() it or wait() for it first")

    def _outcome(self, work: Callable[[], Any], interrupted: str, stopped: Callable[[Exception], str] = str):
        """``work()``'s result; or None once the panel shows why it failed or stopped (an exception escaping a
        click handler would be lost in the kernel log). ``stopped(exc)`` words a stop asked for with Stop."""
        try:
            return work()
        except MergeCancelled as exc:
            return self._fail(stopped(exc), stopped=True)
        except NBMergeError as exc:
            return self._fail(str(exc))
        except KeyboardInterrupt:
            return self._fail(interrupted)
        except Exception as exc:
            return self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, message: str, stopped: bool = False) -> None:
        self.error = message
        self.progress.bar_style = "warning" if stopped else "danger"
        self._set_status(f"<span style='color:#8a5300'>{html.escape(message)}</span>" if stopped
                         else f"<span style='color:#b00020'>error: {html.escape(message)}</span>")

    def _set_status(self, text: str) -> None:
        self.status.value = f"<div class='nbmerge-status'>{text}</div>"

    def _launch(self, work: Callable[[threading.Event], Any], wait: bool):
        self._check_idle()
        self._cancel = threading.Event()
        self.run_button.disabled, self.stop_button.disabled = True, False

        def run():
            try:
                work(self._cancel)
            finally:
                self.run_button.disabled, self.stop_button.disabled = False, True

        if wait:
            run()
            return self.result if self.error is None else None
        self._thread = threading.Thread(target=run, name=f"nbmerge-{type(self).__name__}", daemon=True)
        self._thread.start()
        return None


class MergePanel(_BackgroundPanel):
    """``MergePanel(models, base=None, pool=None, method=None, out=None, device="auto")``.

    models/base: what ``nbmerge.merge`` accepts (paths, state dicts, nn.Modules; a list or a {name: model} dict).
    pool: a task pool (or its registered name) to evaluate each merge on (a module-building method such as
    we_moe adapts on it too). ``.result`` is the last MergeResult, ``.report`` its evaluation, ``.error`` the last
    error message (None after a successful merge; "stopped ..." after a click on Stop).

    The **output** field (``out``) names a folder each merge is written to (empty: merged in memory), replacing
    an existing one only when **overwrite** is ticked (ticked when ``out`` is given). **Save** writes the last
    merge there (``MergeResult.save``) with its evaluation in the model card; a merge written to a folder gets
    its evaluation in its card as soon as it is evaluated.
    """

    def __init__(self, models, base=None, *, pool=None, method: str | None = None, out=None, device: str = "auto",
                 tasks=None, split: str = "test"):
        self.models, self.base, self.device = models, base, device
        self.pool, self.tasks, self.split = pool, tasks, split
        self.result = None
        self.report = None
        self.error: str | None = None
        self.reports: dict[str, Any] = {}
        self._methods = {name: m for name, m in all_methods().items() if _accepts(m, model_count(models), base)}
        if not self._methods:
            raise ValueError(f"no registered method merges {model_count(models)} model(s)"
                             f"{' with' if base is not None else ' without'} a base")
        chosen = method or next((name for name in ("task_arithmetic", "weighted_average") if name in self._methods),
                                next(iter(self._methods)))
        if chosen not in self._methods:
            raise ValueError(f"method {chosen!r} cannot merge these models; choose one of {', '.join(self._methods)}")
        self.method = widgets.Dropdown(options=list(self._methods), value=chosen, description="method")
        self.formula = widgets.HTML()
        self.controls: dict[str, widgets.Widget] = {}
        self.params_box = widgets.VBox()
        self.merge_button = self.run_button = widgets.Button(description="Merge", button_style="primary", icon="play")
        self._make_stop_button()
        self.out_folder = widgets.Text(value="" if out is None else str(out), description="output",
                                       placeholder="a folder to write each merge to (empty: in memory)",
                                       layout={"width": "420px"})
        self.overwrite = widgets.Checkbox(value=out is not None, description="overwrite", indent=False)
        self.save_button = widgets.Button(description="Save", icon="save", disabled=True,
                                          tooltip="write the last merge to the output folder, its evaluation in "
                                                  "the model card")
        self.save_button.on_click(lambda _button: self.save())
        self.progress_bar = ProgressBar(layout={"width": "420px"})
        self.progress, self.progress_text = self.progress_bar.bar, self.progress_bar.label
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.method.observe(self._method_changed, names="value")
        self.merge_button.on_click(lambda _button: self.merge(wait=False))
        self._show_controls(chosen)
        title = widgets.HTML(f"<b>nbmerge</b>: {model_count(models)} model(s)"
                             f"{', base model' if base is not None else ''}"
                             f"{', evaluated on ' + html.escape(_pool_name(pool)) if pool is not None else ''}")
        super().__init__([title, self.method, self.formula, self.params_box,
                          widgets.HBox([self.out_folder, self.overwrite, self.save_button]),
                          widgets.HBox([self.merge_button, self.stop_button, self.progress, self.progress_text]),
                          self.status, self.output])

    @property
    def out(self) -> str | None:
        """The output folder the field holds (None: merge in memory)."""
        return self.out_folder.value.strip() or None

    # -- building the call -------------------------------------------------------------------------------------
    def params(self) -> dict:
        """The parameters the controls hold (those left empty take the declared default)."""
        method = self._methods[self.method.value]
        values = {p.name: control_value(p, self.controls[p.name]) for p in method.params}
        return {name: value for name, value in values.items() if value is not None}

    def merge(self, wait: bool = True):
        """Merge with the chosen method and parameters, then evaluate on the pool if one was given.

        wait=True: in this thread; returns the MergeResult (None after an error or a stop, see ``.error``).
        wait=False (the Merge button): in a background thread, returns None at once; ``stop()`` / ``wait()``.
        """
        self._check_idle()
        method, params = self.method.value, self.params()
        self.progress_bar.reset()
        self._set_status("merging…")
        return self._launch(lambda cancel: self._merge(method, params, cancel), wait)

    def _merge(self, method: str, params: dict, cancel: threading.Event) -> None:
        result = self._outcome(lambda: self._merged_and_evaluated(method, params, cancel),
                               interrupted="interrupted; nothing was written")
        if result is None:
            return
        self.result, self.error = result, None
        self.save_button.disabled = False
        self.progress.bar_style = "success"
        self._set_status(html.escape(merge_summary(result)))

    def save(self, path=None):
        """Write the last merge to ``path`` (default: the output field) with its evaluation in the model card, as
        the Save button does; returns the path (None after an error, shown in the panel and kept in ``.error``)."""
        target = path or self.out
        if self.result is None or target is None:
            self._fail("nothing to save: merge first" if self.result is None
                       else "type an output folder to save the merge to")
            return None
        saved = self._outcome(lambda: self.result.save(target, overwrite=self.overwrite.value,
                                                       evaluation=self.report), interrupted="interrupted")
        if saved is not None:
            self.error = None
            self._set_status(f"saved to {html.escape(str(saved))}")
        return saved

    # -- callbacks ---------------------------------------------------------------------------------------------
    def _method_changed(self, change) -> None:
        self._show_controls(change["new"])

    def _show_controls(self, name: str) -> None:
        method = self._methods[name]
        for control in self.controls.values():
            control.close()
        self.controls = {param.name: make_control(param, name) for param in method.params}
        self.params_box.children = tuple(self.controls.values())
        self.formula.value = f"{html.escape(method.summary)}: <code>{html.escape(method.formula)}</code>"

    def _merged_and_evaluated(self, method: str, params: dict, cancel: threading.Event):
        from nbmerge.api import merge

        if self._methods[method].build_module is not None:  # trains on the pool's unlabeled inputs
            where = {"pool": _resolve_pool(self) if self.pool is not None else None, "split": self.split}
        else:
            where = {"device": self.device}
        self.report = None
        result = merge(method, self.models, base=self.base, out=self.out, overwrite=self.overwrite.value,
                       progress=False, on_progress=self.progress_bar.update, cancel=cancel, **where, **params)
        if self.pool is not None:
            self._evaluate(result, cancel)
            if result.path is not None and result.path.is_dir():  # the written folder's card gets its scores
                result.save(result.path, evaluation=self.report)
        return result

    # -- evaluation --------------------------------------------------------------------------------------------
    def _evaluate(self, result, cancel: threading.Event) -> None:
        from nbmerge.engine.progress import check_cancel
        from nbmerge.workbench import plots
        from nbmerge.workbench.evaluation import evaluate

        check_cancel(cancel, "before evaluating the merge")
        label = _label(result)
        self._set_status(f"evaluating {html.escape(label)}…")
        self.progress_bar.reset()  # the bar now counts the pool's tasks, not the merge's bytes
        report = evaluate(result, _resolve_pool(self), split=self.split, tasks=self.tasks, name=label,
                          progress=False, on_progress=self.progress_bar.update, cancel=cancel)
        self.report = report
        self.reports[label] = report
        while len(self.reports) > HISTORY:
            self.reports.pop(next(iter(self.reports)))
        self.output.outputs = (_output(report), *(_output(f) for f in plots.report_figures(dict(self.reports))))


def _resolve_pool(panel):
    """The panel's task pool; a pool given by name is built once and kept."""
    if isinstance(panel.pool, str):
        panel.pool = task_pool(panel.pool, progress=False)
    return panel.pool


def _accepts(method, n_models: int, base) -> bool:
    try:
        method.check_inputs(n_models, base is not None)
    except ParameterError:
        return False
    return True


def _pool_name(pool) -> str:
    return pool if isinstance(pool, str) else getattr(pool, "name", type(pool).__name__)


def _label(result) -> str:
    """``method(param=value, ...)`` with the parameters that differ from their declared defaults."""
    defaults = {p.name: p.plain(p.default) for p in get_method(result.recipe["method"]).params}
    changed = ", ".join(f"{k}={v}" for k, v in result.recipe["params"].items() if v != defaults.get(k))
    return f"{result.recipe['method']}({changed})"


def _output(value) -> dict:
    """A display_data output for an Output widget: IPython's formats, images base64-encoded as in a kernel message
    (raw bytes would reach the browser as a binary buffer, not as an image)."""
    import base64

    from IPython.core.formatters import format_display_data

    data, metadata = format_display_data(value)
    data = {mime: base64.b64encode(content).decode("ascii") if isinstance(content, bytes) else content
            for mime, content in data.items()}
    return {"output_type": "display_data", "data": data, "metadata": metadata}


SWEEPABLE = ("float", "int", "schedule")


class SweepPanel(_BackgroundPanel):
    """``SweepPanel(models, base=None, *, pool, method=None, tasks=None, split="test")``.

    Choose a method, one of its numeric parameters, a range and a number of points; **Sweep** merges and evaluates
    each point (the other parameters at their defaults) and redraws the accuracy curve after every point.
    ``.result`` is the SweepResult (after a stop: the points done), ``.error`` the last error message.
    """

    def __init__(self, models, base=None, *, pool, method: str | None = None, tasks=None, split: str = "test",
                 device: str = "auto"):
        self.models, self.base, self.pool, self.tasks, self.split, self.device = models, base, pool, tasks, split, device
        self.result = None
        self.error: str | None = None
        self._methods = {name: m for name, m in all_methods().items()
                         if _accepts(m, model_count(models), base) and _sweepable(m)}
        if not self._methods:
            raise ValueError("no registered method with a numeric parameter merges these models")
        chosen = method or next((n for n in ("task_arithmetic", "ties") if n in self._methods), next(iter(self._methods)))
        if chosen not in self._methods:
            raise ValueError(f"method {chosen!r} cannot be swept on these models; choose one of "
                             f"{', '.join(self._methods)}")
        self.method = widgets.Dropdown(options=list(self._methods), value=chosen, description="method")
        self.param = widgets.Dropdown(description="parameter")
        self.span = widgets.FloatRangeSlider(description="range", readout_format=".2f", continuous_update=False,
                                             layout={"width": "420px"})
        self.points = widgets.IntSlider(value=5, min=2, max=15, description="points")
        self.sweep_button = self.run_button = widgets.Button(description="Sweep", button_style="primary", icon="play")
        self._make_stop_button()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout={"width": "420px"})
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.method.observe(lambda change: self._method_changed(), names="value")
        self.param.observe(lambda change: self._param_changed(), names="value")
        self.sweep_button.on_click(lambda _button: self.sweep(wait=False))
        self._method_changed()
        super().__init__([widgets.HTML(f"<b>nbmerge sweep</b>: {model_count(models)} model(s) on "
                                       f"{html.escape(_pool_name(pool))}"),
                          self.method, self.param, self.span, self.points,
                          widgets.HBox([self.sweep_button, self.stop_button, self.progress]), self.status,
                          self.output])

    def values(self) -> list:
        """The points of the sweep: ``points`` values evenly spaced over the range (integers rounded)."""
        declared = self._declared()
        low, high = self.span.value
        count = self.points.value
        values = [low + (high - low) * i / (count - 1) for i in range(count)]
        if declared.kind == "int":
            return sorted({int(round(v)) for v in values})
        return [round(v, 6) for v in values]

    def sweep(self, wait: bool = True):
        """Run the sweep; wait=True: in this thread, returns the SweepResult; wait=False (the Sweep button): in a
        background thread (``stop()`` ends it after the point in progress, ``wait()`` joins)."""
        self._check_idle()
        values = self.values()
        method, param = self.method.value, self.param.value
        self.progress.bar_style, self.progress.value, self.progress.max = "", 0, len(values)
        self.status.value = f"sweeping {html.escape(param)} over {len(values)} values…"
        self.output.outputs = ()
        return self._launch(lambda cancel: self._sweep(method, param, values, cancel), wait)

    def _sweep(self, method: str, param: str, values: list, cancel: threading.Event) -> None:
        from nbmerge.workbench import plots
        from nbmerge.workbench.sweep import sweep

        done = []

        def on_point(so_far) -> None:
            done[:] = [so_far]
            self.progress.value = len(so_far.values)
            self.output.outputs = (_output(plots.sweep_curve(so_far.param, so_far.values, so_far.reports)),)
            self.status.value = (f"{so_far.param}={so_far.values[-1]}: average accuracy "
                                 f"{so_far.reports[-1].average:.1f} ({len(so_far.values)}/{len(values)})")

        def stopped(_exc) -> str:
            self.result = done[0] if done else None  # a stopped sweep keeps its points so far
            return f"stopped after {len(done[0].values) if done else 0} of {len(values)} points"

        result = self._outcome(lambda: sweep(method, self.models, self.base, param=param, values=values,
                                             pool=_resolve_pool(self), split=self.split, tasks=self.tasks,
                                             on_point=on_point, device=self.device, cancel=cancel),
                               interrupted="interrupted", stopped=stopped)
        if result is None:
            return
        self.result, self.error = result, None
        self.progress.bar_style = "success"
        self.status.value = (f"<div class='nbmerge-status'>best {html.escape(result.param)} = {result.best} "
                             f"(average accuracy {max(result.averages):.1f})</div>")

    def _declared(self):
        return next(p for p in self._methods[self.method.value].params if p.name == self.param.value)

    def _method_changed(self) -> None:
        method = self._methods[self.method.value]
        names = [p.name for p in method.params if _is_sweepable(p)]
        self.param.options = names
        self.param.value = names[0]
        self._param_changed()

    def _param_changed(self) -> None:
        if self.param.value is None:
            return
        declared = self._declared()
        numbers = [v for v in declared.grid if isinstance(v, (int, float))]
        low = declared.low if declared.low is not None else min(numbers + [0.0])
        high = declared.high if declared.high is not None else max(numbers + [1.0, 2 * abs(float(declared.default))])
        step = (high - low) / 100
        if len(numbers) >= 2:
            chosen = (min(numbers), max(numbers))
        else:
            chosen = (low if declared.low_inclusive else low + step, high if declared.high_inclusive else high - step)
        with self.span.hold_trait_notifications():  # bounds and value are checked together, once
            self.span.min, self.span.max, self.span.step, self.span.value = low, high, step, chosen
        if len(numbers) >= 2:
            self.points.value = min(len(numbers), self.points.max)


def _is_sweepable(param) -> bool:
    return param.kind in SWEEPABLE and isinstance(param.default, (int, float)) and not isinstance(param.default, bool)


def _sweepable(method) -> bool:
    return any(_is_sweepable(p) for p in method.params)


class SearchPanel(_BackgroundPanel):
    """``SearchPanel(pool, method="ties", ranges=None, *, blocks=1, generations=10, population=None, seed=0,
    workers=0, address=None, checkpoint=None, fixed=None)``.

    **Search** runs ``nbmerge.search`` (CMA-ES over the ranges, one per line as ``name=low:high``) and redraws the
    fitness per generation as it goes; the best recipe so far is shown as YAML that ``%%merge`` runs. **Stop** ends
    the search after the generation in progress (with a checkpoint it resumes on the next Search). ``.result`` is
    the SearchResult (after a stop: the generations done), ``.error`` the last error message.
    """

    def __init__(self, pool: str, method: str = "ties", ranges: dict | None = None, *, blocks: int = 1,
                 generations: int = 10, population: int | None = None, seed: int = 0, workers: int = 0,
                 address: str | None = None, checkpoint=None, fixed: dict | None = None):
        self.pool, self.population, self.seed, self.address = pool, population, seed, address
        self.checkpoint, self.fixed = checkpoint, dict(fixed if fixed is not None else
                                                       {"trim_scope": "tensor"} if method == "ties" else {})
        self.result = None
        self.error: str | None = None
        get_method(method)
        ranges = ranges or {"density": (0.1, 1.0), "scaling": (0.3, 1.5)}
        self.method = widgets.Text(value=method, description="method")
        self.ranges = widgets.Textarea(value="\n".join(f"{k}={v[0]}:{v[1]}" for k, v in ranges.items()),
                                       description="ranges", layout={"width": "420px", "height": "70px"})
        self.blocks = widgets.IntSlider(value=blocks, min=1, max=8, description="blocks")
        self.generations = widgets.IntSlider(value=generations, min=1, max=100, description="generations")
        self.workers = widgets.IntText(value=workers, description="Ray workers")
        self.search_button = self.run_button = widgets.Button(description="Search", button_style="primary",
                                                              icon="play")
        self._make_stop_button()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout={"width": "420px"})
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.recipe = widgets.Textarea(description="best recipe", disabled=True,
                                       layout={"width": "640px", "height": "200px"})
        self.search_button.on_click(lambda _button: self.search(wait=False))
        super().__init__([widgets.HTML(f"<b>nbmerge search</b> on {html.escape(pool)}"), self.method, self.ranges,
                          self.blocks, self.generations, self.workers,
                          widgets.HBox([self.search_button, self.stop_button, self.progress]), self.status,
                          self.output, self.recipe])

    def parsed_ranges(self) -> dict[str, str]:
        """The ranges box as {name: "low:high"}."""
        ranges = {}
        for line in self.ranges.value.splitlines():
            if line.strip():
                name, sep, bounds = line.partition("=")
                if not sep:
                    raise ParameterError(f"search: range line {line.strip()!r} must read name=low:high")
                ranges[name.strip()] = bounds.strip()
        return ranges

    def search(self, wait: bool = True):
        """Run the search; wait=True: in this thread, returns the SearchResult; wait=False (the Search button): in
        a background thread (``stop()`` ends it after the generation in progress, ``wait()`` joins)."""
        self._check_idle()
        self.progress.bar_style, self.progress.value, self.progress.max = "", 0, self.generations.value
        self._set_status("searching…")
        self.output.outputs = ()
        return self._launch(self._search, wait)

    def _search(self, cancel: threading.Event) -> None:
        from nbmerge.merge_search.runner import search

        def on_generation(so_far) -> None:
            self.result = so_far
            self.progress.value = len(so_far.generations)
            self.output.outputs = (_output(so_far.figure()),)
            self.recipe.value = so_far.recipe()
            self._set_status(f"generation {len(so_far.generations)}/{self.generations.value}: best validation "
                             f"{so_far.best_fitness:.2f}")

        result = self._outcome(lambda: search(self.pool, self.method.value, self.parsed_ranges(),
                                              blocks=self.blocks.value, fixed=self.fixed,
                                              generations=self.generations.value, population=self.population,
                                              seed=self.seed, workers=self.workers.value, address=self.address,
                                              checkpoint=self.checkpoint, on_generation=on_generation,
                                              cancel=cancel),
                               interrupted="interrupted", stopped=lambda exc: "stopped before the first generation")
        if result is None:
            return
        self.result, self.error = result, None
        self.recipe.value = result.recipe()
        self.progress.bar_style = "success"
        stopped = " (stopped)" if len(result.generations) < self.generations.value else ""
        self._set_status(f"best validation {result.best_fitness:.2f}, its test {result.test_average:.2f} after "
                         f"{len(result.generations)} generation(s){stopped}")
