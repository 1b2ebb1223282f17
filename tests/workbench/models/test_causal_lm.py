"""The real causal LM (SmolLM2-135M from its GGUF wheel) and its scores, checked against transformers' own loss."""

import math

import pytest
import torch

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge.workbench.models import causal_lm

TEXTS = ["The committee met on Tuesday to discuss the budget for next year.",
         "I think the most important thing is that we work together.",
         "Rain is expected across the region tomorrow afternoon."]


@pytest.fixture(scope="module")
def smollm2():
    return causal_lm.smollm2()


def test_export_is_a_plain_llama_folder(smollm2):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert config.architectures == ["LlamaForCausalLM"]  # what the Hub's widgets and pipeline() resolve by
    assert not hasattr(config, "quantization_config")
    assert (smollm2 / "tokenizer.json").is_file()


def test_perplexity_matches_transformers_loss(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            nll += reference(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert causal_lm.perplexity(smollm2, TEXTS, smollm2) == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert causal_lm.perplexity(smollm2, TEXTS, smollm2) < 200  # a real LM, not random weights (~49k vocab)


def test_prompts_are_scored_and_a_merge_is_scored_like_its_weights(smollm2):
    assert causal_lm.prompt_accuracy(smollm2, smollm2) >= 80
    # ExPO of a model with itself (θ_r = θ_0) is that model: same perplexity from the in-memory merge
    same = nbmerge.merge("expo", [smollm2], base=smollm2, progress=False, alpha=0.5)
    assert causal_lm.perplexity(same, TEXTS[:1], smollm2) == pytest.approx(
        causal_lm.perplexity(smollm2, TEXTS[:1], smollm2), rel=1e-6)


def test_wrong_weights_are_a_clear_error(smollm2, llama_set):
    with pytest.raises(ModelInputError, match="causal LM state lacks"):
        causal_lm.load_causal_lm({"model.embed_tokens.weight": torch.zeros(3, 3)}, smollm2)
