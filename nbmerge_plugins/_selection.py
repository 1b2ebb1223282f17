"""Exact order statistics of task-vector magnitudes without sorting, for TIES's trim thresholds.

The k-th largest m = |w_i τ_i| of a tensor (``tensor_thresholds``) or of a whole model streamed tensor by
tensor (``ModelSample``, ``count_in_brackets``, ``radix_global_thresholds``):
1. a sample of runs of SAMPLE_RUN positions spread evenly brackets the k-th largest value in [lo, hi]
   (±6σ of the rank's binomial spread, ``bracket``);
2. one counting pass counts the entries above hi and collects those inside [lo, hi] (the band, a few percent);
   the k-th largest is the right order statistic of the band (``order_statistic``);
3. should the bracket miss (the exact counts say so), a radix selection on the magnitudes' bit patterns (one
   histogram per 16-bit digit; non-negative floats order like their bit patterns) finds the value instead.
"""

import numpy as np
import torch

from nbmerge.method import TensorJob
from nbmerge_plugins import native
from nbmerge_plugins._task_vectors import blocks_of_task_vectors, weighted_task_vectors


def per_model(value, n: int) -> list:
    """A per-model parameter's value for each of ``n`` models: its list, or the one value for all."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def tensor_thresholds(job: TensorJob, density, over_changed: bool = False) -> list[float]:
    """Per task vector: the k-th largest |w_i τ_i| of the tensor, k = int(density · N), N = the tensor's positions
    (the references' count) or, with ``over_changed``, only the positions some model changed.

    Exact, without sorting: a strided sample of each |τ_i| brackets the k-th largest value in [lo, hi]; one
    streamed pass counts the entries above hi and collects those inside [lo, hi] (a few percent); the k-th largest
    is then the right order statistic of that band. Should the bracket miss (the pass's exact counts say so), the
    radix selection below finds the value instead.
    """
    samples, brackets = tensor_brackets(job, density, over_changed)
    changed, above, bands = count_in_brackets(job, brackets, inside_fractions(samples, brackets)[0], wide=False)
    counted = changed if over_changed else job.base.numel()
    keeps = [int(d * counted) for d in per_model(density, len(job.models))]
    thresholds = native.map_in_threads(lambda args: order_statistic(*args) if args[2] else float("inf"),
                                       zip(bands, above, keeps))
    return [_radix_threshold(weighted_task_vectors(job.upcast())[i].abs().flatten(), keeps[i]) if threshold is None
            else threshold for i, threshold in enumerate(thresholds)]


def tensor_brackets(job: TensorJob, density,
                    over_changed: bool = False) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """The sample of every |w_i τ_i| of the tensor, and from it each task vector's bracket of its threshold
    (``density``: one fraction, or one per task vector)."""
    samples = _sampled_magnitudes(job)
    counted = float((samples != 0).any(0).float().mean()) if samples.numel() and over_changed else 1.0
    fractions = per_model(density, samples.shape[0])
    return samples, native.map_in_threads(lambda args: bracket(args[0], args[1] * counted),
                                          list(zip(samples, fractions)))


def order_statistic(band: torch.Tensor, above: int, keep: int) -> float | None:
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
    for magnitudes in blocks_of_magnitudes(job.upcast(), wide):
        changed += changed_positions(magnitudes)
        for i, (row, (lo, hi)) in enumerate(zip(magnitudes, brackets)):
            above[i] += int(torch.count_nonzero(row > hi))
            bands[i].append(row[(row >= lo).logical_and_(row <= hi)])
    return changed, above, [torch.cat(band) for band in bands]


def inside_fractions(samples: torch.Tensor, brackets: list[tuple[float, float]]) -> tuple[list[float], float]:
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


def bracket(sample: torch.Tensor, kept_fraction: float) -> tuple[float, float]:
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


def blocks_of_magnitudes(job: TensorJob, wide: bool):
    """|w_i τ_i| BLOCK positions at a time ([n, positions], float64 when the model is ranked in float64)."""
    for _, _, rows in blocks_of_task_vectors(job):
        yield rows.abs_().double() if wide else rows.abs_()


class ModelSample:
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


def model_thresholds(stream, density, over_changed: bool, wide: bool) -> list[float]:
    """Per task vector: the k-th largest |w_i τ_i| over every tensor ``stream(visit)`` visits, exactly, k =
    int(density · N) (``density``: one fraction, or one per task vector) for N = the positions visited (or, with
    ``over_changed``, those some model changed); +inf where k = 0. Two passes:
    1. a strided sample of every |τ_i| (``ModelSample``: every 127th position of the tensors taken end to end,
       thinned to at most 4M values) brackets the k-th largest value in [lo, hi] (±6σ of the rank's binomial
       spread);
    2. one pass counts the changed positions and, per task vector, the entries above hi, and collects the entries
       inside [lo, hi] (a fraction of a percent of the model); the k-th largest is then the right order statistic
       of that band. Should the bracket miss (the exact counts say so), ``radix_global_thresholds`` (one pass per
       16-bit digit) finds the value instead.
    """
    sampler = ModelSample()
    stream(sampler.visit)
    counted_fraction = sampler.changed_fraction() if over_changed else 1.0
    densities = per_model(density, sampler.rows().shape[0])
    brackets = [bracket(row, d * counted_fraction) for row, d in zip(sampler.rows(), densities)]
    fractions = inside_fractions(sampler.rows(), brackets)[0]
    counted, above, bands = [0], [0] * len(brackets), [[] for _ in brackets]

    def count(job: TensorJob) -> None:
        job_changed, job_above, job_bands = count_in_brackets(job, brackets, fractions, wide)
        counted[0] += job_changed if over_changed else job.base.numel()
        for i, (count_above, band) in enumerate(zip(job_above, job_bands)):
            above[i] += count_above
            bands[i].append(band)

    stream(count)
    keeps = [int(d * counted[0]) for d in densities]
    thresholds = native.map_in_threads(lambda args: order_statistic(torch.cat(args[0]), args[1], args[2])
                                       if args[2] else float("inf"), zip(bands, above, keeps))
    for keep in sorted({keeps[i] for i, threshold in enumerate(thresholds) if threshold is None}):
        radix = radix_global_thresholds(stream, keep, len(thresholds), wide)
        thresholds = [radix[i] if threshold is None and keeps[i] == keep else threshold
                      for i, threshold in enumerate(thresholds)]
    return thresholds


def radix_global_thresholds(stream, keep: int, n: int, wide: bool) -> list[float]:
    """The keep-th largest |w_i τ_i| over the model for each of the n task vectors, by streaming radix
    selection: a histogram of the top 16-bit digit of the bit patterns, then of the next digit among the entries
    sharing the selected prefix, and so on (non-negative floats order like their bit patterns)."""
    digits = _digits(wide)
    selections = [[0, keep] for _ in range(n)]  # per task vector: [prefix, rank]
    for level in range(digits):
        counts = [torch.zeros(1 << _DIGIT, dtype=torch.int64) for _ in range(n)]

        def count(job: TensorJob, level=level, counts=counts) -> None:
            for magnitudes in blocks_of_magnitudes(job.upcast(), wide):
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
