"""Causal-LM task pools on the real SmolLM2-135M: perplexity and multiple-choice accuracy through nbmerge.evaluate,
each checked against an independent computation with transformers' own model, and the refusal of weights that do
not fit the config."""

import math

import pytest
import torch

import nbmerge
from nbmerge.errors import ModelInputError, ParameterError
from nbmerge.workbench.models import causal_lm
from nbmerge.workbench.models.lmpool import CausalLMPool, lm_pool

TEXTS = {"news": ["The committee met on Tuesday to discuss the budget for next year.",
                  "Rain is expected across the region tomorrow afternoon."],
         "chat": ["<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nI am fine, thanks.<|im_end|>\n"]}
# half of the answers point at the wrong choice, so that accuracy is not 100 by construction
ITEMS = [(prompt, choices, answer if i % 2 == 0 else 1) for i, (prompt, choices, answer) in
         enumerate(causal_lm.PROMPTS)]


@pytest.fixture(scope="module")
def smollm2():
    return causal_lm.smollm2()


@pytest.fixture(scope="module")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2))


@pytest.fixture(scope="module")
def base_report(smollm2):
    return nbmerge.evaluate(smollm2, lm_pool(smollm2, texts=TEXTS, choices=ITEMS), progress=False)


def test_perplexity_per_domain_equals_transformers_loss(base_report, reference):
    model, tokenizer = reference
    for domain, texts in TEXTS.items():
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                nll += model(input_ids=ids, labels=ids).loss.double().item() * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
        assert base_report.perplexity[domain] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert base_report.examples[domain] == len(texts)
    assert base_report.perplexity["news"] < 200  # a real LM, not random weights (~49k vocabulary)


def test_choice_accuracy_equals_a_hand_computation(base_report, reference):
    model, tokenizer = reference
    correct = 0
    with torch.no_grad():
        for prompt, choices, answer in ITEMS:
            context = tokenizer(prompt)["input_ids"]
            scores = []
            for choice in choices:
                ids = context + tokenizer(choice, add_special_tokens=False)["input_ids"]
                log_probs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
                scores.append(sum(log_probs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
            correct += scores.index(max(scores)) == answer
    assert base_report.accuracy == {"choices": pytest.approx(100 * correct / len(ITEMS))}
    assert 0 < base_report.accuracy["choices"] < 100
    assert base_report.average == base_report.accuracy["choices"]
    assert "perplexity" in base_report._repr_html_() and "news" in str(base_report)
    again = nbmerge.EvalReport.from_json(base_report.to_json())
    assert again.perplexity == base_report.perplexity


class CountingPool(CausalLMPool):
    loads = 0

    def load_encoder(self, model):
        self.loads += 1
        return super().load_encoder(model)


def test_one_load_per_evaluation_and_progress_per_task(smollm2):
    base = lm_pool(smollm2, texts=TEXTS, choices=ITEMS)
    pool = CountingPool("counting", smollm2, base.tasks)
    events = []
    report = nbmerge.evaluate(smollm2, pool, progress=False, on_progress=events.append)
    assert pool.loads == 1
    assert [(e.phase, e.done, e.total, e.tensor) for e in events] == [
        ("evaluate", 0, 3, "news"), ("evaluate", 1, 3, "chat"), ("evaluate", 2, 3, "choices"), ("evaluate", 3, 3, "")]
    assert set(report.perplexity) == {"news", "chat"}


def test_a_stack_of_another_depth_is_refused_naming_both_layer_counts(smollm2, tmp_path):
    forty = nbmerge.stack([nbmerge.LayerSlice([smollm2], (0, 30)), nbmerge.LayerSlice([smollm2], (10, 20))],
                          progress=False)
    pool = lm_pool(smollm2, texts=TEXTS["news"])
    with pytest.raises(ModelInputError, match="holds 40 layers but the config at .* has num_hidden_layers=30"):
        nbmerge.evaluate(forty, pool, progress=False)
    # written to a folder, the stack has its own 40-layer config and is scored as 40 layers
    written = nbmerge.stack([nbmerge.LayerSlice([smollm2], (0, 30)), nbmerge.LayerSlice([smollm2], (10, 20))],
                            out=tmp_path / "forty", progress=False)
    report = nbmerge.evaluate(written, pool, progress=False)
    base = nbmerge.evaluate(smollm2, pool, progress=False)
    assert report.perplexity["texts"] != pytest.approx(base.perplexity["texts"], rel=1e-3)
    # a folder whose config disagrees with its weights
    (tmp_path / "forty" / "config.json").write_text((smollm2 / "config.json").read_text())
    with pytest.raises(ModelInputError, match="holds 40 layers but the config at .*forty has num_hidden_layers=30"):
        nbmerge.evaluate(tmp_path / "forty", pool, progress=False)


def test_a_tensor_of_another_shape_is_refused_naming_both_shapes(smollm2):
    from nbmerge.workbench.models.statedicts import state_dict_of

    state = dict(state_dict_of(smollm2))
    state["model.layers.3.mlp.up_proj.weight"] = state["model.layers.3.mlp.up_proj.weight"][:100]
    with pytest.raises(ModelInputError, match=r"up_proj.weight' has shape \(100, 576\), expected \(1536, 576\)"):
        nbmerge.evaluate(state, lm_pool(smollm2, texts=TEXTS["news"]), progress=False)


def test_bad_pool_inputs_are_one_line_errors(smollm2):
    with pytest.raises(ParameterError, match="an item must be"):
        lm_pool(smollm2, choices=[("prompt", [" only one"], 0)])
    with pytest.raises(ParameterError, match="no 'validation' split"):
        nbmerge.evaluate(smollm2, lm_pool(smollm2, texts=TEXTS["news"]), split="validation", progress=False)
    with pytest.raises(ParameterError, match="give texts"):
        lm_pool(smollm2)


def test_bench_on_a_causal_lm_pool_reports_perplexity_per_domain(smollm2):
    """nbmerge bench on a registered causal-LM pool: a perplexity column per domain, each row's values those of
    nbmerge.evaluate on the same model; the individual row scores each domain with the model fine-tuned on it."""
    from nbmerge.workbench.bench import run_bench

    pool = lm_pool(smollm2, texts={"news": TEXTS["news"][:1], "chat": TEXTS["chat"]}, choices=ITEMS[:2],
                   name="tiny-lm", individual={"news": smollm2, "chat": smollm2})  # stand-in fine-tunes

    class Plugin:
        @nbmerge.hookimpl
        def register_task_pools(self, register):
            register("tiny-lm", lambda seed=0, cache_dir=None, progress=True: pool, "a test pool")

    nbmerge.register_plugin(Plugin(), name="tiny-lm")
    try:
        result = run_bench("tiny-lm", methods=["weighted_average"], seeds=[0], tune=False, progress=False)
    finally:
        nbmerge.unregister_plugin("tiny-lm")
    base = nbmerge.evaluate(smollm2, pool, progress=False)
    assert result.row("pretrained").tasks == ["choices", "news", "chat"]
    assert result.row("pretrained").task_mean("news") == pytest.approx(base.perplexity["news"])
    assert result.row("individual").task_mean("chat") == pytest.approx(base.perplexity["chat"])
    assert math.isnan(result.row("individual").task_mean("choices"))  # no model was fine-tuned on it
    assert result.row("weighted_average").task_mean("news") == pytest.approx(base.perplexity["news"], rel=1e-4)
    assert "ppl news" in str(result) and "ppl chat" in result._repr_html_()
