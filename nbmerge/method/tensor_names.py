"""What a tensor is, read from its name alone: layer index, embedding, attention, linear weight, bias.

These filters generalise the LLaMA-specific options of the references to any transformer family whose layer
stack is named ``<prefix>.<layers|layer|h|blocks|block>.<i>.`` (LLaMA, Mistral, Qwen, GPT-2, BERT, CLIP, T5).
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDING_PARTS = ("embed", "wte", "wpe", "shared.weight")
_ATTENTION_PARTS = ("attn", "attention")


def layer_index(name: str) -> int | None:
    """The index of the transformer layer holding this tensor, or None outside the layer stack."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index`` (a name outside the layer stack is returned as is)."""
    found = _LAYER.search(name)
    return name if found is None else f"{name[:found.start(1)]}{index}{name[found.end(1):]}"


def count_layers(names) -> int:
    """L = 1 + the largest layer index among the names (0 when no name is in a layer)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def is_backbone(name: str) -> bool:
    """Inside the transformer layer stack (not embeddings, final norm or head)."""
    return layer_index(name) is not None


def is_embedding(name: str) -> bool:
    return layer_index(name) is None and any(part in name for part in _EMBEDDING_PARTS)


def is_attention(name: str) -> bool:
    return any(part in name for part in _ATTENTION_PARTS)


def is_linear_weight(name: str, ndim: int) -> bool:
    """A 2-D ``.weight`` that is not an embedding table: the weight of a linear projection."""
    return name.endswith("weight") and ndim == 2 and not is_embedding(name)


def is_bias(name: str) -> bool:
    return name.endswith("bias")
