"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025), as FusionBench 0.2.33's
``IsotropicMergingInCommonAndTaskSubspace`` (``isotropic_merging/iso_utils.py``, ``iso_cts``).

For T task vectors τ_i = θ_i − θ_0, per matrix [m, n] (every 2-D tensor: projections, embeddings, the LM head),
with k = min(m, n) and f = ``common_space_fraction``:
1. sizes: c = k − round((k − int(k f)) / T) · T common directions and d = (k − c) / T per task
   (Python's round, halves to even, as FusionBench), so that c + T d = k;
2. common subspace: Σ_i τ_i = U diag(s) Vᵀ; keep U_c = U[:, :c], s[:c], V_cᵀ = Vᵀ[:c];
3. task-specific subspaces: τ_i − U_c U_cᵀ τ_i = U_i diag(s_i) V_iᵀ; keep U_i[:, :d], s_i[:d], V_iᵀ[:d];
4. U = [U_1[:, :d] … U_T[:, :d] U_c], Vᵀ = [V_1ᵀ[:d]; …; V_Tᵀ[:d]; V_cᵀ], both replaced by their orthonormal
   polar factors P(A) = P Qᵀ for A = P Σ Qᵀ; s̄ = the mean of the k kept singular values;
5. Δ = s̄ · P(U) P(Vᵀ).
Every other tensor (norms, biases: anything not 2-D) gets Δ = (1/T) Σ_i τ_i, the mean task vector.
θ = θ_0 + λ Δ, λ = ``scaling`` (FusionBench's ``scaling_factor``, default 1).

nbmerge projects as U_c (U_cᵀ τ_i) where FusionBench forms the [m, m] projector (U_c U_cᵀ) τ_i: the same matrix
without an m × m temporary (m is the vocabulary for the embeddings). Where m ≤ n the thin SVD of Σ τ_i gives a
complete basis [U_c U_⊥] of R^m, so τ_i − U_c U_cᵀ τ_i = U_⊥ (U_⊥ᵀ τ_i) and its SVD is U_⊥ times that of the
[m − c, n] matrix U_⊥ᵀ τ_i (the same triplets up to rounding). A residual of rank below d (a task vector that is
zero on this matrix: frozen embeddings, say) brings directions of singular value 0, which LAPACK picks
arbitrarily and step 4's flat spectrum weights by s̄ all the same: FusionBench adds e_1 … e_d (LAPACK's basis for
a zero matrix), nbmerge directions orthogonal to U_c, so there the results differ by the merge's own size.
The task directions A = [U_1[:, :d] … U_T[:, :d]] lie in the complement of U_c, so P([A U_c]) = [P(A) U_c]: only
the [m, T d] block A is orthogonalised (FusionBench decomposes [A U_c], whose c singular values equal to 1 can
stall LAPACK's float32 SVD). Where the sizes leave no room (c < 0: a matrix with fewer than about T/2 singular
directions beyond int(k f)), FusionBench fails on a shape mismatch; nbmerge raises an error naming the tensor. FusionBench's ``exclude_keys`` (none by default) is not offered.
Per matrix: the SVD of Σ τ_i, T task SVDs ([m − c, n] where m ≤ n), the SVDs of the [m, T d] and [k, n] blocks,
in float32 (float64 for float64 inputs, or where float32 fails to converge) on the job's device, CPU or CUDA.
"""

import torch

from nbmerge import hookimpl
from nbmerge.errors import ParameterError
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins.singular._singular import SCALING, mean_task_vector, orthogonal_factor, thin_svd, truncated_svd

COMMON_SPACE_FRACTION = Param("common_space_fraction", "float", 0.8, "f, the share of singular directions kept "
                              "from the summed task vector (the rest is split evenly among the tasks)",
                              low=0.0, high=1.0, grid=(0.6, 0.8, 0.9))


def subspace_sizes(k: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(c, d): common directions and directions per task, c + T d = k, rounded as FusionBench rounds."""
    common = int(k * fraction)
    common = k - round((k - common) / num_tasks) * num_tasks
    return common, int((k - common) / num_tasks)


def _iso_cts(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    ones = [1.0] * len(job.models)
    if job.base.dim() != 2:
        return mean_task_vector(job, ones).mul_(job.params["scaling"]).add_(job.base)
    common, per_task = subspace_sizes(min(job.base.shape), len(job.models), job.params["common_space_fraction"])
    if common < 0:
        raise ParameterError(f"iso_cts: tensor {job.name!r} of shape {tuple(job.base.shape)} has too few singular "
                             f"directions to split among {len(job.models)} tasks at common_space_fraction="
                             f"{job.params['common_space_fraction']}; raise common_space_fraction")
    summed = mean_task_vector(job, ones).mul_(len(job.models))
    u, s, vh = thin_svd(summed, job.name)
    del summed
    common_u, common_s, common_vh = u[:, :common].clone(), s[:common], vh[:common].clone()
    # m ≤ n: the thin SVD's U is a complete basis of R^m, so the residual lives in the span of its last m − c
    # columns and decomposes as an [m − c, n] matrix there (a fraction 1 − f of the rows)
    complement = u[:, common:] if job.base.shape[0] <= job.base.shape[1] else None
    del u, vh
    left, values, right = [], [], []
    for model in job.models:
        task_vector = model - job.base
        if complement is not None:
            inner_u, s, vh = truncated_svd(complement.T @ task_vector, per_task, job.name)
            u = complement @ inner_u
        else:
            u, s, vh = truncated_svd(task_vector.sub_(common_u @ (common_u.T @ task_vector)), per_task, job.name)
        del task_vector
        left.append(u)
        values.append(s)
        right.append(vh)
    # the task directions lie in the complement of U_c, so P([A U_c]) = [P(A) U_c]: only A is decomposed (and the
    # c singular values equal to 1 that would make LAPACK's SVD of the whole block struggle never arise)
    left_factor = torch.cat([orthogonal_factor(torch.cat(left, dim=1), job.name), common_u], dim=1)
    del left
    right_factor = orthogonal_factor(torch.cat(right + [common_vh], dim=0), job.name)
    del right
    mean_value = torch.cat(values + [common_s]).mean()
    merged = left_factor @ right_factor
    return merged.mul_(mean_value * job.params["scaling"]).add_(job.base)


ISO_CTS = MergeMethod(
    name="iso_cts",
    summary="Iso-CTS: a common subspace of the summed task vector plus each task's own, with a flat spectrum",
    formula="per matrix θ = θ_0 + λ s̄ P([U_1..U_T U_c]) P([V_1ᵀ; ..; V_Tᵀ; V_cᵀ]): U_c, V_c the top c directions "
            "of Σ τ_i, U_i, V_i the top d of τ_i − U_c U_cᵀ τ_i, s̄ = mean kept singular value, P = polar factor; "
            "other tensors θ = θ_0 + λ mean_i τ_i",
    params=(SCALING, COMMON_SPACE_FRACTION),
    merge_tensor=_iso_cts,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(ISO_CTS)
