"""RegMean's closed form (Jin et al. 2023, arXiv 2212.09849), tensor by tensor, and the parameters RegMean and
RegMean++ share.

For a linear layer y = W x with the models' weights W_i [out, in] and the Gram matrices G_i = X_iᵀX_i / n_i of
its inputs under model i (``_data_pass.input_grams``), RegMean minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²:

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,        G̃_i = α G_i + (1 − α) diag(G_i),

the off-diagonal entries scaled by α = ``reduce_non_diagonal_ratio`` (α = 1: the exact regression; α = 0: each
input feature weighted by its second moment alone). Solved in float64 (Cholesky: Σ G̃ is symmetric positive
semi-definite; where it is singular, e.g. an input feature zero on every example, the least-squares solution of
least norm). Every other
floating tensor (embeddings, norms, biases, linears the logits never ran) is the mean of the models' values;
integer tensors must agree and are copied.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from nbmerge.method import Param
from nbmerge_plugins.from_data._static_build import agreed_integer_tensor

NUM_EXAMPLES = Param("num_regmean_examples", "int", 256, "inputs per task run through its model to collect the "
                     "Gram matrices of every linear layer's inputs", low=1)
BATCH_SIZE = Param("batch_size", "int", 32, "inputs per forward pass while collecting the Gram matrices (the "
                   "matrices average over rows, so it changes only speed and memory)", low=1)
SEED = Param("seed", "int", 0, "seeds which inputs of each task are drawn, and their order", low=0)


def ratio_param(default: float, source: str) -> Param:
    """α = ``reduce_non_diagonal_ratio``, with the default FusionBench's ``source`` config gives."""
    return Param("reduce_non_diagonal_ratio", "float", default, f"α: the Gram matrices' off-diagonal entries are "
                 f"scaled by α (1: exact RegMean; 0: diagonal, per-input-feature weighting); {default} is "
                 f"FusionBench's {source}", low=0.0, high=1.0, grid=(0.1, 0.5, 0.95))


def scale_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G)."""
    scaled = gram * ratio
    scaled.diagonal().add_(torch.diagonal(gram), alpha=1.0 - ratio)
    return scaled


def regmean_weight(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], ratio: float) -> torch.Tensor:
    """W with Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ (float64 Cholesky solve: Σ G̃ is symmetric positive semi-definite),
    in the first weight's dtype."""
    scaled = [scale_off_diagonal(gram.double(), ratio) for gram in grams]
    lhs = sum(scaled)
    rhs = sum(g @ w.double().T for g, w in zip(scaled, weights))
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:  # singular: an input feature that no model ever saw
        solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return solution.T.to(weights[0].dtype)


def mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    wide = torch.promote_types(tensors[0].dtype, torch.float32)
    return (sum(t.to(wide) for t in tensors) / len(tensors)).to(tensors[0].dtype)


def merged_state(states: Sequence[Mapping[str, torch.Tensor]], grams: Sequence[Mapping[str, torch.Tensor]],
                 ratio: float, names: Sequence[str], labels: Sequence[str], owner: str) -> dict[str, torch.Tensor]:
    """The merge of ``names``: RegMean for ``<linear>.weight`` where every model has the linear's Gram matrix
    (``grams[i]`` by module path), the mean for every other floating tensor, integer tensors copied."""
    merged = {}
    for name in names:
        values = [state[name] for state in states]
        if not values[0].is_floating_point():
            merged[name] = agreed_integer_tensor(name, values, labels, owner)
            continue
        module = name.removesuffix(".weight") if name.endswith(".weight") else None
        if module is not None and values[0].dim() == 2 and all(module in g for g in grams):
            merged[name] = regmean_weight(values, [g[module] for g in grams], ratio)
        else:
            merged[name] = mean(values)
    return merged
