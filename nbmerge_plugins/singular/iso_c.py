"""Iso-C, isotropic merging in the common subspace (Marczak et al. 2025), as FusionBench 0.2.33's
``IsotropicMergingInCommonSubspace`` (``isotropic_merging/iso_utils.py``, ``iso_c``).

For T task vectors τ_i = θ_i − θ_0, per matrix (every 2-D tensor: projections, token embeddings, the LM head):
  Σ_i τ_i = U diag(s) Vᵀ (thin SVD, k = min(m, n) singular values);
  Δ = s̄ · U Vᵀ with s̄ = (1/k) Σ_j s_j: the spectrum flattened to its mean (an isotropic merge).
Every other tensor (norms, biases: anything not 2-D) gets Δ = (1/T) Σ_i τ_i, the mean task vector.
θ = θ_0 + λ Δ, λ = ``scaling`` (FusionBench's ``scaling_factor``, default 1).

FusionBench's ``exclude_keys`` (none by default) is not offered. One thin SVD per matrix, in float32 (float64 for
float64 inputs) on the job's device, CPU or CUDA.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, TensorJob
from nbmerge_plugins.singular._singular import SCALING, mean_task_vector, thin_svd


def _iso_c(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    ones = [1.0] * len(job.models)
    if job.base.dim() != 2:
        return mean_task_vector(job, ones).mul_(job.params["scaling"]).add_(job.base)
    summed = mean_task_vector(job, ones).mul_(len(job.models))
    u, s, vh = thin_svd(summed, job.name)
    del summed
    merged = u @ vh
    return merged.mul_(s.mean() * job.params["scaling"]).add_(job.base)


ISO_C = MergeMethod(
    name="iso_c",
    summary="Iso-C: the summed task vector with its singular values flattened to their mean",
    formula="per matrix θ = θ_0 + λ s̄ U Vᵀ, Σ_i τ_i = U diag(s) Vᵀ, s̄ = mean(s); "
            "other tensors θ = θ_0 + λ mean_i τ_i",
    params=(SCALING,),
    merge_tensor=_iso_c,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(ISO_C)
