"""Widget panels: ``MergePanel`` — pick a method, set its parameters, merge, see progress, result and scores.

The panel is thin: its controls come from the method's ``Param`` declarations (``nbmerge.controls``) and its
Merge button calls ``nbmerge.merge`` — the API the magics call — with ``on_progress`` driving a bytes progress
bar. Errors (bad values, unreadable models, an interrupt) are shown in the panel and kept in ``.error``. With a
task pool, every merge is evaluated and the panel shows the report and a per-task bar chart of the merges so far.
"""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as widgets

from .controls import control_value, make_control
from .display import human_bytes, merge_summary

HISTORY = 6  # merges kept in the panel's bar chart


class MergePanel(widgets.VBox):
    """``MergePanel(models, base=None, pool=None, method=None, out=None, device="auto")``.

    models/base: what ``nbmerge.merge`` accepts (paths, state dicts, nn.Modules; a list or a {name: model} dict).
    pool: a task pool (or its registered name) to evaluate each merge on. ``.result`` is the last MergeResult,
    ``.report`` its evaluation, ``.error`` the last error message (None after a successful merge).
    """

    def __init__(self, models, base=None, *, pool=None, method: str | None = None, out=None, device: str = "auto"):
        from .registry import all_methods

        self.models, self.base, self.out, self.device = models, base, out, device
        self.pool = pool
        self.result = None
        self.report = None
        self.error: str | None = None
        self.reports: dict[str, Any] = {}
        self._methods = {name: m for name, m in all_methods().items() if _accepts(m, _count(models), base)}
        if not self._methods:
            raise ValueError(f"no registered method merges {_count(models)} model(s)"
                             f"{' with' if base is not None else ' without'} a base")
        chosen = method or next((name for name in ("task_arithmetic", "weighted_average") if name in self._methods),
                                next(iter(self._methods)))
        if chosen not in self._methods:
            raise ValueError(f"method {chosen!r} cannot merge these models; choose one of {', '.join(self._methods)}")
        self.method = widgets.Dropdown(options=list(self._methods), value=chosen, description="method")
        self.formula = widgets.HTML()
        self.controls: dict[str, widgets.Widget] = {}
        self.params_box = widgets.VBox()
        self.merge_button = widgets.Button(description="Merge", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="", layout={"width": "420px"})
        self.progress_text = widgets.HTML()
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.method.observe(self._method_changed, names="value")
        self.merge_button.on_click(lambda _button: self.merge())
        self._show_controls(chosen)
        title = widgets.HTML(f"<b>nbmerge</b>: {_count(models)} model(s)"
                             f"{', base model' if base is not None else ''}"
                             f"{', evaluated on ' + html.escape(_pool_name(pool)) if pool is not None else ''}")
        super().__init__([title, self.method, self.formula, self.params_box,
                          widgets.HBox([self.merge_button, self.progress, self.progress_text]),
                          self.status, self.output])

    # -- building the call -------------------------------------------------------------------------------------
    def params(self) -> dict:
        """The parameters the controls hold (those left empty take the declared default)."""
        method = self._methods[self.method.value]
        values = {p.name: control_value(p, self.controls[p.name]) for p in method.params}
        return {name: value for name, value in values.items() if value is not None}

    def merge(self):
        """Merge with the chosen method and parameters (what the Merge button does); returns the MergeResult."""
        from .api import merge
        from .errors import NBMergeError

        self.merge_button.disabled = True
        self.progress.bar_style = ""
        self.progress.value = 0
        self._set_status("merging…")
        try:
            result = merge(self.method.value, self.models, base=self.base, out=self.out, device=self.device,
                           overwrite=self.out is not None, progress=False, on_progress=self._on_progress,
                           **self.params())
            if self.pool is not None:
                self._evaluate(result)
        except NBMergeError as exc:
            return self._fail(str(exc))
        except KeyboardInterrupt:
            return self._fail("interrupted; nothing was written")
        except Exception as exc:  # a click handler's exception would be lost in the kernel log: show it
            return self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.merge_button.disabled = False
        self.result, self.error = result, None
        self.progress.bar_style = "success"
        self._set_status(html.escape(merge_summary(result)))
        return result

    # -- callbacks ---------------------------------------------------------------------------------------------
    def _on_progress(self, event) -> None:
        if event.total != self.progress.max:
            self.progress.max = max(event.total, 1)
        # one widget message per percent at most: a model has thousands of tensors
        if event.done == event.total or event.done - self.progress.value >= event.total / 100:
            self.progress.value = event.done
            phase = "" if event.phase in ("", "merge") else f" ({html.escape(event.phase)})"
            self.progress_text.value = f"{human_bytes(event.done)} / {human_bytes(event.total)}{phase}"

    def _method_changed(self, change) -> None:
        self._show_controls(change["new"])

    def _show_controls(self, name: str) -> None:
        method = self._methods[name]
        for control in self.controls.values():
            control.close()
        self.controls = {param.name: make_control(param) for param in method.params}
        self.params_box.children = tuple(self.controls.values())
        self.formula.value = f"{html.escape(method.summary)}: <code>{html.escape(method.formula)}</code>"

    def _fail(self, message: str):
        self.error = message
        self.progress.bar_style = "danger"
        self._set_status(f"<span style='color:#b00020'>error: {html.escape(message)}</span>")
        return None

    def _set_status(self, text: str) -> None:
        self.status.value = f"<div class='nbmerge-status'>{text}</div>"

    # -- evaluation --------------------------------------------------------------------------------------------
    def _evaluate(self, result) -> None:
        import nbmerge
        from . import plots

        self._set_status("evaluating…")
        pool = nbmerge.task_pool(self.pool) if isinstance(self.pool, str) else self.pool
        report = nbmerge.evaluate(result, pool, progress=False)
        self.report = report
        label = _label(result)
        self.reports[label] = report
        while len(self.reports) > HISTORY:
            self.reports.pop(next(iter(self.reports)))
        figure = plots.accuracy_bars(dict(self.reports))
        self.output.clear_output()
        self.output.append_display_data(_HTMLText(report._repr_html_()))
        self.output.append_display_data(_png(figure))


def _accepts(method, n_models: int, base) -> bool:
    from .method import BASE_REQUIRED, BASE_UNUSED

    if method.base == BASE_REQUIRED and base is None or method.base == BASE_UNUSED and base is not None:
        return False
    return n_models >= method.min_models and (method.max_models is None or n_models <= method.max_models)


def _count(models) -> int:
    import torch

    if isinstance(models, (str, torch.nn.Module)):
        return 1
    if isinstance(models, dict) and models and all(isinstance(v, torch.Tensor) for v in models.values()):
        return 1
    return len(models)


def _pool_name(pool) -> str:
    return pool if isinstance(pool, str) else getattr(pool, "name", type(pool).__name__)


def _label(result) -> str:
    params = ", ".join(f"{k}={v}" for k, v in result.recipe["params"].items() if v is not None)
    return f"{result.recipe['method']}({params})"


class _HTMLText:
    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text


def _png(figure):
    """A matplotlib figure as an IPython Image (rendered here, so no inline backend is needed), then closed."""
    import matplotlib.pyplot as plt
    from IPython.display import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return Image(data=buffer.getvalue(), format="png")
