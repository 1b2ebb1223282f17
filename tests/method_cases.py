"""What the method tests share: tiny decoder state dicts, an in-memory merge, and the references of METHODS.md
written out independently (float64 NumPy or explicit torch arithmetic), never the plugins' own helpers.

Tensor names follow Llama: ``model.layers.<i>.`` tensors are in the layer stack (layer-aware options apply);
``model.embed_tokens.weight``, ``model.norm.weight`` and ``lm_head.weight`` are outside it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import nbmerge

UP = "model.layers.{}.mlp.up_proj.weight"
Q = "model.layers.{}.self_attn.q_proj.weight"
BIAS = "model.layers.{}.mlp.up_proj.bias"
LAYER_NORM = "model.layers.{}.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


# -- building inputs -----------------------------------------------------------------------------------------------
def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def decoder_state(num_layers: int = 2, hidden: int = 4, vocab: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny decoder: embeddings, per layer an attention and an MLP projection, a bias, a norm; final norm, head."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator)

    state = {EMBED: draw(vocab, hidden)}
    for i in range(num_layers):
        state[Q.format(i)] = draw(hidden, hidden)
        state[UP.format(i)] = draw(2 * hidden, hidden)
        state[BIAS.format(i)] = draw(2 * hidden)
        state[LAYER_NORM.format(i)] = draw(hidden)
    state[FINAL_NORM] = draw(hidden)
    state[HEAD] = draw(vocab, hidden)
    return state


def fine_tuned(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """``state`` with every floating tensor moved by seeded noise: a stand-in fine-tune."""
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + scale * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point()
            else tensor.clone() for name, tensor in state.items()}


def merge(method: str, models, base=None, **params) -> dict[str, torch.Tensor]:
    return nbmerge.merge(method, models, base=base, device="cpu", progress=False, **params).state_dict


# -- comparing -----------------------------------------------------------------------------------------------------
def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


def assert_matches(actual: torch.Tensor, expected: np.ndarray, atol: float = 1e-6, rtol: float = 1e-6, name=""):
    assert tuple(actual.shape) == tuple(expected.shape), name
    np.testing.assert_allclose(f64(actual), expected, rtol=rtol, atol=atol, err_msg=name)


# -- independent computations (METHODS.md written out) --------------------------------------------------------------
def weighted_sum_reference(tensors: list[torch.Tensor], weights: list[float]) -> np.ndarray:
    return sum(w * f64(t) for w, t in zip(weights, tensors))


def lerp_reference(first: torch.Tensor, second: torch.Tensor, t: float) -> np.ndarray:
    return (1.0 - t) * f64(first) + t * f64(second)


def slerp_reference(first: torch.Tensor, second: torch.Tensor, t: float, eps: float = 1e-8) -> np.ndarray:
    """SLERP of the flattened tensors; weights from the normalised vectors applied to the unnormalised ones."""
    v0, v1 = f64(first).ravel(), f64(second).ravel()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float(u0 @ u1)
    if abs(dot) > 0.9995:
        result = (1.0 - t) * v0 + t * v1
    else:
        angle = math.acos(max(-1.0, min(1.0, dot)))
        result = (math.sin((1.0 - t) * angle) * v0 + math.sin(t * angle) * v1) / math.sin(angle)
    return result.reshape(tuple(first.shape))


def depth_schedule(anchors: list[float], layer: int | None, num_layers: int) -> float:
    """Anchors spread evenly over [0, 1]; layer i of L sits at i / (L − 1); outside the stack: the first anchor."""
    if layer is None:
        return anchors[0]
    return float(np.interp(layer / (num_layers - 1), np.linspace(0.0, 1.0, len(anchors)), anchors))


def ties_reference(base: dict, models: list[dict], *, density: float, sign: str = "sum", merge_func: str = "mean",
                   scaling: float = 1.0, weights: list[float] | None = None,
                   trim_scope: str = "tensor", density_over: str = "all") -> dict[str, np.ndarray]:
    """TIES by brute force in float64.

    Trim: per task vector keep the entries whose |w_i τ_i| is at least the k-th largest, k = int(density · N),
    N = the number of positions ("all") or of positions some model changed ("changed"), counted per tensor
    ("tensor") or over all tensors concatenated ("model").
    Elect γ per position by summed mass or summed signs; γ = 0 takes + (tensor scope) or the sign of the
    model-wide sum of elected signs (model scope). Disjoint merge over the agreeing non-zero entries.
    """
    names = [name for name, tensor in base.items() if tensor.is_floating_point()]
    w = np.array(weights if weights is not None else [1.0] * len(models), dtype=np.float64)
    shapes = {name: tuple(base[name].shape) for name in names}
    # task vectors are the float32 differences of the user's tensors, one flattened row per model
    rows = {name: np.stack([f64(m[name] - base[name]).ravel() for m in models]) * w[:, None] for name in names}

    def keep_masks(vectors: np.ndarray) -> np.ndarray:
        counted = int(np.any(vectors != 0, axis=0).sum()) if density_over == "changed" else vectors.shape[1]
        densities = density if isinstance(density, (list, tuple)) else [density] * len(vectors)
        masks = np.zeros(vectors.shape, dtype=bool)
        for i, row in enumerate(vectors):
            k = int(densities[i] * counted)
            if k == 0:
                continue
            kth_largest = np.sort(np.abs(row))[::-1][k - 1]
            masks[i] = np.abs(row) >= kth_largest
        return masks

    if trim_scope == "model":
        everything = np.concatenate([rows[name] for name in names], axis=1)
        masks_flat = keep_masks(everything)
        splits = np.cumsum([rows[name].shape[1] for name in names])[:-1]
        masks = dict(zip(names, np.split(masks_flat, splits, axis=1)))
    else:
        masks = {name: keep_masks(rows[name]) for name in names}
    trimmed = {name: rows[name] * masks[name] for name in names}

    elected = {}
    for name in names:
        votes = trimmed[name].sum(0) if sign == "sum" else np.sign(trimmed[name]).sum(0)
        elected[name] = np.sign(votes)
    if trim_scope == "model":
        tie_sign = 1.0 if sum(elected[name].sum() for name in names) >= 0 else -1.0
    else:
        tie_sign = 1.0
    result = {}
    for name in names:
        gamma = np.where(elected[name] == 0, tie_sign, elected[name])
        entries = trimmed[name]
        agrees = (np.sign(entries) == gamma) & (entries != 0)
        if merge_func == "sum":
            merged = (entries * agrees).sum(0)
        elif merge_func == "max":
            merged = gamma * (np.abs(entries) * agrees).max(0)
        else:
            divisor = (w[:, None] * agrees).sum(0)
            merged = (entries * agrees).sum(0) / np.where(divisor == 0, 1.0, divisor)
        result[name] = (f64(base[name]).ravel() + scaling * merged).reshape(shapes[name])
    return result


def ties_inputs(task_vectors: list[list[float]], name: str = UP.format(0), base_value: float = 0.5):
    """A base filled with ``base_value`` and one model per row of ``task_vectors`` (one 1-D tensor each)."""
    base = {name: torch.full((len(task_vectors[0]),), base_value)}
    models = [{name: base[name] + torch.tensor(row)} for row in task_vectors]
    return base, models
