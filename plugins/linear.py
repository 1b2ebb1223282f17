"""Linear interpolation between two models.

θ = (1 − t) θ_A + t θ_B, t in [0, 1]. The endpoints are the two models, or the base (θ_A, t = 0) and one model.
t may be a number, a list of anchors interpolated over layer depth, or mergekit-style per-filter entries.
"""

from dataclasses import replace

from nbmerge import hookimpl
from nbmerge.errors import ParameterError
from nbmerge.method import BASE_OPTIONAL, MergeMethod, TensorJob
from nbmerge.params import Param
from nbmerge_plugins import native

T = Param("t", "schedule", 0.5, "interpolation factor: 0 gives the first endpoint, 1 the second",
          low=0.0, high=1.0, grid=(0.3, 0.5, 0.7))


def endpoints(job: TensorJob):
    """(θ_A, θ_B): the base and the model, or the two models."""
    return (job.base, job.models[0]) if job.base is not None else (job.models[0], job.models[1])


def check_two_endpoints(method: str):
    def check(params: dict, n_models: int, has_base: bool) -> None:
        if n_models + int(has_base) != 2:
            raise ParameterError(f"{method}: interpolates two endpoints: pass two models, or a base and one model "
                                 f"(got {n_models} model(s){' and a base' if has_base else ''})")

    return check


def interpolate(job: TensorJob):
    """(1 − t) θ_A + t θ_B, from the nearer endpoint (t = 0 and t = 1 give the endpoints exactly)."""
    first, second = endpoints(job)
    t = job.params["t"]
    as_pair = replace(job, base=first, models=[second]) if t < 0.5 else replace(job, base=second, models=[first])
    if native.accepts(as_pair):
        return native.linear_combination(as_pair, [t if t < 0.5 else 1.0 - t], with_base=True)
    first, second = endpoints(job.upcast())
    return first.lerp(second, job.params["t"])


LINEAR = MergeMethod(
    name="linear",
    summary="Linear interpolation between two models",
    formula="θ = (1 − t) θ_A + t θ_B",
    params=(T,),
    merge_tensor=interpolate,
    min_models=1,
    max_models=2,
    base=BASE_OPTIONAL,
    elementwise=True,
    stored_inputs=True,
    fused=lambda job: native.accepts(job, needs_base=False),
    check=check_two_endpoints("linear"),
)


@hookimpl
def register_merge_methods(register):
    register(LINEAR)
