"""SCE (Wan et al. 2024, FuseChat): select, calculate, erase — task vectors weighted by their own energy.

Per tensor, with τ_i = θ_i − θ_0 for n models:
1. select (``select_topk`` = k < 1): keep the positions whose variance across models, Var_i τ_i (population), is
   among the int(k · #{Var > 0}) largest, on every τ_i; zero the rest;
2. calculate: w_i = mean(τ̃_i²) / Σ_j mean(τ̃_j²) (1/n each when Σ_j < 10⁻⁶);
3. erase: γ = sign(Σ_i τ̃_i) (ties elect +), m_i = [sign(τ̃_i) = γ];
θ = θ_0 + Σ_i w_i m_i τ̃_i / max(Σ_i w_i m_i, 10⁻⁶). As mergekit 0.1.5's ``sce``. The selection is by an exact
order statistic of the variances; positions tied with it are all kept (mergekit's topk keeps an arbitrary subset).
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins._selection import kth_largest
from nbmerge_plugins._task_vectors import elect_sign

SELECT_TOPK = Param("select_topk", "float", 1.0, "k, the fraction of varying positions kept (by variance across "
                    "models)", low=0.0, high=1.0, grid=(0.1, 0.3, 1.0))


def selected_positions(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """The positions whose variance across models is among the int(k · #{Var > 0}) largest (a boolean mask)."""
    variance = task_vectors.var(0, unbiased=False)
    keep = int(int(torch.count_nonzero(variance)) * fraction)
    if keep == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    return variance >= kth_largest(variance.reshape(-1).contiguous(), [keep])[0]


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """w_i = mean(τ_i²) / Σ_j mean(τ_j²), or 1/n each when the sum is below 10⁻⁶."""
    energies = task_vectors.reshape(task_vectors.shape[0], -1).square().mean(1)
    total = float(energies.sum())
    return torch.full_like(energies, 1.0 / energies.numel()) if abs(total) < 1e-6 else energies / total


def _sce(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    task_vectors = torch.stack(job.task_vectors())
    fraction = job.params["select_topk"]
    if fraction < 1:
        task_vectors.mul_(selected_positions(task_vectors, fraction) if fraction > 0 else 0.0)
    agrees = task_vectors.sign() == elect_sign(task_vectors, "sum", 1.0)
    weights = energy_weights(task_vectors).view(-1, *([1] * (task_vectors.dim() - 1))) * agrees
    merged = (task_vectors * weights).sum(0) / weights.sum(0).clamp(min=1e-6)
    return job.base + merged


SCE = MergeMethod(
    name="sce",
    summary="SCE: keep the positions that vary most across models, weight task vectors by energy, erase minority signs",
    formula="θ = θ_0 + Σ_i w_i m_i τ̃_i / Σ_i w_i m_i, w_i ∝ mean(τ̃_i²), m_i = [sign τ̃_i = sign Σ_j τ̃_j]",
    params=(SELECT_TOPK,),
    merge_tensor=_sce,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(SCE)
