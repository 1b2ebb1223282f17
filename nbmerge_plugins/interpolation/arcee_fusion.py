"""Arcee Fusion: take the fine-tune's change only at the entries where it matters most, judged by how far the change
moves each row's softmax.

Per tensor, with base θ_0 and one model θ_1 (rows = the last dimension; a vector is one row):
  KL_r = Σ_j p_rj log(p_rj / q_rj), p = softmax(θ_1) + 10⁻⁸, q = softmax(θ_0) + 10⁻⁸ (row r);
  s = |θ_1 − θ_0| · KL_r (the importance of each entry);
  τ = median(s) + 1.5 (Q₃(s) − Q₁(s)), the quantiles read off the sorted s at ⌊q (n − 1)⌋;
  θ = θ_0 + (θ_1 − θ_0) ⊙ [s ≥ τ].
As mergekit 0.1.5's ``arcee_fusion``, except that mergekit reads the quantiles of a tensor of more than 10⁶ entries
off 10⁶ entries drawn at random (with replacement), so its mask there is a random approximation; nbmerge reads
them off every entry, the same threshold each run. Up to 10⁶ entries the two are the same.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, TensorJob

EPS = 1e-8
ROW_BLOCK = 1 << 22  # entries per block of rows whose softmaxes are formed at once (keeps temporaries ~16 MB)


def row_divergence(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(θ_1) + ε ‖ softmax(θ_0) + ε) of each row (last dimension), shaped to broadcast over the row."""
    rows_model, rows_base = model.reshape(-1, model.shape[-1]), base.reshape(-1, base.shape[-1])
    step = max(1, ROW_BLOCK // max(1, rows_model.shape[1]))
    divergence = torch.empty(rows_model.shape[0], 1, dtype=model.dtype)
    for start in range(0, rows_model.shape[0], step):
        p = torch.softmax(rows_model[start:start + step], dim=-1) + EPS
        q = torch.softmax(rows_base[start:start + step], dim=-1) + EPS
        divergence[start:start + step] = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return divergence.reshape(*model.shape[:-1], 1)


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · IQR of ``scores``, each quantile q the ⌊q (n − 1)⌋-th smallest entry (0-based)."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, int(q * last) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def _arcee_fusion(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    base, model = job.base, job.models[0]
    if base.dim() == 0:
        return model.clone()  # one entry: its importance is its own threshold, so the change is always taken
    change = model - base
    importance = change.abs() * row_divergence(model, base)
    return base + change * (importance >= outlier_threshold(importance))


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    summary="Arcee Fusion: the model's changes where their KL-weighted size is an outlier, the base elsewhere",
    formula="θ = θ_0 + (θ_1 − θ_0) ⊙ [s ≥ median(s) + 1.5 IQR(s)], s = |θ_1 − θ_0| · KL(softmax θ_1 ‖ softmax θ_0) "
            "per row",
    params=(),
    merge_tensor=_arcee_fusion,
    min_models=1,
    max_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(ARCEE_FUSION)
