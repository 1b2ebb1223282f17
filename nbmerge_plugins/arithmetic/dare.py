"""DARE (Yu et al. 2024): drop and rescale task vectors, then combine them.

τ̃_i = m_i ⊙ τ_i with m_i ~ Bernoulli(1 − p) elementwise, p = ``drop_rate`` in [0, 1). ``rescale``: true divides
the survivors by (1 − p) (the paper); "l1" multiplies by ‖τ_i‖₁ / ‖τ̃_i‖₁ (mergekit); false leaves them.
``combine="linear"``: θ = θ_0 + λ Σ_i w_i τ̃_i (dare_linear). ``combine="ties"``: θ = θ_0 + λ Σ_i w_i τ̃_i [sign
agrees with γ], γ = sign(Σ_i w_i τ̃_i), exact ties electing + (dare_ties). ``normalize`` divides the combination
by Σ_i w_i (linear; 1 when |Σ w| < 10⁻⁸) or by the agreeing entries' Σ_i w_i (ties), as mergekit's normalize.
The mask of tensor ``name`` for model i comes from counter-based draws keyed by (``seed``, name, i): the draw at
flat position j is u = SplitMix64(key + (j + 1) · φ) >> 40, · 2⁻²⁴, and the entry is kept when u >= p, so a merge
is reproducible from its seed whatever the order, device or split of positions tensors are processed in.
"""

from dataclasses import replace

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge_plugins import native
from nbmerge_plugins._selection import per_model
from nbmerge_plugins._task_vectors import (
    COMBINE,
    NORMALIZE,
    RESCALE,
    SEED,
    WEIGHTS,
    drop_and_rescale,
    keep_from,
    keep_mask,
    sparsified_merge,
)
from nbmerge_plugins._task_vectors import SCALING as UNIT_SCALING

SCALING = replace(UNIT_SCALING, default=0.3, grid=(0.2, 0.3, 0.5))
DROP_RATE = Param("drop_rate", "float", 0.5, "p, the probability of dropping each task-vector entry (one, or one "
                  "per model)", low=0.0, high=1.0, high_inclusive=False, grid=(0.3, 0.5, 0.7), per_model=True)


def _dare(job: TensorJob) -> torch.Tensor:
    drop_rates = per_model(job.params["drop_rate"], len(job.models))
    # the fused kernel takes one drop rate for all models and does not normalise
    if native.accepts(job) and len(set(drop_rates)) == 1 and not job.params["normalize"]:
        return native.dare_merge(job, [job.random_key(job.params["seed"], i) for i in range(len(job.models))],
                                 keep_from(drop_rates[0]))
    return sparsified_merge(job, lambda i, task_vector: drop_and_rescale(
        task_vector, keep_mask(job, i, drop_rates[i]), drop_rates[i], job.params["rescale"]))


DARE = MergeMethod(
    name="dare",
    summary="DARE: randomly drop task-vector entries, rescale the rest, combine linearly or by TIES",
    formula="θ = θ_0 + λ · combine_i(w_i · m_i ⊙ τ_i / (1 − p)), m_i ~ Bernoulli(1 − p)",
    params=(DROP_RATE, RESCALE, SEED, COMBINE, SCALING, WEIGHTS, NORMALIZE),
    merge_tensor=_dare,
    stored_inputs=True,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(DARE)
