"""Spherical linear interpolation (SLERP) between two models, tensor by tensor.

With v_0, v_1 the flattened tensors (float32) and v̂ = v / ‖v‖ where ‖v‖ > eps (else v̂ = v):
dot = v̂_0 · v̂_1; if |dot| > 0.9995 the vectors are (anti-)parallel and θ = (1 − t) v_0 + t v_1; otherwise
Θ = arccos(dot) and θ = sin((1 − t) Θ) / sin Θ · v_0 + sin(t Θ) / sin Θ · v_1. As in mergekit and FusionBench, the
weights come from the normalised vectors and apply to the unnormalised ones. The endpoints are the two models,
or the base (t = 0) and one model. t may vary with layer depth (a list of anchors) and by tensor kind
(``[{"filter": "self_attn", "value": [...]}, {"filter": "mlp", "value": [...]}, {"value": 0.5}]``); tensors
outside the layer stack take the first anchor.
"""

import math

from nbmerge import hookimpl
from nbmerge.method import BASE_OPTIONAL, MergeMethod, TensorJob
from nbmerge.params import Param
from nbmerge_plugins.linear import check_two_endpoints, endpoints

DOT_THRESHOLD = 0.9995
T = Param("t", "schedule", 0.5, "interpolation factor: a number, anchors over layer depth, or per-filter entries",
          low=0.0, high=1.0, grid=(0.3, 0.5, 0.7))
EPS = Param("eps", "float", 1e-8, "norms at or below eps are not normalised (zero vectors)", low=0.0)


def slerp(first, second, t: float, eps: float):
    """The SLERP of two same-shaped tensors (see the module docstring)."""
    first_norm = first.norm().item()
    second_norm = second.norm().item()
    dot = first.flatten().dot(second.flatten()).item()
    dot /= (first_norm if first_norm > eps else 1.0) * (second_norm if second_norm > eps else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return first.lerp(second, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    first_weight = math.sin((1.0 - t) * theta) / sin_theta
    second_weight = math.sin(t * theta) / sin_theta
    return first * first_weight + second * second_weight


def _slerp(job: TensorJob):
    first, second = endpoints(job)
    return slerp(first, second, job.params["t"], job.params["eps"])


SLERP = MergeMethod(
    name="slerp",
    summary="Spherical interpolation between two models, t scheduled over depth and tensor kind",
    formula="θ = sin((1−t)Θ)/sinΘ · θ_A + sin(tΘ)/sinΘ · θ_B, Θ = arccos(θ̂_A · θ̂_B); lerp when |cos Θ| > 0.9995",
    params=(T, EPS),
    merge_tensor=_slerp,
    min_models=1,
    max_models=2,
    base=BASE_OPTIONAL,
    check=check_two_endpoints("slerp"),
)


@hookimpl
def register_merge_methods(register):
    register(SLERP)
