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
from dataclasses import replace

from nbmerge import hookimpl
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param, TensorJob
from nbmerge_plugins import native
from nbmerge_plugins import _mergekit_arithmetic as mergekit
from nbmerge_plugins.interpolation._endpoints import check_two_endpoints, endpoints, interpolate

DOT_THRESHOLD = 0.9995
T = Param("t", "schedule", 0.5, "interpolation factor: a number, anchors over layer depth, or per-filter entries",
          low=0.0, high=1.0, grid=(0.3, 0.5, 0.7))
EPS = Param("eps", "float", 1e-8, "norms at or below eps are not normalised (zero vectors)", low=0.0)


def slerp_weights(first_norm: float, second_norm: float, dot: float, t: float, eps: float) -> tuple[float, float] | None:
    """(sin((1 − t)Θ)/sin Θ, sin(tΘ)/sin Θ) from the norms and the raw dot product, or None when the normalised
    vectors are (anti-)parallel (|cos Θ| > DOT_THRESHOLD: interpolate linearly instead)."""
    dot /= (first_norm if first_norm > eps else 1.0) * (second_norm if second_norm > eps else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return None
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp(first, second, t: float, eps: float):
    """The SLERP of two same-shaped tensors (see the module docstring)."""
    weights = slerp_weights(first.norm().item(), second.norm().item(), first.flatten().dot(second.flatten()).item(),
                            t, eps)
    if weights is None:
        return first.lerp(second, t)
    return first * weights[0] + second * weights[1]


def _slerp(job: TensorJob):
    first, second = endpoints(job)
    pair = replace(job, base=None, models=[first, second])
    if not native.accepts(pair, needs_base=False):
        first, second = endpoints(job.upcast())
        return slerp(first, second, job.params["t"], job.params["eps"])
    weights = slerp_weights(*native.dot_and_norms(first, second), job.params["t"], job.params["eps"])
    if weights is None:
        return interpolate(job)
    return native.linear_combination(pair, list(weights), with_base=False)


SLERP = MergeMethod(
    name="slerp",
    summary="Spherical interpolation between two models, t scheduled over depth and tensor kind",
    formula="θ = sin((1−t)Θ)/sinΘ · θ_A + sin(tΘ)/sinΘ · θ_B, Θ = arccos(θ̂_A · θ̂_B); lerp when |cos Θ| > 0.9995",
    params=(T, EPS),
    merge_tensor=_slerp,
    stored_inputs=True,
    min_models=1,
    max_models=2,
    base=BASE_OPTIONAL,
    check=check_two_endpoints("slerp"),
    mergekit_tensor=lambda job: mergekit.slerp(*endpoints(job), job.params["t"], job.params["eps"]),
)


@hookimpl
def register_merge_methods(register):
    register(SLERP)
