"""Multi-SLERP: a weighted barycentre of several models (or task vectors) on the hypersphere, one step.

With v_i the flattened tensors (τ_i = θ_i − θ_0 when a base is given, the base added back after), weights w
(÷ Σ w when ``normalize_weights``) and û_i = v_i / (‖v_i‖ + ε):
m = Σ_i w_i û_i / ‖Σ_i w_i û_i‖; the tangent vectors û_i − (û_i · m) m average to g = Σ_i w_i (û_i − (û_i·m) m);
v = (cos ‖g‖' · m + sin ‖g‖' / ‖g‖' · g) · Σ_i w_i ‖v_i‖, ‖g‖' = ‖g‖ + ε. One model is returned as it is; when
‖Σ w_i û_i‖ < ε two models fall back to w_0 v_0 + w_1 v_1 and more are refused (antipodal inputs).
As mergekit 0.1.5's ``multislerp``.
"""

import torch

from nbmerge import hookimpl
from nbmerge.errors import ModelInputError
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param, TensorJob

WEIGHTS = Param("weights", "floats", None, "one weight per model (default: equal)", per_model=True)
NORMALIZE_WEIGHTS = Param("normalize_weights", "bool", True, "divide the weights by their sum")
EPS = Param("eps", "float", 1e-8, "ε, added to norms before dividing by them", low=0.0)


def multislerp(vectors: torch.Tensor, weights: torch.Tensor, eps: float, name: str) -> torch.Tensor:
    """The spherical barycentre of the rows of ``vectors`` ([n, positions]), scaled to the weighted mean norm."""
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if vectors.shape[0] == 2:
            return vectors[0] * weights[0] + vectors[1] * weights[1]
        raise ModelInputError(f"multislerp: tensor {name!r}: the weighted sum of the unit vectors is zero (antipodal "
                         f"models whose weights cancel); change the weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * weights.view(-1, 1)).sum(0)
    step_norm = step.norm() + eps
    return (mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)) * (norms.squeeze(-1) * weights).sum()


def _multislerp(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    if len(job.models) == 1:
        return job.models[0]
    vectors = torch.stack(job.task_vectors() if job.base is not None else job.models).reshape(len(job.models), -1)
    weights = torch.tensor(job.params["weights"] or [1.0] * len(job.models), dtype=vectors.dtype,
                           device=vectors.device)
    if job.params["normalize_weights"]:
        weights = weights / weights.sum()
    merged = multislerp(vectors, weights, job.params["eps"], job.name).view(job.models[0].shape)
    return merged if job.base is None else merged + job.base


MULTISLERP = MergeMethod(
    name="multislerp",
    summary="Multi-SLERP: weighted barycentre of several models or task vectors on the hypersphere",
    formula="v = (cos‖g‖ m + sin‖g‖ g/‖g‖) Σ w_i‖v_i‖, m = Σ w_i û_i normalised, g = Σ w_i (û_i − (û_i·m) m)",
    params=(WEIGHTS, NORMALIZE_WEIGHTS, EPS),
    merge_tensor=_multislerp,
    min_models=1,
    base=BASE_OPTIONAL,
)


@hookimpl
def register_merge_methods(register):
    register(MULTISLERP)
