"""Linear interpolation between two models.

θ = (1 − t) θ_A + t θ_B, t in [0, 1]. The endpoints are the two models, or the base (θ_A, t = 0) and one model.
t may be a number, a list of anchors interpolated over layer depth, or mergekit-style per-filter entries.
"""

from nbmerge import hookimpl
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param
from nbmerge_plugins import native
from nbmerge_plugins.interpolation._endpoints import check_two_endpoints, interpolate

T = Param("t", "schedule", 0.5, "interpolation factor: 0 gives the first endpoint, 1 the second",
          low=0.0, high=1.0, grid=(0.3, 0.5, 0.7))


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
