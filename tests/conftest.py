"""Shared fixtures: small real Llama-architecture models built on the fly (random weights, saved as safetensors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two threads on a busy 2-core box made small ops several times slower
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class ModelSet:
    """A base model and fine-tunes of it: folders on disk and the same weights in memory."""

    base_dir: Path
    model_dirs: list[Path]
    base: dict[str, torch.Tensor]
    models: list[dict[str, torch.Tensor]]


def tiny_llama_config(layers: int = 3, hidden: int = 32, vocab: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)


def fine_tune_like(base: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A copy of ``base`` with every parameter moved by seeded noise (a stand-in for a fine-tune's task vector)."""
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def sparse_fine_tune_like(base: torch.nn.Module, seed: int, scale: float = 0.02, changed: float = 0.6) -> torch.nn.Module:
    """A fine-tune whose task vector is sparse and structured, as real ones often are:
    - frozen tensors (the token embeddings and every input_layernorm) are the base's;
    - the LM head changes only its first half of rows (a structured block);
    - every other tensor changes at a seeded ``changed`` fraction of its positions (a different set per model).
    """
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_tokens" in name or "input_layernorm" in name:
                continue
            noise = torch.randn(parameter.shape, generator=generator) * scale
            if "lm_head" in name:
                noise[parameter.shape[0] // 2:] = 0
            else:
                noise *= torch.rand(parameter.shape, generator=generator) < changed
            parameter.add_(noise)
    return model


def build_model_set(root: Path, n_models: int = 3, dtype=torch.float32, layers: int = 3, shard_first="40KB",
                    tune=fine_tune_like):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    base = LlamaForCausalLM(tiny_llama_config(layers)).to(dtype)
    fine_tunes = [tune(base, seed=100 + i).to(dtype) for i in range(n_models)]
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    model_dirs = []
    for i, model in enumerate(fine_tunes):
        folder = root / f"ft{i}"
        # the first fine-tune is sharded so that every test also covers index-based loading
        model.save_pretrained(folder, max_shard_size=shard_first if i == 0 else "5GB")
        model_dirs.append(folder)
    state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    return ModelSet(base_dir, model_dirs, state(base), [state(m) for m in fine_tunes])


@pytest.fixture(scope="session")
def llama_set(tmp_path_factory) -> ModelSet:
    return build_model_set(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def bf16_llama_set(tmp_path_factory) -> ModelSet:
    return build_model_set(tmp_path_factory.mktemp("llama_bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="session", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def sparse_llama_set(request, tmp_path_factory) -> ModelSet:
    """Fine-tunes with sparse, structured task vectors (``sparse_fine_tune_like``), in float32 and in bfloat16."""
    return build_model_set(tmp_path_factory.mktemp("llama_sparse"), dtype=request.param, tune=sparse_fine_tune_like)


@pytest.fixture(scope="session")
def tiny_zoo():
    """The MiniLM zoo's tiny profile (built once, ~2 minutes on 2 cores, then cached in $NBMERGE_CACHE)."""
    from nbmerge.workbench.models.zoo import build_zoo

    return build_zoo("tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_vision_zoo():
    """The vision zoo's tiny profile (built once, ~2 minutes on 2 cores, then cached in $NBMERGE_CACHE)."""
    from nbmerge.workbench.models.vision_zoo import build_vision_zoo

    return build_vision_zoo("tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_ta8_zoo():
    """The ta8-text zoo's tiny profile (8 tasks, 3 fine-tuning steps each: under a minute, then cached in
    $NBMERGE_CACHE)."""
    from nbmerge.workbench.models.ta8zoo import build_ta8_zoo

    return build_ta8_zoo("tiny", seed=0, progress=False)
