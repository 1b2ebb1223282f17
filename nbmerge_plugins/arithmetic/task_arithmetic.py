"""Task arithmetic (Ilharco et al. 2023): add the scaled sum of task vectors to the base.

θ = θ_0 + λ Σ_i w_i τ_i, with τ_i = θ_i − θ_0, λ = ``scaling`` (default 0.3), w_i = ``weights`` (default 1);
``normalize`` (mergekit's, default false) divides by Σ_i w_i (unless |Σ w| < 10⁻⁸).
"""

from dataclasses import replace

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins import native
from nbmerge_plugins._mergekit_arithmetic import task_vector_merge
from nbmerge_plugins._task_vectors import WEIGHTS
from nbmerge_plugins._task_vectors import NORMALIZE as SUM_NORMALIZE

SCALING = Param("scaling", "float", 0.3, "λ, the factor applied to the sum of task vectors",
                grid=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0))


NORMALIZE = replace(SUM_NORMALIZE, help="divide by the summed weights (mergekit's normalize)")


def normalized_weights(params: dict, n: int) -> list[float]:
    """w, or w / Σ w with ``normalize`` (unless |Σ w| < 10⁻⁸, as mergekit)."""
    weights = list(params["weights"] or [1.0] * n)
    total = sum(weights)
    return [w / total for w in weights] if params["normalize"] and abs(total) >= 1e-8 else weights


def _task_arithmetic(job: TensorJob):
    weights = normalized_weights(job.params, len(job.models))
    if native.accepts(job):
        return native.linear_combination(job, [job.params["scaling"] * w for w in weights], with_base=True)
    job = job.upcast()
    merged = job.base.clone()
    for model, weight in zip(job.models, weights):
        merged.add_(model - job.base, alpha=job.params["scaling"] * weight)
    return merged


TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    summary="Add the scaled sum of task vectors to the base model",
    formula="θ = θ_0 + λ Σ_i w_i (θ_i − θ_0)",
    params=(SCALING, WEIGHTS, NORMALIZE),
    merge_tensor=_task_arithmetic,
    min_models=1,
    base=BASE_REQUIRED,
    elementwise=True,
    stored_inputs=True,
    fused=lambda job: native.accepts(job),
    mergekit_tensor=lambda job: task_vector_merge(job, None, job.params["weights"] or [1.0] * len(job.models),
                                                  None, job.params["normalize"], job.params["scaling"]),
)


@hookimpl
def register_merge_methods(register):
    register(TASK_ARITHMETIC)
