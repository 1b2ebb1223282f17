"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

With task vectors τ_i = θ_i − θ_0 and per-model weights w_i (default 1):
1. trim: keep the top ``density`` fraction of |τ_i| and zero the rest. The fraction counts only the positions
   some model changed (τ ≠ 0 for some i), so frozen parameters do not dilute it. ``trim_scope="tensor"`` ranks
   each tensor on its own (mergekit); ``"model"`` ranks the whole model at once with one exact global threshold
   per task vector (the paper and FusionBench). Either way a sample brackets each threshold and a counting pass
   collects the entries inside the bracket, whose order statistic is the exact threshold; in tensor scope the
   native kernels merge during that same pass every position the bracket already settles and the few others
   after it. Entries equal to the threshold are all kept.
2. elect: γ = sign(Σ_i w_i τ̂_i) (``sign="sum"``, by mass) or sign(Σ_i sign(w_i τ̂_i)) (``"count"``). Exact ties
   (γ = 0) elect + in tensor scope (mergekit) and the model-wide majority sign in model scope (FusionBench).
3. disjoint merge over the entries whose sign agrees with γ: ``"mean"`` Σ w_i τ̂_i / Σ w_i (over agreeing
   non-zero entries; the paper's mean when w = 1), ``"sum"`` Σ w_i τ̂_i, or ``"max"`` γ · max |w_i τ̂_i|.
4. θ = θ_0 + λ · merged, λ = ``scaling``.
Weights multiply the task vectors before the election, as in mergekit.
"""

from __future__ import annotations

import numpy as np
import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Stage, TensorJob
from nbmerge.params import Param
from nbmerge_plugins import native

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


def tensor_thresholds(job: TensorJob, density: float) -> list[float]:
    """Per task vector: the k-th largest |w_i τ_i| of the tensor, k = int(density · positions changed by any model).

    Exact, without sorting: a strided sample of each |τ_i| brackets the k-th largest value in [lo, hi]; one
    streamed pass counts the entries above hi and collects those inside [lo, hi] (a few percent); the k-th largest
    is then the right order statistic of that band. Should the bracket miss (the pass's exact counts say so), the
    radix selection below finds the value instead.
    """
    samples, brackets = _tensor_brackets(job, density)
    changed, above, bands = count_in_brackets(job, brackets, _inside_fractions(samples, brackets)[0], wide=False)
    keep = int(density * changed)
    if keep == 0:
        return [float("inf")] * len(job.models)
    thresholds = native.map_in_threads(lambda band_above: _order_statistic(*band_above, keep), zip(bands, above))
    return [_radix_threshold(weighted_task_vectors(job.upcast())[i].abs().flatten(), keep) if threshold is None
            else threshold for i, threshold in enumerate(thresholds)]


def _tensor_brackets(job: TensorJob, density: float) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """The sample of every |w_i τ_i| of the tensor, and from it each task vector's bracket of its threshold."""
    samples = _sampled_magnitudes(job)
    changed_fraction = float((samples != 0).any(0).float().mean()) if samples.numel() else 1.0
    return samples, native.map_in_threads(lambda row: _bracket(row, density * changed_fraction), list(samples))


ONE_PASS_MAX_DEFERRED = 0.25  # above this sampled fraction of undecided positions, two passes cost less


def _ties_in_one_pass(job: TensorJob) -> torch.Tensor | None:
    """Tensor-scope TIES in one native pass over the inputs instead of a counting pass then a merge pass.

    The sampled brackets settle the keep/drop decision of every entry outside them, so the pass merges every
    position where no |w_i τ_i| falls inside its bracket while it counts and collects the bands (as the counting
    pass does); the other positions (a few percent) keep their inputs' values aside and are merged once the bands
    give the exact thresholds. The result is the two-pass result bit for bit. None when a bracket missed, a
    buffer overflowed or nothing is kept (the two-pass path then runs).
    """
    params = job.params
    samples, brackets = _tensor_brackets(job, params["density"])
    band_fractions, deferred_fraction = _inside_fractions(samples, brackets)
    if deferred_fraction > ONE_PASS_MAX_DEFERRED:
        return None
    numel = job.base.numel()
    done = native.ties_bracketed(job, brackets, int(2 * max(band_fractions, default=1.0) * numel) + 4096,
                                 int(2 * deferred_fraction * numel) + 4096, params["sign"], 1.0,
                                 params["merge_func"], params["scaling"])
    keep = int(params["density"] * done.changed)
    if done.bands is None or done.deferred is None or keep == 0:
        return None
    thresholds = native.map_in_threads(lambda band_above: _order_statistic(*band_above, keep),
                                       zip(done.bands, done.above))
    if any(threshold is None for threshold in thresholds):
        return None
    return native.ties_fixup(job, done, thresholds, params["sign"], 1.0, params["merge_func"], params["scaling"])


def _order_statistic(band: torch.Tensor, above: int, keep: int) -> float | None:
    """The keep-th largest value overall, from the band and the count of values above it; None when the band
    does not hold it (the bracket missed)."""
    rank_in_band = keep - above  # 1-based, from the top
    if 0 < rank_in_band <= band.numel():
        return kth_largest(band, [rank_in_band])[0]
    return None


def kth_largest(values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The r-th largest of non-negative ``values`` for each 1-based rank r from the top (1 <= r <= numel; NaN
    counts as the largest): float32 on the CPU by the native radix selection (two histogram passes, unaffected
    by the many equal values of bfloat16-derived magnitudes, where quickselect slows down several times), other
    CPU tensors by numpy's partition (one introselect for all the ranks; it frees the GIL), others by kthvalue."""
    count = values.numel()
    if not ranks:
        return []
    if values.device.type != "cpu":
        return [float(values.kthvalue(count - rank + 1).values) for rank in ranks]
    if values.dtype == torch.float32 and native.library() is not None:
        return native.kth_largest(values, ranks)
    positions = [count - rank for rank in ranks]
    partitioned = np.partition(values.reshape(-1).numpy(), positions)
    return [float(partitioned[position]) for position in positions]


def count_in_brackets(job: TensorJob, brackets: list[tuple[float, float]], band_fractions: list[float],
                      wide: bool) -> tuple[int, list[int], list[torch.Tensor]]:
    """One pass over m_i = |w_i τ_i|: the positions some model changed, #{m_i > hi_i} per task vector, and the
    m_i inside [lo_i, hi_i] (the band; about ``band_fractions[i]`` of the positions, as the sample saw it).
    The fused native kernel when it applies (its band buffer sized at twice the sampled fraction, the torch
    pass should that overflow), else BLOCK positions at a time in torch."""
    if native.accepts(job):
        capacity = int(2 * max(band_fractions, default=1.0) * job.base.numel()) + 4096
        changed, above, bands = native.ties_band(job, brackets, capacity)
        if bands is not None:
            return changed, above, [band.double() for band in bands] if wide else bands
    changed, above, bands = 0, [0] * len(brackets), [[] for _ in brackets]
    for magnitudes in _blocks_of_magnitudes(job.upcast(), wide):
        changed += changed_positions(magnitudes)
        for i, (row, (lo, hi)) in enumerate(zip(magnitudes, brackets)):
            above[i] += int(torch.count_nonzero(row > hi))
            bands[i].append(row[(row >= lo).logical_and_(row <= hi)])
    return changed, above, [torch.cat(band) for band in bands]


def _inside_fractions(samples: torch.Tensor, brackets: list[tuple[float, float]]) -> tuple[list[float], float]:
    """The fraction of the sample inside each task vector's bracket, and of its positions with some task vector
    inside its bracket."""
    if not samples.numel():
        return [1.0] * len(brackets), 1.0
    rows = samples.cpu().numpy()  # a small sample, wherever it was computed
    lows = np.array([lo for lo, _ in brackets], dtype=rows.dtype)[:, None]
    highs = np.array([hi for _, hi in brackets], dtype=rows.dtype)[:, None]
    inside = (rows >= lows) & (rows <= highs)
    return (inside.mean(1).tolist(), float(inside.any(0).mean()))


SAMPLE = 1 << 16
SAMPLE_RUN = 32  # consecutive positions per sampled run: a cache line of bfloat16, two of float32


def changed_positions(magnitudes: torch.Tensor) -> int:
    """Positions (columns of [n, positions] magnitudes |τ_i|) that some model changed: a non-zero column sum
    (15x faster than ``(τ != 0).any(0)``, and exact: a sum of non-negative numbers is 0 only when all are)."""
    return int(torch.count_nonzero(magnitudes.sum(0)))


def _sampled_magnitudes(job: TensorJob) -> torch.Tensor:
    """|w_i τ_i| at about SAMPLE positions, in runs of SAMPLE_RUN spread evenly over the tensor: [n, samples]."""
    return _magnitudes_at(job, 0, max(SAMPLE_RUN, job.base.numel() // (SAMPLE // SAMPLE_RUN)), SAMPLE_RUN)


def sample_runs(total: int, first: int, stride: int) -> int:
    """How many runs start at first, first + stride, ... below total."""
    return max(0, -(-(total - first) // stride))


def _magnitudes_at(job: TensorJob, first: int, stride: int, run: int) -> torch.Tensor:
    """|w_i τ_i| at the runs of ``run`` consecutive flat positions starting at first, first + stride, ... (those
    below the tensor's end): [n, positions]. The native kernel reads just those positions where it applies."""
    total = job.base.numel()
    if native.accepts(job):
        return native.ties_sample(job, first, stride, run)
    starts = torch.arange(first, total, stride, device=job.base.device)
    positions = (starts.unsqueeze(1) + torch.arange(run, device=starts.device)).flatten()
    positions = positions[positions < total]
    weights = job.params.get("weights") or [1.0] * len(job.models)
    compute = job.compute_dtype
    base = job.base.reshape(-1)[positions].to(compute)
    return torch.stack([(model.reshape(-1)[positions].to(compute) - base).mul_(weight).abs_()
                        for model, weight in zip(job.models, weights)])


def _bracket(sample: torch.Tensor, kept_fraction: float) -> tuple[float, float]:
    """[lo, hi] around the sample's kept_fraction quantile from the top, wide enough (±6σ of the rank's binomial
    spread, plus slack) that the whole tensor's k-th largest value almost surely falls inside."""
    count = sample.numel()
    rank = kept_fraction * count
    margin = 6.0 * (rank * (1.0 - kept_fraction)) ** 0.5 + 16
    top, bottom = int(rank - margin), int(rank + margin)  # 1-based ranks from the top
    wanted = [r for r in (top, bottom) if 1 <= r <= count]
    found = dict(zip(wanted, kth_largest(sample, wanted)))
    return found.get(bottom, 0.0), found.get(top, float("inf"))


def _radix_threshold(magnitudes: torch.Tensor, keep: int) -> float:
    """The keep-th largest of non-negative ``magnitudes``, exactly, by radix selection on their bit patterns."""
    digits = _digits(magnitudes.dtype == torch.float64)
    bits = _bits(magnitudes)
    prefix, rank = 0, keep
    for level in range(digits):
        digit, rank = _select(_digit_counts(bits, level, digits, prefix), rank)
        prefix = (prefix << _DIGIT) | digit
    return _value(prefix, bits.dtype)


# -- the whole-model stage: exact global thresholds from a sampled bracket ------------------------------------------
MODEL_SAMPLE_STRIDE = 127 * SAMPLE_RUN  # one position in 127 (a prime: runs do not line up with power-of-two rows)
MODEL_SAMPLE_BUDGET = 1 << 22  # samples kept per task vector; beyond it every other one is dropped, stride doubled


def threshold_passes(params: dict, wide: bool) -> int:
    """A sampling pass, a counting pass and the sign pass (the radix fallback, almost never needed, adds more)."""
    return 3


def global_thresholds(stream, params: dict, wide: bool) -> dict:
    """One threshold per task vector over the whole model, and the model-wide majority sign for exact ties.

    The k-th largest |w_i τ_i| over the model, k = int(density · positions changed by any model), exactly:
    1. a strided sample of every |τ_i| (every 127th position of the concatenated model, thinned to at most
       4M values) brackets the k-th largest value in [lo, hi] (±6σ of the rank's binomial spread);
    2. one streamed pass counts the changed positions and, per task vector, the entries above hi, and collects
       the entries inside [lo, hi] (a fraction of a percent of the model); the k-th largest is then the right
       order statistic of that band. Should the bracket miss (the exact counts say so), a streaming radix
       selection on the magnitudes' bit patterns (one pass per 16-bit digit) finds the value instead.
    3. the last pass counts elected signs after trimming, for the majority sign given to exact ties (γ = 0).
    (A model with float64 tensors is ranked in float64.)
    """
    sampler = _ModelSample()
    stream(sampler.visit)
    changed_fraction = sampler.changed_fraction()
    brackets = [_bracket(row, params["density"] * changed_fraction) for row in sampler.rows()]
    fractions = _inside_fractions(sampler.rows(), brackets)[0]
    changed, above, bands = [0], [0] * len(brackets), [[] for _ in brackets]

    def count(job: TensorJob) -> None:
        job_changed, job_above, job_bands = count_in_brackets(job, brackets, fractions, wide)
        changed[0] += job_changed
        for i, (count_above, band) in enumerate(zip(job_above, job_bands)):
            above[i] += count_above
            bands[i].append(band)

    stream(count)
    keep = int(params["density"] * changed[0])
    if keep == 0:
        return {"thresholds": [float("inf")] * len(brackets), "majority_sign": 1.0}
    thresholds = native.map_in_threads(lambda band_above: _order_statistic(torch.cat(band_above[0]),
                                                                           band_above[1], keep), zip(bands, above))
    if any(threshold is None for threshold in thresholds):
        radix = _radix_global_thresholds(stream, keep, len(thresholds), wide)
        thresholds = [radix[i] if threshold is None else threshold for i, threshold in enumerate(thresholds)]
    balance = [0]

    def count_signs(job: TensorJob) -> None:
        if native.accepts(job):
            balance[0] += native.ties_sign_balance(job, thresholds, params["sign"])
            return
        for _, _, vectors in blocks_of_task_vectors(job.upcast()):
            balance[0] += int(elect_sign(trim(vectors, thresholds), params["sign"], 0.0).sum())

    stream(count_signs)
    return {"thresholds": thresholds, "majority_sign": 1.0 if balance[0] >= 0 else -1.0}


def _blocks_of_magnitudes(job: TensorJob, wide: bool):
    """|w_i τ_i| BLOCK positions at a time ([n, positions], float64 when the model is ranked in float64)."""
    for _, _, rows in blocks_of_task_vectors(job):
        yield rows.abs_().double() if wide else rows.abs_()


class _ModelSample:
    """|w_i τ_i| at runs of SAMPLE_RUN positions every ``stride`` positions of the model's tensors taken end to
    end; when a task vector's sample passes MODEL_SAMPLE_BUDGET, every other value is dropped and the stride
    doubles (the sample stays spread evenly)."""

    def __init__(self):
        self.stride, self.offset = MODEL_SAMPLE_STRIDE, 0
        self.parts: list[torch.Tensor] = []  # [n, samples] per tensor
        self.count = 0

    def visit(self, job: TensorJob) -> None:
        total = job.base.numel()
        if self.offset < total:
            sampled = _magnitudes_at(job, self.offset, self.stride, SAMPLE_RUN).double().cpu()
            self.parts.append(sampled)
            self.count += sampled.shape[1]
            self.offset += sample_runs(total, self.offset, self.stride) * self.stride - total
        else:
            self.offset -= total
        if self.count > MODEL_SAMPLE_BUDGET:
            thinned = torch.cat(self.parts, 1)[:, ::2]
            self.parts, self.count, self.stride = [thinned], thinned.shape[1], self.stride * 2

    def rows(self) -> torch.Tensor:
        return torch.cat(self.parts, 1) if self.parts else torch.zeros(0, 0, dtype=torch.float64)

    def changed_fraction(self) -> float:
        rows = self.rows()
        return float((rows != 0).any(0).double().mean()) if rows.numel() else 1.0


def _radix_global_thresholds(stream, keep: int, n: int, wide: bool) -> list[float]:
    """The keep-th largest |w_i τ_i| over the model for each of the n task vectors, by streaming radix
    selection: a histogram of the top 16-bit digit of the bit patterns, then of the next digit among the entries
    sharing the selected prefix, and so on (non-negative floats order like their bit patterns)."""
    digits = _digits(wide)
    selections = [[0, keep] for _ in range(n)]  # per task vector: [prefix, rank]
    for level in range(digits):
        counts = [torch.zeros(1 << _DIGIT, dtype=torch.int64) for _ in range(n)]

        def count(job: TensorJob, level=level, counts=counts) -> None:
            for magnitudes in _blocks_of_magnitudes(job.upcast(), wide):
                for i, bits in enumerate(_bits(magnitudes)):
                    counts[i] += _digit_counts(bits, level, digits, selections[i][0] if level else 0)

        stream(count)
        for selection, histogram in zip(selections, counts):
            digit, selection[1] = _select(histogram, selection[1])
            selection[0] = (selection[0] << _DIGIT) | digit
    pattern_dtype = torch.int64 if wide else torch.int32
    return [_value(prefix, pattern_dtype) for prefix, _ in selections]


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
BLOCK = 1 << 18  # positions merged at a time: the kernel's temporaries stay a few MiB, reused by the C heap


def _ties(job: TensorJob) -> torch.Tensor:
    job = job if native.accepts(job) else job.upcast()
    params = job.params
    if params["trim_scope"] == "model":
        stage = job.stage_results[GLOBAL_THRESHOLD]
        thresholds, tie_sign = stage["thresholds"], stage["majority_sign"]
    else:
        merged = _ties_in_one_pass(job) if native.accepts(job) else None
        if merged is not None:
            return merged
        thresholds, tie_sign = tensor_thresholds(job, params["density"]), 1.0
    if native.accepts(job):
        return native.ties_merge(job, thresholds, params["sign"], tie_sign, params["merge_func"],
                                 params["scaling"])
    merged = job.empty(job.base.shape, job.base.dtype)
    weights = params["weights"] or [1.0] * len(job.models)
    merged_flat, base_flat = merged.view(-1), job.base.reshape(-1)
    for start, stop, vectors in blocks_of_task_vectors(job):
        trimmed = trim(vectors, thresholds)
        elected = elect_sign(trimmed, params["sign"], tie_sign)
        combined = disjoint_merge(trimmed, elected, params["merge_func"], weights)
        torch.add(base_flat[start:stop], combined, alpha=params["scaling"], out=merged_flat[start:stop])
    return merged


TIES = MergeMethod(
    name="ties",
    summary="TIES: trim task vectors by magnitude, elect a sign per entry, merge the agreeing entries",
    formula="θ = θ_0 + λ · disjoint_merge(trim_density(w_i τ_i), γ), γ = sign(Σ_i w_i τ̂_i)",
    params=(DENSITY, SIGN, MERGE_FUNC, SCALING, TRIM_SCOPE, WEIGHTS),
    merge_tensor=_ties,
    stored_inputs=True,
    min_models=1,
    base=BASE_REQUIRED,
    stages=(Stage(GLOBAL_THRESHOLD, global_thresholds, passes=threshold_passes,
                  applies=lambda params: params["trim_scope"] == "model"),),
)


@hookimpl
def register_merge_methods(register):
    register(TIES)
