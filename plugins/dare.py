"""DARE (Yu et al. 2024): drop and rescale task vectors, then combine them.

τ̃_i = m_i ⊙ τ_i with m_i ~ Bernoulli(1 − p) elementwise, p = ``drop_rate`` in [0, 1). ``rescale``: true divides
the survivors by (1 − p) (the paper); "l1" multiplies by ‖τ_i‖₁ / ‖τ̃_i‖₁ (mergekit); false leaves them.
``combine="linear"``: θ = θ_0 + λ Σ_i w_i τ̃_i (dare_linear). ``combine="ties"``: θ = θ_0 + λ Σ_i w_i τ̃_i [sign
agrees with γ], γ = sign(Σ_i w_i τ̃_i), exact ties electing + (dare_ties, not normalised, as in mergekit).
The mask of tensor ``name`` for model i is drawn from a generator seeded by (``seed``, name, i), so a merge is
reproducible from its seed whatever the order or device tensors are processed in.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, TensorJob
from nbmerge.params import Param
from nbmerge_plugins.ties import disjoint_merge, elect_sign

DROP_RATE = Param("drop_rate", "float", 0.5, "p, the probability of dropping each task-vector entry",
                  low=0.0, high=1.0, high_inclusive=False, grid=(0.3, 0.5, 0.7))
RESCALE = Param("rescale", "choice", True, "true: divide survivors by 1 − p; \"l1\": keep each τ's L1 norm; "
                "false: no rescaling", choices=(True, False, "l1"))
SEED = Param("seed", "int", 0, "seed of the drop masks", low=0)
COMBINE = Param("combine", "choice", "linear", "combine the sparse task vectors as task arithmetic or TIES",
                choices=("linear", "ties"))
SCALING = Param("scaling", "float", 0.3, "λ, the factor applied to the combined task vector",
                grid=(0.2, 0.3, 0.5))
WEIGHTS = Param("weights", "floats", None, "one weight per task vector (default: 1 each)", per_model=True)


def drop_and_rescale(task_vector: torch.Tensor, keep_mask: torch.Tensor, drop_rate: float, rescale) -> torch.Tensor:
    kept = task_vector * keep_mask
    if rescale is True:
        return kept / (1.0 - drop_rate)
    if rescale == "l1":
        kept_norm = kept.abs().sum()
        return kept * (task_vector.abs().sum() / kept_norm) if kept_norm > 0 else kept
    return kept


def keep_mask(job: TensorJob, model_index: int, drop_rate: float) -> torch.Tensor:
    """Bernoulli(1 − p) mask drawn on the CPU from the (seed, tensor, model) generator, moved to the device."""
    generator = job.generator(job.params["seed"], model_index)
    draws = torch.rand(job.base.shape, generator=generator, dtype=torch.float32)
    return (draws >= drop_rate).to(device=job.base.device, dtype=job.base.dtype)


def _dare(job: TensorJob) -> torch.Tensor:
    params = job.params
    weights = params["weights"] or [1.0] * len(job.models)
    sparse = torch.stack([
        weight * drop_and_rescale(model - job.base, keep_mask(job, i, params["drop_rate"]), params["drop_rate"],
                                  params["rescale"])
        for i, (model, weight) in enumerate(zip(job.models, weights))
    ])
    if params["combine"] == "ties":
        merged = disjoint_merge(sparse, elect_sign(sparse, "sum", 1.0), "sum", weights)
    else:
        merged = sparse.sum(0)
    return job.base + params["scaling"] * merged


DARE = MergeMethod(
    name="dare",
    summary="DARE: randomly drop task-vector entries, rescale the rest, combine linearly or by TIES",
    formula="θ = θ_0 + λ · combine_i(w_i · m_i ⊙ τ_i / (1 − p)), m_i ~ Bernoulli(1 − p)",
    params=(DROP_RATE, RESCALE, SEED, COMBINE, SCALING, WEIGHTS),
    merge_tensor=_dare,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(DARE)
