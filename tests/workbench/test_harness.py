"""The lm-evaluation-harness bridge, offline: a task of lm_eval's YAML format over a local JSON file, run on the
real SmolLM2-135M, scores what nbmerge's own multiple-choice pool scores on the same items."""

import json

import pytest

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError
from nbmerge.workbench.models import causal_lm

DOCS = [{"question": prompt, "choices": [c.strip() for c in choices], "label": answer if i % 2 == 0 else 1}
        for i, (prompt, choices, answer) in enumerate(causal_lm.PROMPTS)]  # half the labels wrong: acc ≠ 1


@pytest.fixture(scope="module")
def smollm2():
    return causal_lm.smollm2()


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "facts.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / "facts.yaml").write_text(f"""task: nbmerge_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'facts.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def test_a_local_task_scores_as_nbmerge_scores_the_same_items(smollm2, task_folder):
    report = nbmerge.evaluate_harness(smollm2, "nbmerge_facts", include_path=task_folder)
    # lm_eval's multiple choice: context, then " " + choice, the choice with the highest summed log-likelihood
    items = [(doc["question"], [" " + c for c in doc["choices"]], doc["label"]) for doc in DOCS]
    own = nbmerge.evaluate(smollm2, nbmerge.lm_pool(smollm2, choices=items), progress=False)
    assert report.results["nbmerge_facts"]["acc"] == pytest.approx(own.accuracy["choices"] / 100)
    assert 0 < report.results["nbmerge_facts"]["acc"] < 1
    assert report.documents == {"nbmerge_facts": len(DOCS)}
    assert report.rows[0]["task"] == "nbmerge_facts" and "acc" in report._repr_html_()
    # a merge held in memory is scored with the base's folder's config and tokenizer: ExPO of a model with itself
    same = nbmerge.merge("expo", [smollm2], base=smollm2, progress=False, alpha=0.5)
    merged = nbmerge.evaluate_harness(same, ["nbmerge_facts"], tokenizer=smollm2, include_path=task_folder)
    assert merged.results == report.results


def test_unknown_tasks_and_misfit_weights_are_one_line_errors(smollm2, task_folder):
    with pytest.raises(ParameterError, match="no task named 'nbmerge_fact' \\(lm_eval's own or in "):
        nbmerge.evaluate_harness(smollm2, "nbmerge_fact", include_path=task_folder)
    same = nbmerge.merge("expo", [smollm2], base=smollm2, progress=False, alpha=0.5)
    with pytest.raises(ParameterError, match="pass tokenizer=FOLDER"):
        nbmerge.evaluate_harness(same, "nbmerge_facts", include_path=task_folder)
    state = dict(same.state_dict)
    state["model.layers.30.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ModelInputError, match="holds 31 layers"):
        nbmerge.evaluate_harness(state, "nbmerge_facts", tokenizer=smollm2, include_path=task_folder)
