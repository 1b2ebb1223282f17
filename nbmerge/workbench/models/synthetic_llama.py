"""Llama-architecture checkpoint sets built on the machine from a config, for demos, tests and benchmarks.

A set is a base model and fine-tunes of it, each a Hugging Face folder (``config.json`` plus sharded safetensors
with an index) that transformers loads as ``LlamaForCausalLM``. Weights are random: base ~ N(0, 0.02²), each
fine-tune = base + N(0, noise²), seeded, generated and written tensor by tensor so building never holds a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nbmerge.io.safetensors import INDEX_FILE, ShardWriter, shard_names, split_layout


@dataclass(frozen=True)
class LlamaShape:
    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    vocab: int = 2048
    heads: int = 8
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of LlamaForCausalLM, in file order."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            prefix = f"model.layers.{i}."
            shapes += [
                (prefix + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (prefix + "self_attn.k_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.v_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (prefix + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (prefix + "input_layernorm.weight", (self.hidden,)),
                (prefix + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        shapes += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return shapes

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors()) * dtype.itemsize


@dataclass(frozen=True)
class CheckpointSet:
    base: Path
    models: list[Path]


def build_llama_set(root: Path, shape: LlamaShape = LlamaShape(), n_models: int = 3,
                    dtype: torch.dtype = torch.float32, noise: float = 0.002, shard_size: int = 200 * 2**20,
                    seed: int = 0) -> CheckpointSet:
    """Write base + ``n_models`` fine-tunes under ``root`` (reused when a complete set is already there)."""
    root = Path(root)
    folders = [root / "base"] + [root / f"ft{i}" for i in range(n_models)]
    if all((folder / "config.json").exists() for folder in folders):
        return CheckpointSet(folders[0], folders[1:])
    layout = [(name, dtype, shape_) for name, shape_ in shape.tensors()]
    shards = split_layout(layout, shard_size)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    writers = [_open_shards(folder, shards) for folder in folders]
    for index, (name, dims) in enumerate(shape.tensors()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        if name.endswith("norm.weight"):
            base = 1.0 + 0.1 * torch.randn(dims, generator=generator)
        else:
            base = 0.02 * torch.randn(dims, generator=generator)
        for model_index, model_writers in enumerate(writers):
            value = base if model_index == 0 else base + noise * torch.randn(dims, generator=generator)
            model_writers[name].write(name, value.to(dtype))
    for folder, model_writers in zip(folders, writers):
        for writer in set(model_writers.values()):
            writer.close()
        if len(shards) > 1:
            weight_map = {name: writer.path.name for name, writer in model_writers.items()}
            total = sum(w.data_bytes for w in set(model_writers.values()))
            (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
        (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return CheckpointSet(folders[0], folders[1:])


def _open_shards(folder: Path, shards: list[list]) -> dict[str, ShardWriter]:
    by_tensor = {}
    for file_name, shard in zip(shard_names(len(shards)), shards):
        writer = ShardWriter(folder / file_name, shard, {"format": "pt"})
        by_tensor.update({entry[0]: writer for entry in shard})
    return by_tensor
