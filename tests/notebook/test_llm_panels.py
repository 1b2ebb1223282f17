"""The panels on a causal LM (the real SmolLM2-135M): MergePanel's bar counts the pool's tasks while it evaluates a
merge, and GenerationPanel shows the replies of nbmerge.compare_generations."""

from __future__ import annotations

import pytest

import nbmerge
from nbmerge.notebook.generation_panel import GenerationPanel
from nbmerge.notebook.panels import MergePanel
from nbmerge.workbench.models.causal_lm import smollm2 as build_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return build_smollm2()


def test_merge_panel_counts_tasks_while_it_evaluates_a_causal_lm(smollm2):
    pool = nbmerge.lm_pool(smollm2, texts={"news": ["Rain is expected across the region tomorrow afternoon."]},
                           choices=[("The capital of France is", [" Paris", " Berlin"], 0)])
    panel = MergePanel([smollm2, smollm2], pool=pool, method="weighted_average")
    labels: list[str] = []
    panel.progress_text.observe(lambda change: labels.append(change["new"]), names="value")
    panel.merge()
    assert panel.error is None
    evaluating = labels[labels.index("task 0 / 2: news"):]
    assert evaluating == ["task 0 / 2: news", "task 1 / 2: choices", "task 2 / 2"]
    assert (panel.progress.value, panel.progress.max) == (2, 2)
    expected = nbmerge.evaluate(smollm2, pool, progress=False)  # the average of a model with itself is the model
    assert panel.report.perplexity["news"] == pytest.approx(expected.perplexity["news"], rel=1e-5)
    table, *figures = panel.output.outputs
    assert "perplexity" in table["data"]["text/html"] and len(figures) == 2  # accuracy bars and perplexity bars


def test_generation_panel_shows_the_replies_of_compare_generations(smollm2):
    panel = GenerationPanel({"instruct": smollm2}, ["Who wrote Hamlet?", "", "Name a fruit."], max_new_tokens=3)
    assert panel.prompt_list() == ["Who wrote Hamlet?", "Name a fruit."]
    table = panel.generate()
    assert panel.error is None
    assert table.texts == nbmerge.compare_generations({"instruct": smollm2}, panel.prompt_list(),
                                                      max_new_tokens=3).texts
    assert panel.progress_text.value == "reply 2 / 2"
    assert "Who wrote Hamlet?" in panel.output.outputs[0]["data"]["text/html"]
    panel.prompts.value = "   "
    assert panel.generate() is None and "non-empty prompts" in panel.error
