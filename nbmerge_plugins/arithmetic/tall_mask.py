"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
and Compression").

With τ_t = θ_t − θ_0 and the multi-task vector τ_MTL = Σ_t τ_t, task t's TALL mask keeps the entries where τ_MTL
still holds most of τ_t:
  m_t = [ |τ_t| ≥ λ_t · |τ_MTL − τ_t| ]                       (λ_t = ``tall_mask_lambda``, 0.6; one, or one per model)
Consensus merging (the default, ``task=-1``) keeps the entries important to at least k tasks:
  θ = θ_0 + α · [Σ_t m_t ≥ k] ⊙ τ_MTL                           (k = ``min_tasks``, 2; α = ``scaling``, 0.3)
k = 0 is task arithmetic; k = 1 drops only the entries no task needs; k > T gives θ_0.
``task=t`` instead gives task t's model retrieved from the multi-task vector, θ = θ_0 + α · m_t ⊙ τ_MTL: what
FusionBench 0.2.33's ``TallMaskTaskArithmeticAlgorithm`` returns for each task (with α = 1).
``mask_reference="base_weights"`` compares |θ_0 − τ_t| in place of |τ_t|, as that class does (it passes the
pretrained weights where the paper's formula has |θ_0 − θ_t|); the default is the paper's formula, which is also
FusionBench's ``tall_mask.utils.generate_task_masks`` (there with a strict >, which differs only where both
sides are equal). Every floating tensor; integer buffers are copied.
"""

import torch

from nbmerge import ParameterError, hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins._selection import per_model

TALL_MASK_LAMBDA = Param("tall_mask_lambda", "float", 0.6, "λ_t: task t keeps an entry where |τ_t| ≥ λ_t |τ_MTL − "
                         "τ_t| (one, or one per model)", low=0.0, grid=(0.2, 0.4, 0.6), per_model=True)
MIN_TASKS = Param("min_tasks", "int", 2, "k: consensus keeps the entries in at least k tasks' masks (0: task "
                  "arithmetic)", low=0)
SCALING = Param("scaling", "float", 0.3, "α, the factor applied to the masked multi-task vector",
                grid=(0.2, 0.3, 0.5, 0.7, 1.0))
TASK = Param("task", "int", -1, "-1: the consensus merge; t: task t's model, θ_0 + α m_t ⊙ τ_MTL (FusionBench's "
             "per-task output)", low=-1)
MASK_REFERENCE = Param("mask_reference", "choice", "task_vector", "what the mask compares with λ|τ_MTL − τ_t|: "
                       "|τ_t| (the paper) or |θ_0 − τ_t| (FusionBench's class)",
                       choices=("task_vector", "base_weights"))


def _tall_mask(job: TensorJob) -> torch.Tensor:
    params, base = job.params, job.base
    task_vectors = [model - base for model in job.models]
    multi_task = task_vectors[0].clone()
    for task_vector in task_vectors[1:]:
        multi_task += task_vector
    lambdas = per_model(params["tall_mask_lambda"], len(task_vectors))

    def mask(t: int) -> torch.Tensor:
        importance = (task_vectors[t] if params["mask_reference"] == "task_vector" else base - task_vectors[t]).abs()
        return importance >= lambdas[t] * (multi_task - task_vectors[t]).abs()

    if params["task"] >= 0:
        kept = mask(params["task"])
    else:
        count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
        for t in range(len(task_vectors)):
            count += mask(t)
        kept = count >= params["min_tasks"]
    return base + params["scaling"] * (multi_task * kept)


def _check(params: dict, n_models: int, has_base: bool) -> None:
    if params["task"] >= n_models:
        raise ParameterError(f"tall_mask: parameter 'task' is {params['task']}, but there are {n_models} models "
                             f"(0 to {n_models - 1}; -1 for the consensus merge)")


TALL_MASK = MergeMethod(
    name="tall_mask",
    summary="Consensus merging: task arithmetic on the entries that at least k tasks' TALL masks keep",
    formula="θ = θ_0 + α [Σ_t m_t ≥ k] ⊙ τ_MTL, m_t = [|τ_t| ≥ λ_t |τ_MTL − τ_t|], τ_MTL = Σ_t τ_t",
    params=(TALL_MASK_LAMBDA, MIN_TASKS, SCALING, TASK, MASK_REFERENCE),
    merge_tensor=_tall_mask,
    min_models=1,
    base=BASE_REQUIRED,
    elementwise=True,
    check=_check,
)


@hookimpl
def register_merge_methods(register):
    register(TALL_MASK)
