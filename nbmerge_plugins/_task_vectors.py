"""Steps on task vectors τ_i = θ_i − θ_0 that several methods share (TIES, DARE, ExPO's DARE variant).

- ``weighted_task_vectors`` / ``blocks_of_task_vectors``: w_i τ_i, whole or BLOCK positions at a time;
- ``trim``: zero the entries of τ_i below its threshold t_i (kept where |τ_i| ≥ t_i);
- ``elect_sign``: γ = sign(Σ_i τ̂_i) (by mass) or sign(Σ_i sign(τ̂_i)) (by count), exact ties get a given sign;
- ``disjoint_merge``: combine the entries whose sign agrees with γ: mean Σ w_i τ̂_i / Σ w_i, sum, or γ · max |τ̂_i|;
- ``keep_mask`` / ``drop_and_rescale``: DARE's Bernoulli(1 − p) masks m_i from counter-based draws keyed by
  (seed, tensor name, model index), and m ⊙ τ rescaled by 1/(1 − p) or to keep ‖τ‖₁;
- ``sparsified_merge``: θ = θ_0 + λ · combine(w_i · S_i(τ_i)) for a per-model sparsifier S_i (DARE, DELLA,
  Breadcrumbs), with ``combine_sparse`` as the combination.

The parameters the task-vector methods declare alike live here too (a method that differs in a default takes
``dataclasses.replace`` of one).
"""

from collections.abc import Callable

import torch

from nbmerge.method import Param, TensorJob
from nbmerge_plugins import native

BLOCK = 1 << 18  # positions handled at a time: a kernel's temporaries stay a few MiB, reused by the C heap

RESCALE = Param("rescale", "choice", True, "true: divide survivors by 1 − p; \"l1\": keep each τ's L1 norm; "
                "false: no rescaling", choices=(True, False, "l1"))
SEED = Param("seed", "int", 0, "seed of the drop masks", low=0)
WEIGHTS = Param("weights", "floats", None, "one weight per task vector (default: 1 each)", per_model=True)
COMBINE = Param("combine", "choice", "linear", "combine the sparse task vectors as task arithmetic or TIES",
                choices=("linear", "ties"))
NORMALIZE = Param("normalize", "bool", False, "divide by the summed weights (of the agreeing entries for ties)")
L1_RESCALE = Param("rescale", "bool", False, "scale the kept entries to the task vector's L1 norm")
SCALING = Param("scaling", "float", 1.0, "λ, the factor applied to the combined task vector", grid=(0.5, 1.0))


# -- the per-tensor steps, shared with DARE's TIES combination ---------------------------------------------------
def weighted_task_vectors(job: TensorJob) -> torch.Tensor:
    """A new [n, ...] tensor of w_i τ_i (computed row by row in place: one allocation, from ``job.empty``)."""
    vectors = job.empty((len(job.models), *job.base.shape), job.base.dtype)
    return _weighted_differences(job, 0, job.base.numel(), vectors.view(len(job.models), -1)).view_as(vectors)


def _weighted_differences(job: TensorJob, start: int, stop: int, rows: torch.Tensor) -> torch.Tensor:
    """w_i τ_i over flat positions [start, stop), written into ``rows`` ([n, stop − start])."""
    weights = job.params.get("weights") or [1.0] * len(job.models)
    base = job.base.reshape(-1)[start:stop]
    for row, model, weight in zip(rows, job.models, weights):
        torch.sub(model.reshape(-1)[start:stop], base, out=row)
        if weight != 1.0:
            row.mul_(weight)
    return rows


def blocks_of_task_vectors(job: TensorJob):
    """Yield (start, stop, [n, stop − start] weighted task vectors) over BLOCK positions at a time, in one reused
    scratch tensor: a kernel streams a large tensor through a few MiB instead of n copies of it."""
    total = job.base.numel()
    scratch = job.empty((len(job.models), min(BLOCK, total)), job.base.dtype)
    for start in range(0, total, BLOCK):
        stop = min(start + BLOCK, total)
        yield start, stop, _weighted_differences(job, start, stop, scratch[:, :stop - start])


def elect_sign(trimmed: torch.Tensor, method: str, tie_sign: float) -> torch.Tensor:
    """γ per position: sign of the summed mass or of the summed signs; exact ties get ``tie_sign``."""
    votes = trimmed.sum(0) if method == "sum" else trimmed.sign().sum(0)
    elected = votes.sign_()
    return elected.masked_fill_(elected == 0, tie_sign) if tie_sign else elected


def disjoint_merge(trimmed: torch.Tensor, elected: torch.Tensor, merge_func: str,
                   weights: list[float]) -> torch.Tensor:
    """Combine the entries whose sign agrees with γ (zero entries never agree). Consumes ``trimmed``."""
    agrees = trimmed.sign() == elected
    kept = trimmed.mul_(agrees)
    if merge_func == "sum":
        return kept.sum(0)
    if merge_func == "max":
        return kept.abs_().amax(0).mul_(elected)
    if all(weight == 1.0 for weight in weights):
        divisor = agrees.sum(0, dtype=trimmed.dtype)
    else:
        weight_shape = (-1,) + (1,) * (trimmed.dim() - 1)
        column = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device).view(weight_shape)
        divisor = (column * agrees).sum(0)
    return kept.sum(0).div_(divisor.masked_fill_(divisor == 0, 1.0))


def trim(task_vectors: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Zero, in place, every entry of τ_i below its threshold (a threshold of inf drops the whole vector)."""
    exact_in_own_dtype = all(torch.tensor(t, dtype=task_vectors.dtype).item() == t for t in thresholds)
    limits = torch.tensor(thresholds, dtype=task_vectors.dtype if exact_in_own_dtype else torch.float64,
                          device=task_vectors.device)
    return task_vectors.mul_(task_vectors.abs() >= limits.view((-1,) + (1,) * (task_vectors.dim() - 1)))


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


# -- mergekit's generalized task arithmetic, after each task vector was sparsified on its own ---------------------
def combine_sparse(sparse: torch.Tensor, weights: list[float], combine: str, normalize: bool) -> torch.Tensor:
    """Combine [n, ...] weighted sparse task vectors δ_i = w_i τ̃_i (consumes ``sparse``).

    ``"linear"``: Σ_i δ_i, ÷ Σ_i w_i when ``normalize`` (unless |Σ w| < 10⁻⁸). ``"ties"``: Σ_i δ_i [sign(δ_i) = γ],
    γ = sign(Σ_i δ_i) with exact ties electing +, ÷ Σ_i w_i [sign(δ_i) = γ] when ``normalize`` (1 where no entry
    agrees). As mergekit 0.1.5's GeneralizedTaskArithmeticMerge (breadcrumbs, della and their TIES variants).
    """
    if combine == "ties":
        return disjoint_merge(sparse, elect_sign(sparse, "sum", 1.0), "mean" if normalize else "sum", weights)
    total = sparse.sum(0)
    divisor = sum(weights)
    return total.div_(divisor) if normalize and abs(divisor) >= 1e-8 else total


def l1_rescaled(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """m ⊙ τ scaled by ‖τ‖₁ / ‖m ⊙ τ‖₁ (left alone when either norm is below eps); in place on ``masked``."""
    before, after = float(original.abs().sum()), float(masked.abs().sum())
    return masked if before < eps or after < eps else masked.mul_(before / after)


def sparsified_merge(job: TensorJob, sparsify: Callable[[int, torch.Tensor], object]) -> torch.Tensor:
    """θ = θ_0 + λ · combine_sparse(w_i · S_i(τ_i)) with λ = ``scaling``, w = ``weights``, ``combine``/``normalize``.

    ``sparsify(i, row)`` overwrites ``row`` (τ_i, in the upcast dtype) with model i's sparse task vector S_i(τ_i).
    The combination runs BLOCK positions at a time: its sign and agreement temporaries stay a few MiB.
    """
    job = job.upcast()
    params, n = job.params, len(job.models)
    weights = params["weights"] or [1.0] * n
    sparse = job.empty((n, *job.base.shape), job.base.dtype)
    for i, (row, model, weight) in enumerate(zip(sparse, job.models, weights)):
        torch.sub(model, job.base, out=row)
        sparsify(i, row)
        if weight != 1.0:
            row.mul_(weight)
    merged = job.empty(job.base.shape, job.base.dtype)
    sparse_flat, merged_flat, base_flat = sparse.view(n, -1), merged.view(-1), job.base.reshape(-1)
    for start in range(0, base_flat.numel(), BLOCK):
        combined = combine_sparse(sparse_flat[:, start:start + BLOCK], weights, params["combine"], params["normalize"])
        torch.add(base_flat[start:start + BLOCK], combined, alpha=params["scaling"],
                  out=merged_flat[start:start + BLOCK])
    return merged
