"""What the two-endpoint methods (linear, slerp) share: which tensors are the endpoints, the check that there are
exactly two, and the linear interpolation (1 − t) θ_A + t θ_B that slerp also falls back to."""

from dataclasses import replace

from nbmerge.errors import ParameterError
from nbmerge.method import TensorJob
from nbmerge_plugins import native


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
