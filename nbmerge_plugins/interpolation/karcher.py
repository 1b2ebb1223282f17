"""Karcher mean: the Riemannian centre of mass of the models' tensors on the unit sphere, rescaled.

With the n tensors v_i (the base among them when given; n = models + base) flattened, uniform α_i = 1/n and
û_i = v_i / ‖v_i‖: over the inputs with ‖v_i‖ > tol (weights renormalised over them), start from
m = Σ α_i û_i / ‖Σ α_i û_i‖ (û of the first input when that norm is below tol) and repeat at most ``max_iter``
times: g = Σ_i α_i θ_i / sin θ_i · (û_i − cos θ_i m), θ_i = arccos(m · û_i) (inputs with θ_i < tol left out);
stop when ‖g‖ < tol, else m ← cos‖g‖ m + sin‖g‖ g / ‖g‖, renormalised. Result: (Σ_i α_i ‖v_i‖) · m (zero when
every input is below tol). As mergekit 0.1.5's ``karcher``.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param, TensorJob

MAX_ITER = Param("max_iter", "int", 10, "the most gradient steps on the sphere", low=0)
TOL = Param("tol", "float", 1e-5, "norms, angles and steps below tol count as zero", low=0.0)


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The uniform Karcher mean of the tensors' directions, scaled by their mean norm."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [tensor.norm() for tensor in tensors]
    valid = [i for i, norm in enumerate(norms) if float(norm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = sum(weight * unit for weight, unit in zip(weights, units))
    mean_norm = float(mean.norm())
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units):
            cos = torch.dot(mean.reshape(-1), unit.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - cos * mean)
        tangent_norm = tangent.norm()
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = float(mean.norm())
        if unit_norm > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def _karcher(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    tensors = ([job.base] if job.base is not None else []) + list(job.models)
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, job.params["max_iter"], job.params["tol"])


KARCHER = MergeMethod(
    name="karcher",
    summary="Karcher mean: the models' centre of mass on the unit sphere, scaled by their mean norm",
    formula="θ = (1/n Σ ‖θ_i‖) · argmin_m Σ_i arccos²(m · θ̂_i), by Riemannian gradient steps",
    params=(MAX_ITER, TOL),
    merge_tensor=_karcher,
    min_models=1,
    base=BASE_OPTIONAL,
)


@hookimpl
def register_merge_methods(register):
    register(KARCHER)
