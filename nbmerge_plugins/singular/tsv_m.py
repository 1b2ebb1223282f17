"""TSV-M, task singular vector merging (Gargiulo et al. 2025), as FusionBench 0.2.33's
``TaskSingularVectorMerging`` (``task_singular_vector/TSVM.py``, ``compute_and_sum_svd_mem_reduction``).

For T task vectors τ_i = θ_i − θ_0 (each times its weight w_i, FusionBench's list ``alpha``), per matrix [m, n]
(every 2-D tensor: attention and MLP projections, token embeddings and the LM head alike):
1. τ_i = U_i diag(s_i) V_iᵀ (thin SVD, k = min(m, n) singular values); keep the top r = int(k · (1/T)) of each;
2. concatenate: U = [U_1[:, :r] … U_T[:, :r]] [m, T·r], s = [s_1[:r] … s_T[:r]], Vᵀ = [V_1ᵀ[:r]; …; V_Tᵀ[:r]];
3. decorrelate: replace U and Vᵀ by their orthonormal polar factors, P(A) = P Qᵀ for A = P Σ Qᵀ;
4. Δ = P(U) diag(s) P(Vᵀ)  (zero where r = 0, i.e. k < T).
Every other tensor (norms, biases: anything not 2-D) gets Δ = (1/T) Σ_i w_i τ_i, the mean task vector.
θ = θ_0 + λ Δ, λ = ``scaling`` (FusionBench's single ``alpha``, default 1).

FusionBench orthogonalises the zero-padded [m, k] concatenation; its polar factor restricted to the T·r filled
columns is the polar factor of those columns alone (when they are linearly independent, as task vectors' leading
singular vectors are), so nbmerge decomposes only the T·r columns. A task vector of rank below r (a frozen tensor,
a low-rank fine-tune) contributes directions of singular value 0 that LAPACK picks arbitrarily; they still enter
the polar factors, in FusionBench as here, so such merges agree with FusionBench only up to that choice.
FusionBench's ``exclude_keys`` (none by default) is not offered. FusionBench's other TSV helpers (the "lossless"
and eigen variants) average CLIP's ``text_projection`` instead of decomposing it; the path its class runs does not,
and neither does nbmerge: every 2-D tensor is decomposed. The SVDs run in float32 (float64 for float64
inputs) on the job's device, CPU or CUDA: T + 2 thin SVDs per matrix, the tensor's T task vectors in memory at
most. On the CPU these SVDs, not reading the files, set the merge's time (``benchmarks/speed.py --singular``).
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, TensorJob
from nbmerge_plugins.singular._singular import SCALING, mean_task_vector, orthogonal_factor, truncated_svd
from nbmerge_plugins._task_vectors import WEIGHTS


def kept_rank(k: int, num_tasks: int) -> int:
    """r = int(k · (1/T)): each task's share of the k singular directions, computed as FusionBench does."""
    return int(k * (1 / num_tasks))


def _tsv_m(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    weights = job.params["weights"] or [1.0] * len(job.models)
    if job.base.dim() != 2:
        return mean_task_vector(job, weights).mul_(job.params["scaling"]).add_(job.base)
    rank = kept_rank(min(job.base.shape), len(job.models))
    if rank == 0:
        return job.base.clone()
    left, values, right = [], [], []
    for model, weight in zip(job.models, weights):
        task_vector = model - job.base
        if weight != 1.0:
            task_vector.mul_(weight)
        u, s, vh = truncated_svd(task_vector, rank, job.name)
        del task_vector
        left.append(u)
        values.append(s)
        right.append(vh)
    left_factor = orthogonal_factor(torch.cat(left, dim=1), job.name)
    del left
    right_factor = orthogonal_factor(torch.cat(right, dim=0), job.name)
    del right
    merged = left_factor.mul_(torch.cat(values)) @ right_factor
    return merged.mul_(job.params["scaling"]).add_(job.base)


TSV_M = MergeMethod(
    name="tsv_m",
    summary="TSV-M: each task's top 1/T singular directions, decorrelated, summed (FusionBench's TSVM)",
    formula="per matrix θ = θ_0 + λ P([U_i[:, :r]]) diag([s_i[:r]]) P([V_iᵀ[:r]]), τ_i = U_i diag(s_i) V_iᵀ, "
            "r = int(k/T), P(A) = polar factor of A; other tensors θ = θ_0 + λ mean_i w_i τ_i",
    params=(SCALING, WEIGHTS),
    merge_tensor=_tsv_m,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(TSV_M)
