"""WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors"): per weight matrix, the merged task vector that least disturbs each task's inputs.

With τ_t = θ_t − θ_0 (t = 1..T) of a 2-D tensor, the merged task vector τ minimises
  L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F
(the rows of τ_t span the inputs task t's layer responds to), by ``iterations`` (400) Adam steps of learning rate
``lr`` (10⁻⁵) from τ = Σ_t τ_t; θ = θ_0 + τ, with no scaling. The gradient is computed in closed form,
  ∇L = 2 (τ A − B),  A = Σ_t τ_tᵀ τ_t / ‖τ_t‖²,  B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖²,
so a step costs one [rows × cols] · [cols × cols] product whatever T, and the tensor's memory is a few copies of it
(τ, B, the gradient, Adam's two moments) plus A. Other tensors (norms, biases; anything not 2-D) get the mean task
vector, θ = θ_0 + (1/T) Σ_t τ_t; so do embedding tables with ``matrices="linear"``. The default
``matrices="all"`` optimises every 2-D tensor, embeddings and the head included, as FusionBench 0.2.33's
``WUDIMerging`` (whose ``exclude_keys`` is empty by default): the optimisation is the same (same start, same Adam
arithmetic, the same gradient up to float rounding), and its defaults are ``iter_num=400`` and Adam's lr 10⁻⁵ fixed
in its code. A task vector that is zero on a tensor adds no term (FusionBench divides 0 by 0 there: NaN).
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge.method.tensor_names import is_embedding
from nbmerge_plugins.optimised._adam import Adam

ITERATIONS = Param("iterations", "int", 400, "Adam steps per weight matrix", low=0, grid=(100, 400),
                   example=20)
LR = Param("lr", "float", 1e-5, "Adam's learning rate", low=0.0, low_inclusive=False)
MATRICES = Param("matrices", "choice", "all", "which 2-D tensors are optimised: all (FusionBench) or linear "
                 "weights only (embedding tables then get the mean task vector)", choices=("all", "linear"))


def optimised(job: TensorJob) -> bool:
    """Whether this tensor's merged task vector is optimised (a 2-D tensor, not excluded) or the mean task vector."""
    return job.base.ndim == 2 and (job.params["matrices"] == "all" or not is_embedding(job.name))


def interference_terms(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(Σ_t τ_t, A = Σ_t τ_tᵀτ_t / ‖τ_t‖², B = Σ_t τ_t τ_tᵀτ_t / ‖τ_t‖²), one task vector at a time."""
    total = torch.zeros_like(base)
    gram = base.new_zeros((base.shape[1], base.shape[1]))
    target = torch.zeros_like(base)
    for model in models:
        task_vector = model - base
        total += task_vector
        squared_norm = torch.linalg.vector_norm(task_vector).square()
        if squared_norm == 0:
            continue
        normalised_gram = (task_vector.T @ task_vector).div_(squared_norm)
        gram += normalised_gram
        target.addmm_(task_vector, normalised_gram)
    return total, gram, target


def _wudi(job: TensorJob) -> torch.Tensor:
    params, base = job.params, job.base
    if not optimised(job):
        total = torch.zeros_like(base)
        for model in job.models:
            total += model - base
        return base + total / len(job.models)
    merged, gram, target = interference_terms(base, job.models)
    adam = Adam(merged, params["lr"])
    gradient = torch.empty_like(merged)
    for _ in range(params["iterations"]):
        torch.addmm(target, merged, gram, beta=-1, out=gradient).mul_(2)
        adam.step(gradient)
    return base + merged


WUDI = MergeMethod(
    name="wudi",
    summary="WUDI: per weight matrix, Adam on the task vector that least disturbs each task's inputs",
    formula="θ = θ_0 + argmin_τ Σ_t ‖(τ − τ_t) τ_tᵀ‖² / ‖τ_t‖² (Adam from Σ_t τ_t); others: θ_0 + mean_t τ_t",
    params=(ITERATIONS, LR, MATRICES),
    merge_tensor=_wudi,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(WUDI)
