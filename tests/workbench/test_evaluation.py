"""evaluate(): accuracy checked against a one-text-at-a-time computation with transformers itself."""

import json

import pytest
import torch

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError
from nbmerge.workbench.evaluation import EvalReport


def _reference_accuracy(model_folder, zoo, task_name, split="test"):
    """Accuracy computed independently: transformers' own loader, no batching, no padding."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    encoder = AutoModel.from_pretrained(model_folder, add_pooling_layer=False).eval()
    task = zoo.pool.task(task_name)
    correct = 0
    with torch.inference_mode():
        for text, label in zip(task.texts(split), task.labels(split).tolist()):
            ids = tokenizer(text, truncation=True, max_length=zoo.profile.max_length, return_tensors="pt")
            cls = encoder(**ids).last_hidden_state[0, 0]
            correct += int((task.head.weight @ cls + task.head.bias).argmax()) == label
    return 100 * correct / len(task.texts(split))


def test_accuracy_matches_an_independent_computation(tiny_zoo):
    folder = tiny_zoo.models["chat_topic"]
    report = nbmerge.evaluate(folder, tiny_zoo.pool, tasks=["chat_topic", "debate_party"], progress=False)
    assert report.accuracy["chat_topic"] == pytest.approx(_reference_accuracy(folder, tiny_zoo, "chat_topic"))
    assert report.accuracy["debate_party"] == pytest.approx(_reference_accuracy(folder, tiny_zoo, "debate_party"))
    assert report.examples["chat_topic"] == len(tiny_zoo.pool.task("chat_topic").labels("test"))
    # the individual accuracy is the task's own fine-tuned model on that task
    assert report.individual["chat_topic"] == pytest.approx(report.accuracy["chat_topic"])
    assert report.normalized["debate_party"] == pytest.approx(
        100 * report.accuracy["debate_party"] / report.individual["debate_party"])


def test_every_model_form_gives_the_same_report(tiny_zoo):
    result = nbmerge.merge("task_arithmetic", tiny_zoo.models, base=tiny_zoo.base, progress=False)
    by_result = nbmerge.evaluate(result, tiny_zoo.pool, tasks=["sentiment"], progress=False)
    by_state = nbmerge.evaluate(result.state_dict, tiny_zoo.pool, tasks=["sentiment"], progress=False)
    module = tiny_zoo.pool.load_encoder(result.state_dict)
    by_module = nbmerge.evaluate(module, tiny_zoo.pool, tasks=["sentiment"], progress=False)
    assert by_result.accuracy == by_state.accuracy == by_module.accuracy
    assert by_result.model == "task_arithmetic"


def test_report_prints_renders_and_round_trips(tiny_zoo, tmp_path):
    report = nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, name="pretrained", progress=False)
    assert report.average == pytest.approx(sum(report.accuracy.values()) / 5)
    text = str(report)
    assert "pretrained on minilm-tiny (test)" in text and f"{report.average:.1f}" in text.splitlines()[-1]
    html = report._repr_html_()
    assert html.count("<tr>") == 7 and f"{report.accuracy['sentiment']:.1f}" in html
    report.to_json(tmp_path / "r.json")
    again = EvalReport.from_json(tmp_path / "r.json")
    assert again == report and json.loads(report.to_json())["normalized_average"] == report.normalized_average


def test_wrong_architecture_and_names_are_clear_errors(tiny_zoo, llama_set):
    with pytest.raises(ModelInputError, match="lacks .* encoder weight"):
        nbmerge.evaluate(llama_set.base, tiny_zoo.pool, progress=False)
    with pytest.raises(KeyError, match="no task 'sentimen'"):
        nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, tasks=["sentimen"], progress=False)
    with pytest.raises(ParameterError, match="unknown task pool 'minilm-tine'; did you mean 'minilm-tiny'"):
        nbmerge.evaluate(tiny_zoo.base, "minilm-tine", progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        nbmerge.evaluate(tiny_zoo.base, tiny_zoo.pool, split="dev", progress=False)


def test_wrong_shapes_are_named(tiny_zoo):
    state = dict(tiny_zoo.pool.load_encoder(tiny_zoo.base).state_dict())
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelInputError, match=r"tensor 'encoder.layer.0.output.dense.weight' has shape \(3, 3\), "
                                              r"expected \(384, 1536\)"):
        tiny_zoo.pool.load_encoder(state)
