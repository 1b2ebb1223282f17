"""The one renderer of ``ProgressEvent`` in a notebook: a progress bar and a label, for the magics and the panels.

The label reads ``read / total`` in bytes (with the pass name for a whole-model stage), ``training step done /
total`` for a module-building method, ``task done / total`` with the task's name while a model is evaluated, or
``reply done / total`` with the model's label while models generate. The bar moves in steps of at least a percent, so a merge of thousands of
tensors sends about a hundred widget messages, not thousands.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from nbmerge.display import human_bytes


COUNTED = {"adapt": "training step", "evaluate": "task", "generate": "reply"}  # phases that count units, not bytes


class ProgressBar:
    """``bar`` (IntProgress) and ``label`` (HTML) following the events given to ``update``."""

    def __init__(self, description: str = "", layout: dict | None = None):
        self.bar = widgets.IntProgress(value=0, min=0, max=1, description=description, layout=layout or {},
                                       style={"description_width": "initial"})
        self.label = widgets.HTML()

    def reset(self) -> None:
        self.bar.bar_style, self.bar.value, self.label.value = "", 0, ""

    def update(self, event) -> None:
        if event.total != self.bar.max:
            self.bar.max = max(event.total, 1)
        if 0 < event.done != event.total and event.done - self.bar.value < event.total / 100:
            return  # the first and the last event always show
        self.bar.value = event.done
        if event.phase in COUNTED:
            name = f": {html.escape(event.tensor)}" if event.tensor else ""
            self.label.value = f"{COUNTED[event.phase]} {event.done} / {event.total}{name}"
            return
        phase = "" if event.phase in ("", "merge") else f" ({html.escape(event.phase)})"
        self.label.value = f"{human_bytes(event.done)} / {human_bytes(event.total)}{phase}"

    def close(self) -> None:
        """Close the widgets (closed widgets are not saved with the notebook)."""
        _close(self.bar, self.label)


class CellProgress(ProgressBar):
    """A ProgressBar shown in a cell's output while a magic runs, then replaced by a summary line.

    The bar and the summary share one display id, so a saved notebook keeps the summary, not a finished bar.
    """

    def __init__(self, description: str):
        from IPython.display import display

        super().__init__(description)
        self.box = widgets.HBox([self.bar, self.label])
        self.handle = display(self.box, display_id=True)

    def finish(self, summary: str = "") -> None:
        """Replace the bar by ``summary`` (nothing when empty) and release the widgets."""
        from IPython.display import Pretty

        self.handle.update(Pretty(summary))
        _close(self.box, self.bar, self.label)


def _close(*shown: widgets.Widget) -> None:
    for widget in shown:
        widget.close()
        widget.layout.close()
        if hasattr(widget, "style"):
            widget.style.close()
