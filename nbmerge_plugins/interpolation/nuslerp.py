"""NuSLERP: spherical interpolation of two models (or of their task vectors) over the whole tensor or per row.

With v_0, v_1 the two models' tensors (their task vectors τ = θ − θ_0 when a base is given, the base added back
after), t = w_1 / (w_0 + w_1) (t = 1/2 when |w_0 + w_1| < 10⁻⁶), and cos Θ = v̂_0 · v̂_1 (v̂ = v / max(‖v‖, 10⁻⁷)):
v = sin((1 − t)Θ)/sin Θ · v_0 + sin(tΘ)/sin Θ · v_1, or (1 − t) v_0 + t v_1 where 1 − cos²Θ ≤ 10⁻¹⁶.
The vectors are the whole flattened tensor (``flatten``, the default), else each row along the last dimension,
or along the first with ``row_wise``. Unlike ``slerp`` the raw (unnormalised) vectors are interpolated.
As mergekit 0.1.5's ``nuslerp``.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param, TensorJob

WEIGHTS = Param("weights", "floats", None, "the two models' weights: t = w_1 / (w_0 + w_1) (default: t = 1/2)",
                per_model=True)
ROW_WISE = Param("row_wise", "bool", False, "with flatten off: interpolate columns (vectors along the first "
                 "dimension) instead of rows")
FLATTEN = Param("flatten", "bool", True, "interpolate each tensor as one flat vector")


def nuslerp(t: float, first: torch.Tensor, second: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """Spherical interpolation of the vectors along ``dim`` (or of the flattened tensors)."""
    shape = first.shape
    if flatten:
        first, second = first.reshape(-1), second.reshape(-1)
    elif dim != -1:
        first, second = first.transpose(dim, -1), second.transpose(dim, -1)
    unit_first = first / first.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_second = second / second.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = (unit_first * unit_second).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * first + torch.sin(t * theta) * second) / sin_theta
    result = torch.where(colinear, (1 - t) * first + t * second, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _nuslerp(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    weights = job.params["weights"] or (1.0, 1.0)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if job.params["row_wise"] else -1
    first, second = job.models
    if job.base is None:
        return nuslerp(t, first, second, dim, job.params["flatten"])
    return job.base + nuslerp(t, first - job.base, second - job.base, dim, job.params["flatten"])


NUSLERP = MergeMethod(
    name="nuslerp",
    summary="NuSLERP: spherical interpolation of two models or their task vectors, whole tensor or per row",
    formula="v = sin((1−t)Θ)/sinΘ · v_0 + sin(tΘ)/sinΘ · v_1, t = w_1/(w_0 + w_1), v = θ or τ = θ − θ_0",
    params=(WEIGHTS, ROW_WISE, FLATTEN),
    merge_tensor=_nuslerp,
    min_models=2,
    max_models=2,
    base=BASE_OPTIONAL,
)


@hookimpl
def register_merge_methods(register):
    register(NUSLERP)
