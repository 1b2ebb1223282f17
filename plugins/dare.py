"""DARE (Yu et al. 2024): drop and rescale task vectors, then combine them.

τ̃_i = m_i ⊙ τ_i with m_i ~ Bernoulli(1 − p) elementwise, p = ``drop_rate`` in [0, 1). ``rescale``: true divides
the survivors by (1 − p) (the paper); "l1" multiplies by ‖τ_i‖₁ / ‖τ̃_i‖₁ (mergekit); false leaves them.
``combine="linear"``: θ = θ_0 + λ Σ_i w_i τ̃_i (dare_linear). ``combine="ties"``: θ = θ_0 + λ Σ_i w_i τ̃_i [sign
agrees with γ], γ = sign(Σ_i w_i τ̃_i), exact ties electing + (dare_ties, not normalised, as in mergekit).
The mask of tensor ``name`` for model i comes from counter-based draws keyed by (``seed``, name, i): the draw at
flat position j is u = SplitMix64(key + (j + 1) · φ) >> 40, · 2⁻²⁴, and the entry is kept when u >= p, so a merge
is reproducible from its seed whatever the order, device or split of positions tensors are processed in.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, TensorJob
from nbmerge.params import Param
from nbmerge_plugins import native
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
    """m ⊙ τ, rescaled; overwrites and returns ``task_vector`` (the caller's scratch row)."""
    l1_before = torch.abs(task_vector, out=keep_mask.new_empty(0)).sum() if rescale == "l1" else None
    kept = task_vector.mul_(keep_mask)
    if rescale is True:
        return kept.div_(1.0 - drop_rate)
    if rescale == "l1":
        kept_norm = kept.abs().sum()
        return kept.mul_(l1_before / kept_norm) if kept_norm > 0 else kept
    return kept


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
DRAW_CHUNK = 1 << 20  # positions hashed at a time by the torch draws (int64 temporaries stay small)


def _wrapped(constant: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch's int64 arithmetic wraps modulo 2⁶⁴)."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shifted_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_draws(key: int, start: int, count: int, device=None) -> torch.Tensor:
    """The float32 draws u ∈ [0, 1) at flat positions [start, start + count) for ``key`` (kernels.c draws the
    same numbers): z = key + (j + 1) · φ; z = (z ⊕ z >> 30) · M1; z = (z ⊕ z >> 27) · M2; z ⊕= z >> 31;
    u = (z >> 40) · 2⁻²⁴."""
    draws = torch.empty(count, dtype=torch.float32, device=device)
    for offset in range(0, count, DRAW_CHUNK):
        positions = torch.arange(start + offset + 1, start + min(offset + DRAW_CHUNK, count) + 1,
                                 dtype=torch.int64, device=device)
        z = positions.mul_(_wrapped(_GOLDEN)).add_(_wrapped(key))
        z = (z ^ _shifted_right(z, 30)).mul_(_wrapped(_MIX1))
        z = (z ^ _shifted_right(z, 27)).mul_(_wrapped(_MIX2))
        z = z ^ _shifted_right(z, 31)
        draws[offset:offset + positions.numel()] = _shifted_right(z, 40).float().mul_(2.0 ** -24)
    return draws


def keep_from(drop_rate: float) -> float:
    """p rounded up to float32: for float32 draws u, u >= keep_from(p) exactly when u >= p."""
    return native.float32_rounded([drop_rate], "up")[0]


def keep_mask(job: TensorJob, model_index: int, drop_rate: float) -> torch.Tensor:
    """The Bernoulli(1 − p) mask of model ``model_index`` for this tensor, in the job's dtype and device."""
    draws = uniform_draws(job.random_key(job.params["seed"], model_index), 0, job.base.numel(), job.base.device)
    return (draws >= keep_from(drop_rate)).to(job.base.dtype).view(job.base.shape)


BLOCK = 1 << 18  # positions combined at a time by the TIES combination (small, reused temporaries)


def _dare(job: TensorJob) -> torch.Tensor:
    if native.accepts(job):
        return native.dare_merge(job, [job.random_key(job.params["seed"], i) for i in range(len(job.models))],
                                 keep_from(job.params["drop_rate"]))
    job = job.upcast()
    params = job.params
    weights = params["weights"] or [1.0] * len(job.models)
    sparse = job.empty((len(job.models), *job.base.shape), job.base.dtype)
    for i, (row, model, weight) in enumerate(zip(sparse, job.models, weights)):
        torch.sub(model, job.base, out=row)
        drop_and_rescale(row, keep_mask(job, i, params["drop_rate"]), params["drop_rate"], params["rescale"])
        row.mul_(weight)
    merged = job.empty(job.base.shape, job.base.dtype)
    sparse_flat, merged_flat, base_flat = sparse.view(len(job.models), -1), merged.view(-1), job.base.reshape(-1)
    for start in range(0, base_flat.numel(), BLOCK):
        block = sparse_flat[:, start:start + BLOCK]
        if params["combine"] == "ties":
            combined = disjoint_merge(block, elect_sign(block, "sum", 1.0), "sum", weights)
        else:
            combined = block.sum(0)
        torch.add(base_flat[start:start + BLOCK], combined.mul_(params["scaling"]),
                  out=merged_flat[start:start + BLOCK])
    return merged


DARE = MergeMethod(
    name="dare",
    summary="DARE: randomly drop task-vector entries, rescale the rest, combine linearly or by TIES",
    formula="θ = θ_0 + λ · combine_i(w_i · m_i ⊙ τ_i / (1 − p)), m_i ~ Bernoulli(1 − p)",
    params=(DROP_RATE, RESCALE, SEED, COMBINE, SCALING, WEIGHTS),
    merge_tensor=_dare,
    stored_inputs=True,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(DARE)
