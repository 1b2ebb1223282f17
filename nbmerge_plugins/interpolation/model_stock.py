"""Model Stock (Jang et al. 2024): move from the base towards the average of the fine-tunes by a factor read off
the angle between their task vectors.

Per tensor (or per row with ``filter_wise``), with τ_i = θ_i − θ_0 for N fine-tuned models:
  cos θ = the mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖‖τ_j‖, 10⁻⁶), clamped to [−1, 1];
  t = N cos θ / (1 + (N − 1) cos θ)   (t = 0, the base, where |1 + (N − 1) cos θ| < 10⁻⁶);
  θ = t · mean_i θ_i + (1 − t) · θ_0.
As mergekit 0.1.5's ``model_stock``; ``filter_wise`` ranks each row of a matrix (its last dimension) on its own.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob

FILTER_WISE = Param("filter_wise", "bool", False, "one angle per row (last dimension) instead of per tensor")
SINGULAR = 1e-6


def _model_stock(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    base, shape = job.base, job.base.shape
    if job.params["filter_wise"]:
        base = base.reshape(1, -1) if base.dim() <= 1 else base
        models = [model.reshape(base.shape) for model in job.models]
    else:
        base = base.reshape(-1)
        models = [model.reshape(-1) for model in job.models]
    offsets = [model - base for model in models]
    norms = [offset.norm(dim=-1) for offset in offsets]
    cosines = [((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=SINGULAR)).clamp(-1, 1)
               for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    cos_theta = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    average = torch.stack(models).mean(0)
    return (t * average + (1 - t) * base).reshape(shape)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    summary="Model Stock: towards the fine-tunes' average by a factor from the angle between their task vectors",
    formula="θ = t · mean_i θ_i + (1 − t) θ_0, t = N cos θ / (1 + (N − 1) cos θ), cos θ = mean pairwise cos(τ_i, τ_j)",
    params=(FILTER_WISE,),
    merge_tensor=_model_stock,
    min_models=2,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(MODEL_STOCK)
