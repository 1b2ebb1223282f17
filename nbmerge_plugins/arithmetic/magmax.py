"""MagMax (Marczak et al. 2024): per entry, the task vector of largest magnitude.

With τ_t = θ_t − θ_0 for t = 1..T:
  τ_max[j] = τ_{t*(j)}[j],  t*(j) = the last t with |τ_t[j]| = max_s |τ_s[j]|,
  θ = θ_0 + λ · τ_max,      λ = ``scaling`` (0.5).
Ties go to the later model (the running selection is replaced where |τ_t| ≥ the best so far), as in FusionBench
0.2.33's ``MagMaxAlgorithm`` and the authors' ``merge_max_abs``. Every floating tensor (embeddings, norms, biases
included); integer buffers are copied.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob

SCALING = Param("scaling", "float", 0.5, "λ, the factor applied to the selected task vector",
                grid=(0.3, 0.5, 0.7, 1.0))


def _magmax(job: TensorJob) -> torch.Tensor:
    base = job.base
    selected = job.models[0] - base
    for model in job.models[1:]:
        task_vector = model - base
        selected = torch.where(task_vector.abs() >= selected.abs(), task_vector, selected)
    return base + job.params["scaling"] * selected


MAGMAX = MergeMethod(
    name="magmax",
    summary="MagMax: per entry, the task vector of largest magnitude",
    formula="θ = θ_0 + λ τ_{t*}, t* = argmax_t |τ_t| per entry (ties: the later model)",
    params=(SCALING,),
    merge_tensor=_magmax,
    min_models=1,
    base=BASE_REQUIRED,
    elementwise=True,
)


@hookimpl
def register_merge_methods(register):
    register(MAGMAX)
