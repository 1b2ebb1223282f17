"""NearSwap: take the other model's value where it is near the base's, keep the base's where they differ.

θ = w ⊙ θ_1 + (1 − w) ⊙ θ_0, w = clamp(t / max(|θ_0 − θ_1|, 10⁻⁶), 0, 1) elementwise: an entry within t of the
base's is θ_1's, one farther away moves towards θ_1 by t / |θ_0 − θ_1|. As mergekit 0.1.5's ``nearswap``.
"""

import torch

from nbmerge import hookimpl
from nbmerge.errors import ParameterError
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob

T = Param("t", "float", None, "the distance below which the model's value replaces the base's", low=0.0,
          example=0.001)


def _nearswap(job: TensorJob) -> torch.Tensor:
    job = job.upcast()
    base, model = job.base, job.models[0]
    weight = (job.params["t"] / (base - model).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return weight * model + (1 - weight) * base


def _needs_t(params: dict, n_models: int, has_base: bool) -> None:
    if params["t"] is None:
        raise ParameterError("nearswap: parameter 't' is required (the distance below which values swap)")


NEARSWAP = MergeMethod(
    name="nearswap",
    summary="NearSwap: the model's values where they are within t of the base's",
    formula="θ = w θ_1 + (1 − w) θ_0, w = clamp(t / |θ_0 − θ_1|, 0, 1)",
    params=(T,),
    merge_tensor=_nearswap,
    min_models=1,
    max_models=1,
    base=BASE_REQUIRED,
    elementwise=True,
    check=_needs_t,
)


@hookimpl
def register_merge_methods(register):
    register(NEARSWAP)
