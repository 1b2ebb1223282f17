"""``GenerationPanel``: edit prompts, generate with every model, see the replies side by side.

The panel calls ``nbmerge.compare_generations`` (the API) with the prompts of its text box (one per line), the
number of new tokens and the decoding (greedy, or sampled with a seed); the table replaces the panel's output, and
a progress bar counts the replies. Generate runs in a background thread (Stop ends it before the next reply);
``panel.generate()`` runs it in the calling thread and returns the ``GenerationTable``.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Mapping, Sequence

import ipywidgets as widgets

from nbmerge.notebook.panels import _BackgroundPanel, _output
from nbmerge.notebook.progress_bar import ProgressBar
from nbmerge.results import model_count


class GenerationPanel(_BackgroundPanel):
    """``GenerationPanel(models, prompts=(), *, tokenizer=None, max_new_tokens=48, seed=None)``.

    models: {label: model} or a list (folders, state dicts, MergeResults). tokenizer: the folder whose tokenizer
    (and config, for models that are not folders) is used. ``.result`` is the last GenerationTable, ``.error``
    the last error message.
    """

    def __init__(self, models: Sequence[Any] | Mapping[str, Any], prompts: Sequence[str] = (), *, tokenizer=None,
                 max_new_tokens: int = 48, seed: int | None = None):
        self.models, self.tokenizer = models, tokenizer
        self.result = None
        self.error: str | None = None
        self.prompts = widgets.Textarea(value="\n".join(prompts), description="prompts",
                                        placeholder="one prompt per line", layout={"width": "640px",
                                                                                   "height": "90px"})
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=256, description="new tokens")
        self.sampled = widgets.Checkbox(value=seed is not None, description="sample (else greedy)")
        self.seed = widgets.IntText(value=seed or 0, description="seed", layout={"width": "160px"})
        self.generate_button = self.run_button = widgets.Button(description="Generate", button_style="primary",
                                                                icon="play")
        self._make_stop_button()
        self.progress_bar = ProgressBar(layout={"width": "320px"})
        self.progress, self.progress_text = self.progress_bar.bar, self.progress_bar.label
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.generate_button.on_click(lambda _button: self.generate(wait=False))
        super().__init__([widgets.HTML(f"<b>nbmerge generations</b>: {model_count(models)} model(s), the same "
                                       "prompts side by side"), self.prompts,
                          widgets.HBox([self.max_new_tokens, self.sampled, self.seed]),
                          widgets.HBox([self.generate_button, self.stop_button, self.progress, self.progress_text]),
                          self.status, self.output])

    def prompt_list(self) -> list[str]:
        """The text box's prompts: one per non-empty line."""
        return [line.strip() for line in self.prompts.value.splitlines() if line.strip()]

    def generate(self, wait: bool = True):
        """Generate with every model; wait=True: in this thread, returns the GenerationTable; wait=False (the
        Generate button): in a background thread (``stop()`` ends it before the next reply, ``wait()`` joins)."""
        self._check_idle()
        prompts, settings = self.prompt_list(), {"max_new_tokens": self.max_new_tokens.value,
                                                 "seed": self.seed.value if self.sampled.value else None}
        self.progress_bar.reset()
        self._set_status(f"generating {len(prompts)} prompt(s) with {model_count(self.models)} model(s)…")
        return self._launch(lambda cancel: self._generate(prompts, settings, cancel), wait)

    def _generate(self, prompts: list[str], settings: dict, cancel: threading.Event) -> None:
        from nbmerge.workbench.generation import compare_generations

        table = self._outcome(lambda: compare_generations(self.models, prompts, tokenizer=self.tokenizer,
                                                          on_progress=self.progress_bar.update, cancel=cancel,
                                                          **settings),
                              interrupted="interrupted", stopped=lambda exc: "stopped")
        if table is None:
            return
        self.result, self.error = table, None
        self.progress.bar_style = "success"
        seconds = ", ".join(f"{html.escape(label)} {s:.1f} s" for label, s in table.seconds.items())
        self._set_status(f"done ({seconds})")
        self.output.outputs = (_output(table),)
