"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

With task vectors τ_i = θ_i − θ_0 and per-model weights w_i (default 1):
1. trim: keep the top ``density`` fraction of |τ_i| and zero the rest. The fraction counts only the positions
   some model changed (τ ≠ 0 for some i), so frozen parameters do not dilute it. ``trim_scope="tensor"`` ranks
   each tensor on its own (mergekit); ``"model"`` ranks the whole model at once with one exact global threshold
   per task vector, found by a streaming radix selection, one pass per 16-bit digit of the magnitudes (two for
   float32; the paper and FusionBench). Entries equal to the threshold are all kept.
2. elect: γ = sign(Σ_i w_i τ̂_i) (``sign="sum"``, by mass) or sign(Σ_i sign(w_i τ̂_i)) (``"count"``). Exact ties
   (γ = 0) elect + in tensor scope (mergekit) and the model-wide majority sign in model scope (FusionBench).
3. disjoint merge over the entries whose sign agrees with γ: ``"mean"`` Σ w_i τ̂_i / Σ w_i (over agreeing
   non-zero entries; the paper's mean when w = 1), ``"sum"`` Σ w_i τ̂_i, or ``"max"`` γ · max |w_i τ̂_i|.
4. θ = θ_0 + λ · merged, λ = ``scaling``.
Weights multiply the task vectors before the election, as in mergekit.
"""

from __future__ import annotations

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Stage, TensorJob
from nbmerge.params import Param

GLOBAL_THRESHOLD = "global trim threshold"

DENSITY = Param("density", "float", 0.2, "fraction of each task vector's changed entries kept by magnitude",
                low=0.0, high=1.0, low_inclusive=False, grid=(0.1, 0.2, 0.4))
SIGN = Param("sign", "choice", "sum", "sign election: by summed mass or by count of signs", choices=("sum", "count"))
MERGE_FUNC = Param("merge_func", "choice", "mean", "how agreeing entries combine",
                   choices=("mean", "sum", "max"))
SCALING = Param("scaling", "float", 1.0, "λ, the factor applied to the merged task vector", grid=(0.5, 0.7, 1.0))
TRIM_SCOPE = Param("trim_scope", "choice", "model", "rank magnitudes per tensor or over the whole model",
                   choices=("tensor", "model"))
WEIGHTS = Param("weights", "floats", None, "one weight per task vector (default: 1 each)", per_model=True)


# -- the per-tensor steps, shared with DARE's TIES combination ---------------------------------------------------
def weighted_task_vectors(job: TensorJob) -> torch.Tensor:
    """A new [n, ...] tensor of w_i τ_i (computed row by row in place: one allocation)."""
    weights = job.params.get("weights") or [1.0] * len(job.models)
    vectors = torch.empty((len(job.models), *job.base.shape), dtype=job.base.dtype, device=job.base.device)
    for row, model, weight in zip(vectors, job.models, weights):
        torch.sub(model, job.base, out=row)
        if weight != 1.0:
            row.mul_(weight)
    return vectors


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


def tensor_thresholds(task_vectors: torch.Tensor, density: float) -> list[float]:
    """Per task vector (rows of [n, N]): the k-th largest |τ_i|, k = int(density · positions changed by any model)."""
    changed = sum(int((task_vectors[:, start:start + BLOCK] != 0).any(0).sum())
                  for start in range(0, task_vectors.shape[1], BLOCK))
    keep = int(density * changed)
    if keep == 0:
        return [float("inf")] * len(task_vectors)
    digits = _digits(task_vectors.dtype == torch.float64)
    thresholds = []
    for row in task_vectors:
        bits = _bits(row.abs())
        prefix, rank = 0, keep
        for level in range(digits):
            digit, rank = _select(_digit_counts(bits, level, digits, prefix), rank)
            prefix = (prefix << _DIGIT) | digit
        thresholds.append(_value(prefix, bits.dtype))
    return thresholds


# -- the whole-model stage: exact global thresholds by streaming radix selection -----------------------------------
def threshold_passes(params: dict, wide: bool) -> int:
    """One pass per 16-bit digit of the magnitudes' bit pattern (2 for float32, 4 for float64), plus the sign pass."""
    return _digits(wide) + 1


def global_thresholds(stream, params: dict, wide: bool) -> dict:
    """One threshold per task vector over the whole model, and the model-wide majority sign for exact ties.

    Non-negative floats order like their integer bit patterns, so the k-th largest |τ_i| is found exactly by
    radix selection, one streamed pass per 16-bit digit: a histogram of the top digit, then of the next digit
    among the entries sharing the selected prefix, and so on. (A model with float64 tensors is ranked in float64.)
    The last pass counts elected signs after trimming, for the majority sign given to exact ties (γ = 0).
    """
    digits = _digits(wide)
    selections: list[list[int]] = []  # per task vector: [prefix, rank]
    changed = [0]

    def magnitudes_of(job: TensorJob) -> torch.Tensor:
        magnitudes = weighted_task_vectors(job).abs_().flatten(1)
        return magnitudes.double() if wide else magnitudes

    for level in range(digits):
        counts: list[torch.Tensor] = []

        def count(job: TensorJob, level=level, counts=counts) -> None:
            magnitudes = magnitudes_of(job)
            if level == 0:
                changed[0] += sum(int((magnitudes[:, start:start + BLOCK] != 0).any(0).sum())
                                  for start in range(0, magnitudes.shape[1], BLOCK))
            for i, bits in enumerate(_bits(magnitudes)):
                prefix = selections[i][0] if level else 0
                if len(counts) <= i:
                    counts.append(torch.zeros(1 << _DIGIT, dtype=torch.int64))
                counts[i] += _digit_counts(bits, level, digits, prefix)

        stream(count)
        if level == 0:
            keep = int(params["density"] * changed[0])
            if keep == 0:
                return {"thresholds": [float("inf")] * len(counts), "majority_sign": 1.0}
            selections = [[0, keep] for _ in counts]
        for selection, histogram in zip(selections, counts):
            digit, selection[1] = _select(histogram, selection[1])
            selection[0] = (selection[0] << _DIGIT) | digit
    pattern_dtype = torch.int64 if wide else torch.int32
    thresholds = [_value(prefix, pattern_dtype) for prefix, _ in selections]
    balance = [0]

    def count_signs(job: TensorJob) -> None:
        vectors = weighted_task_vectors(job).flatten(1)
        for start in range(0, vectors.shape[1], BLOCK):
            trimmed = trim(vectors[:, start:start + BLOCK], thresholds)
            balance[0] += int(elect_sign(trimmed, params["sign"], 0.0).sum())

    stream(count_signs)
    return {"thresholds": thresholds, "majority_sign": 1.0 if balance[0] >= 0 else -1.0}


# -- radix selection on bit patterns (exact, and several times faster than kthvalue on the CPU) -------------------
_DIGIT = 16


def _digits(wide: bool) -> int:
    return 4 if wide else 2


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    """Non-negative floats viewed as integers of the same width: the order is the same."""
    return magnitudes.contiguous().view(torch.int64 if magnitudes.dtype == torch.float64 else torch.int32)


def _digit_counts(bits: torch.Tensor, level: int, digits: int, prefix: int) -> torch.Tensor:
    """Histogram of digit ``level`` (0 = most significant) over the entries whose higher digits equal ``prefix``."""
    shift = _DIGIT * (digits - 1 - level)
    if level:
        bits = bits[(bits >> (shift + _DIGIT)) == prefix]
    return torch.bincount((bits >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT).cpu()


def _value(pattern: int, pattern_dtype: torch.dtype) -> float:
    float_dtype = torch.float64 if pattern_dtype == torch.int64 else torch.float32
    return torch.tensor([pattern], dtype=pattern_dtype).view(float_dtype).item()


def _select(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the rank-th largest value (1-based), and that value's rank within the bucket."""
    from_top = counts.flip(0).cumsum(0)
    index_from_top = int(torch.searchsorted(from_top, torch.tensor(rank)))
    bucket = len(counts) - 1 - index_from_top
    above = int(from_top[index_from_top - 1]) if index_from_top > 0 else 0
    return bucket, rank - above


# -- the kernel --------------------------------------------------------------------------------------------------
BLOCK = 1 << 22  # positions merged at a time: bounds the kernel's temporaries on large tensors (embeddings, heads)


def _ties(job: TensorJob) -> torch.Tensor:
    params = job.params
    vectors = weighted_task_vectors(job).flatten(1)
    if params["trim_scope"] == "model":
        stage = job.stage_results[GLOBAL_THRESHOLD]
        thresholds, tie_sign = stage["thresholds"], stage["majority_sign"]
    else:
        thresholds, tie_sign = tensor_thresholds(vectors, params["density"]), 1.0
    weights = params["weights"] or [1.0] * len(job.models)
    merged = job.base.flatten().clone()
    for start in range(0, vectors.shape[1], BLOCK):
        trimmed = trim(vectors[:, start:start + BLOCK], thresholds)
        elected = elect_sign(trimmed, params["sign"], tie_sign)
        merged[start:start + BLOCK].add_(disjoint_merge(trimmed, elected, params["merge_func"], weights),
                                         alpha=params["scaling"])
    return merged.view_as(job.base)


TIES = MergeMethod(
    name="ties",
    summary="TIES: trim task vectors by magnitude, elect a sign per entry, merge the agreeing entries",
    formula="θ = θ_0 + λ · disjoint_merge(trim_density(w_i τ_i), γ), γ = sign(Σ_i w_i τ̂_i)",
    params=(DENSITY, SIGN, MERGE_FUNC, SCALING, TRIM_SCOPE, WEIGHTS),
    merge_tensor=_ties,
    min_models=1,
    base=BASE_REQUIRED,
    stages=(Stage(GLOBAL_THRESHOLD, global_thresholds, passes=threshold_passes,
                  applies=lambda params: params["trim_scope"] == "model"),),
)


@hookimpl
def register_merge_methods(register):
    register(TIES)
