"""DELLA (Deep et al. 2024): drop task-vector entries at random with a probability that falls with magnitude.

Per tensor and model, with τ_i = θ_i − θ_0 viewed as rows (a vector is one row; the rank runs along dim 1):
entry j of a row of C entries with magnitude rank r_j ∈ {1..C} (1 = smallest) is kept with probability
p_j = (d − ε) + 2ε (r_j − 1) / (C − 1), so the mean kept fraction is d and larger entries survive more often
(d ≥ 1 keeps τ_i whole, d ≤ 0 drops it); d ± ε must lie in (0, 1). ``rescale`` scales the kept entries to τ_i's
L1 norm (mergekit's rescaling; the paper divides by p_j). Then with δ_i = w_i τ̃_i:
``combine="ties"``: θ = θ_0 + λ Σ_i δ_i [sign(δ_i) = γ], γ = sign(Σ_i δ_i) (÷ Σ of the agreeing w_i when
``normalize``); ``combine="linear"``: θ = θ_0 + λ Σ_i δ_i (÷ Σ_i w_i when ``normalize``).
As mergekit 0.1.5's ``della`` (ties, normalize, rescale) and ``della_linear`` (linear, rescale).
The draws are nbmerge's counter-based ones keyed by (``seed``, tensor name, model index), as DARE's: keep when
u < p_j. A merge is reproducible from its seed and equals mergekit's in distribution, not bit for bit.
"""

from dataclasses import replace

import torch

from nbmerge import hookimpl
from nbmerge.errors import ParameterError
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins._selection import per_model
from nbmerge_plugins._task_vectors import COMBINE as TASK_VECTOR_COMBINE
from nbmerge_plugins._task_vectors import L1_RESCALE, SCALING, SEED, WEIGHTS, l1_rescaled, sparsified_merge, uniform_draws
from nbmerge_plugins._task_vectors import NORMALIZE as TASK_VECTOR_NORMALIZE

DENSITY = Param("density", "float", 0.7, "d, the mean fraction of each task vector's entries kept (one, or one per "
                "model)", low=0.0, high=1.0, grid=(0.5, 0.7, 0.9), per_model=True)
EPSILON = Param("epsilon", "float", 0.15, "ε, the spread of keep probabilities around d: from d − ε (smallest "
                "entry) to d + ε (largest); one, or one per model", low=0.0, high=0.5, per_model=True)
COMBINE = replace(TASK_VECTOR_COMBINE, default="ties")
NORMALIZE = replace(TASK_VECTOR_NORMALIZE, default=True)
RESCALE = replace(L1_RESCALE, default=True)


def keep_probabilities(task_vector: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_j = (d − ε) + 2ε (r_j − 1) / (C − 1) per row, r_j the magnitude rank of entry j in its row (1 = smallest)."""
    rows = task_vector.unsqueeze(0) if task_vector.dim() < 2 else task_vector
    moved = rows.movedim(1, -1)
    columns = moved.shape[-1]
    flat = moved.reshape(-1, columns)
    order = flat.abs().argsort(dim=1)
    positions = torch.arange(columns, dtype=task_vector.dtype, device=task_vector.device).expand_as(order)
    ranks = torch.empty_like(flat).scatter_(1, order, positions).view(moved.shape).movedim(-1, 1)
    spread = ranks / (columns - 1) if columns > 1 else ranks
    return spread.mul_(2 * epsilon).add_(density - epsilon).reshape(task_vector.shape)


def _della(job: TensorJob) -> torch.Tensor:
    n = len(job.models)
    densities, epsilons = per_model(job.params["density"], n), per_model(job.params["epsilon"], n)

    def sparsify(i: int, task_vector: torch.Tensor) -> None:
        density = densities[i]
        if density >= 1:
            return
        if density <= 0:
            task_vector.zero_()
            return
        draws = uniform_draws(job.random_key(job.params["seed"], i), 0, task_vector.numel(), task_vector.device)
        keep = draws.view(task_vector.shape) < keep_probabilities(task_vector, density, epsilons[i])
        kept = task_vector * keep
        if job.params["rescale"]:
            l1_rescaled(kept, task_vector)
        task_vector.copy_(kept)

    return sparsified_merge(job, sparsify)


def _check_band(params: dict, n_models: int, has_base: bool) -> None:
    for i, (density, epsilon) in enumerate(zip(per_model(params["density"], n_models),
                                               per_model(params["epsilon"], n_models))):
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise ParameterError(f"della: density ± epsilon must lie in (0, 1) (model {i}: density {density}, "
                                 f"epsilon {epsilon}); lower 'epsilon' or move 'density' away from 0 and 1")


DELLA = MergeMethod(
    name="della",
    summary="DELLA: drop task-vector entries with a probability falling with magnitude rank, then combine",
    formula="θ = θ_0 + λ · combine(w_i · m_i ⊙ τ_i), m_ij ~ Bernoulli(d − ε + 2ε (r_ij − 1)/(C − 1))",
    params=(DENSITY, EPSILON, COMBINE, NORMALIZE, RESCALE, SCALING, WEIGHTS, SEED),
    merge_tensor=_della,
    min_models=1,
    base=BASE_REQUIRED,
    check=_check_band,
)


@hookimpl
def register_merge_methods(register):
    register(DELLA)
