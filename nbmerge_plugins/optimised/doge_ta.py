"""DOGE-TA (Wei et al. 2025, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent"): task
arithmetic with a learned shared correction δ per weight matrix, kept out of the tasks' shared subspace.

For each treated tensor (2-D) with τ_t = θ_t − θ_0 (t = 1..T):
1. weights λ_t = λ / ‖τ_t‖_F (λ = ``lambda_scale``, 0.07; 0 where τ_t = 0, where FusionBench divides by zero);
2. the shared subspace: r = min(rows, cols); the top int(r / T) left singular vectors of each τ_t side by side
   (an r-column matrix, zero-padded) and, of that matrix's left singular vectors, the first k = int(r /
   ``subspace``) (6) span it, U_k; the projector P = U_k U_kᵀ;
3. δ (from 0) takes ``iterations`` (400) Adam steps of learning rate ``lr`` (10⁻⁴) on
     L(δ) = Σ_j Σ_rows ( Σ_cols τ_j ⊙ (τ_j − Σ_t λ_t τ_t − (Σ_t λ_t) δ) )²
   with each gradient projected out of the shared subspace, g ← g − P g (computed in closed form:
   ∇L = −2 (Σ_t λ_t) Σ_j e_j τ_j, e_j the row sums above);
4. θ = θ_0 + Σ_t λ_t (τ_t + δ) ⊙ m_t, where m_t keeps τ_t's entries whose magnitude is among its top ``density``
   (0.3) fraction over all treated tensors together: the k = int(density · N) largest (N the treated positions;
   entries equal to the threshold are all kept). A whole-model Stage finds these thresholds exactly, as TIES's
   model scope does (FusionBench keeps int(density · N) + 1).
The treated tensors (``tensors``): ``layers`` (default), the 2-D tensors inside the layer stack, which is what
FusionBench 0.2.33's ``DOGE_TA_Algorithm`` selects on CLIP (its key filter: "encoder" in the name, "weight" in the
name, no "layer_norm"); ``all``, every 2-D tensor (embeddings and head too). Every other tensor (norms, biases,
embeddings and head with ``layers``) stays at θ_0, as in FusionBench. The optimisation is FusionBench's (same
start, projector and Adam arithmetic; the gradient in closed form, equal up to float rounding), whose K=30 (%),
subspace=6, lamda=0.07, Adam lr 10⁻⁴ × 400 steps per tensor (fixed in its code) are the defaults here.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, Stage, TensorJob
from nbmerge.method.tensor_names import layer_index
from nbmerge_plugins.optimised._adam import Adam
from nbmerge_plugins._selection import model_thresholds

TOPK_THRESHOLDS = "doge_ta top-k thresholds"

DENSITY = Param("density", "float", 0.3, "fraction of each task vector's entries kept by magnitude, over all treated "
                "tensors (FusionBench's K=30 %)", low=0.0, high=1.0, low_inclusive=False, grid=(0.2, 0.3, 0.5))
SUBSPACE = Param("subspace", "int", 6, "the shared subspace keeps int(r / subspace) directions of an r-rank tensor",
                 low=1)
LAMBDA_SCALE = Param("lambda_scale", "float", 0.07, "λ: task vector t of a tensor is weighted λ / ‖τ_t‖ "
                     "(FusionBench's lamda)", low=0.0, grid=(0.05, 0.07, 0.1))
ITERATIONS = Param("iterations", "int", 400, "Adam steps per treated tensor", low=0, example=20)
LR = Param("lr", "float", 1e-4, "Adam's learning rate", low=0.0, low_inclusive=False)
TENSORS = Param("tensors", "choice", "layers", "which 2-D tensors are treated: those inside the layer stack "
                "(FusionBench's filter on CLIP) or all (embeddings and head too); the others stay at the base",
                choices=("layers", "all"))


def treated(job: TensorJob) -> bool:
    """A 2-D tensor inside the layer stack (or any 2-D tensor with ``tensors="all"``)."""
    return job.base.ndim == 2 and (job.params["tensors"] == "all" or job.layer is not None)


def _outside_the_stack(name: str, params: dict) -> bool:
    return params["tensors"] == "layers" and layer_index(name) is None


def topk_thresholds(stream, params: dict, wide: bool) -> list[float]:
    """Per task vector, the k-th largest |τ_t| over the treated tensors, k = int(density · N)."""

    def treated_only(visit) -> None:
        stream(lambda job: visit(job) if treated(job) else None)

    return model_thresholds(treated_only, params["density"], False, wide)


def task_weights(task_vectors: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """λ_t = scale / ‖τ_t‖ (0 for a zero task vector)."""
    norms = [torch.linalg.vector_norm(task_vector) for task_vector in task_vectors]
    return [scale / norm if norm > 0 else torch.zeros_like(norm) for norm in norms]


def shared_subspace(task_vectors: list[torch.Tensor], subspace: int) -> torch.Tensor:
    """U_k [rows, k]: the first k = int(r / subspace) left singular vectors of the r columns holding each task
    vector's top int(r / T) left singular vectors side by side (zero-padded), r = min(rows, cols)."""
    rows, cols = task_vectors[0].shape
    rank = min(rows, cols)
    per_task = rank // len(task_vectors)
    side_by_side = task_vectors[0].new_zeros((rows, rank))
    for t, task_vector in enumerate(task_vectors):
        left = torch.linalg.svd(task_vector, full_matrices=False)[0]
        side_by_side[:, t * per_task:(t + 1) * per_task] = left[:, :per_task]
    return torch.linalg.svd(side_by_side, full_matrices=False)[0][:, :rank // subspace]


def learned_correction(task_vectors: list[torch.Tensor], weights: list[torch.Tensor], basis: torch.Tensor,
                       iterations: int, lr: float) -> torch.Tensor:
    """δ after ``iterations`` projected Adam steps on L(δ) (step 3 of the module's formula)."""
    weighted_sum = torch.zeros_like(task_vectors[0])
    for task_vector, weight in zip(task_vectors, weights):
        weighted_sum.add_(task_vector * weight)
    total_weight = sum(weights)
    # e_j = Σ_cols τ_j ⊙ (τ_j − Σ λ_t τ_t) − (Σ λ_t) Σ_cols τ_j ⊙ δ: the first part is fixed
    fixed_rows = [(task_vector * (task_vector - weighted_sum)).sum(1) for task_vector in task_vectors]
    delta = torch.zeros_like(task_vectors[0])
    adam = Adam(delta, lr)
    gradient, products = torch.empty_like(delta), torch.empty_like(delta)
    for _ in range(iterations):
        gradient.zero_()
        for task_vector, fixed in zip(task_vectors, fixed_rows):
            residual = fixed - total_weight * torch.mul(task_vector, delta, out=products).sum(1)
            gradient.addcmul_(task_vector, residual.unsqueeze(1))
        gradient.mul_(-2 * total_weight)
        gradient.sub_(basis @ (basis.T @ gradient))
        adam.step(gradient)
    return delta


def _doge_ta(job: TensorJob) -> torch.Tensor:
    if not treated(job):  # a norm or bias of the layer stack (small): the base's value
        return job.base.clone()
    params, base = job.params, job.base
    task_vectors = [model - base for model in job.models]
    weights = task_weights(task_vectors, params["lambda_scale"])
    basis = shared_subspace(task_vectors, params["subspace"])
    delta = learned_correction(task_vectors, weights, basis, params["iterations"], params["lr"])
    merged = torch.zeros_like(base)
    for task_vector, weight, threshold in zip(task_vectors, weights, job.stage_results[TOPK_THRESHOLDS]):
        merged.add_((task_vector + delta).mul_(task_vector.abs() >= threshold).mul_(weight))
    return base + merged


DOGE_TA = MergeMethod(
    name="doge_ta",
    summary="DOGE-TA: task arithmetic with a learned correction kept out of the tasks' shared subspace",
    formula="θ = θ_0 + Σ_t λ_t (τ_t + δ) ⊙ topk(τ_t), λ_t = λ / ‖τ_t‖, δ: projected Adam on the task-vector loss",
    params=(DENSITY, SUBSPACE, LAMBDA_SCALE, ITERATIONS, LR, TENSORS),
    merge_tensor=_doge_ta,
    min_models=1,
    base=BASE_REQUIRED,
    stages=(Stage(TOPK_THRESHOLDS, topk_thresholds, passes=2),),
    copies_from_base=_outside_the_stack,
)


@hookimpl
def register_merge_methods(register):
    register(DOGE_TA)
