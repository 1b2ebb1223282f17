"""Model Breadcrumbs (Davari & Belilovsky 2023): drop both tails of each task vector, then combine.

Per tensor and model, with τ_i = θ_i − θ_0 over N positions ranked by |τ_i| from the smallest: the largest
int(γ N) entries (outliers) and the smallest go, keeping the k = int(d N) entries of ascending rank
[N − k − int(γ N), N − int(γ N)) (fewer outliers go when d + γ > 1); d ≥ 1 keeps τ_i whole. ``rescale`` scales the
kept entries to τ_i's L1 norm. Then with δ_i = w_i τ̃_i:
``combine="linear"``: θ = θ_0 + λ Σ_i δ_i (÷ Σ_i w_i when ``normalize``);
``combine="ties"``: θ = θ_0 + λ Σ_i δ_i [sign(δ_i) = γ], γ = sign(Σ_i δ_i) (÷ Σ of the agreeing w_i when
``normalize``). As mergekit 0.1.5's ``breadcrumbs`` and ``breadcrumbs_ties``. The kept band is found by two exact
order statistics; entries tied with a band edge are all kept (mergekit's sort keeps an arbitrary subset of them).
"""

import torch

from nbmerge_plugins import _mergekit_arithmetic as mergekit

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins._selection import kth_largest, per_model
from nbmerge_plugins._task_vectors import (
    COMBINE,
    L1_RESCALE,
    NORMALIZE,
    SCALING,
    WEIGHTS,
    l1_rescaled,
    sparsified_merge,
)

DENSITY = Param("density", "float", 0.9, "d, the fraction of each task vector's entries kept (one, or one per "
                "model)", low=0.0, high=1.0, grid=(0.7, 0.8, 0.9), per_model=True)
GAMMA = Param("gamma", "float", 0.01, "γ, the fraction of largest-magnitude entries dropped as outliers (one, or "
              "one per model)", low=0.0, high=1.0, per_model=True)


def outlier_band(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """τ with every entry outside its kept band of magnitudes zeroed (a new tensor)."""
    if density >= 1:
        return task_vector.clone()
    count = task_vector.numel()
    keep, outliers = int(density * count), int(gamma * count)
    if keep == 0:
        return torch.zeros_like(task_vector)
    dropped_below = max(0, count - keep - outliers)
    magnitudes = task_vector.abs().reshape(-1)
    # ascending index a is the (count − a)-th largest
    low, high = kth_largest(magnitudes, [count - dropped_below, count - dropped_below - keep + 1])
    return task_vector * ((magnitudes >= low) & (magnitudes <= high)).view(task_vector.shape)


def _breadcrumbs(job: TensorJob) -> torch.Tensor:
    n = len(job.models)
    densities, gammas = per_model(job.params["density"], n), per_model(job.params["gamma"], n)

    def sparsify(i: int, task_vector: torch.Tensor) -> None:
        kept = outlier_band(task_vector, densities[i], gammas[i])
        if job.params["rescale"]:
            l1_rescaled(kept, task_vector)
        task_vector.copy_(kept)

    return sparsified_merge(job, sparsify)


def _mergekit_breadcrumbs(job: TensorJob) -> torch.Tensor:
    """mergekit's breadcrumbs (breadcrumbs_ties: combine="ties"): each band from torch's ascending sort, so ties at a
    band edge are broken as mergekit breaks them."""
    params, n = job.params, len(job.models)
    densities, gammas = per_model(params["density"], n), per_model(params["gamma"], n)
    return mergekit.task_vector_merge(
        job, lambda i, task_vector: mergekit.magnitude_outliers(task_vector, densities[i], gammas[i],
                                                                params["rescale"]),
        params["weights"] or [1.0] * n, "sum" if params["combine"] == "ties" else None, params["normalize"],
        params["scaling"])


BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    summary="Model Breadcrumbs: drop each task vector's smallest entries and largest outliers, then combine",
    formula="θ = θ_0 + λ · combine(w_i · band_{d,γ}(τ_i)), band = ascending ranks [N − dN − γN, N − γN)",
    params=(DENSITY, GAMMA, COMBINE, NORMALIZE, L1_RESCALE, SCALING, WEIGHTS),
    merge_tensor=_breadcrumbs,
    min_models=1,
    base=BASE_REQUIRED,
    mergekit_tensor=_mergekit_breadcrumbs,
)


@hookimpl
def register_merge_methods(register):
    register(BREADCRUMBS)
