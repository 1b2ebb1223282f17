"""The fused C kernels of ``kernels.c`` beside this file (built at install as ``nbmerge_plugins.native._kernels``),
called through ctypes.

They read float32 or bfloat16 CPU tensors (contiguous, at most ``MAX_MODELS`` models), compute in float32 and
write float32 or bfloat16; ``accepts(job)`` says whether a job qualifies, and a method falls back to its torch
path otherwise. The library is optional: without a C compiler at install time, or with the environment variable
``NBMERGE_NATIVE=0``, ``library()`` is None and every method runs its torch path.

ctypes releases the GIL while a kernel runs, so a large tensor is cut into one contiguous range of positions per
core and the ranges run at once in a small thread pool (the kernels are reentrant and allocate nothing).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from nbmerge.method import TensorJob

MAX_MODELS = 16  # kernels.c keeps one tile row per model on the stack
MERGE_FUNCS = {"mean": 0, "sum": 1, "max": 2}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
SPLIT_AT = 1 << 20  # positions from which a tensor is cut into one range per core
PARTS = os.cpu_count() or 1
_TILE = 1024        # kernels.c's tile: ranges start on a tile boundary

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it was not built or ``NBMERGE_NATIVE=0`` turns it off."""
    if os.environ.get("NBMERGE_NATIVE", "1") == "0":
        return None
    spec = importlib.util.find_spec("nbmerge_plugins.native._kernels")
    if spec is None or not spec.origin:
        return None
    loaded = ctypes.CDLL(spec.origin)
    inputs = [_i64, _i64, _ptr, _ptr, _ptr, _int, _ptr]  # n, count, models, dtypes, base, base dtype, weights
    loaded.nbm_ties_merge.argtypes = inputs + [_ptr, _int, _f32, _int, _f32, _ptr, _int]
    loaded.nbm_ties_sign_balance.argtypes = inputs + [_ptr, _int, _ptr]
    loaded.nbm_ties_band.argtypes = inputs + [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr]
    loaded.nbm_ties_sample.argtypes = inputs + [_i64, _i64, _i64, _ptr]
    loaded.nbm_ties_bracketed.argtypes = inputs + [_ptr, _ptr, _int, _f32, _int, _f32, _ptr, _int,
                                                   _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64]
    loaded.nbm_kth_largest.argtypes = [_i64, _ptr, _i64, _ptr, _ptr]
    loaded.nbm_ties_fixup.argtypes = [_i64, _i64, _ptr, _ptr, _ptr, _ptr, _int, _f32, _int, _f32, _ptr, _int]
    loaded.nbm_dare_l1.argtypes = inputs[:6] + [_ptr, _i64, _f32, _ptr, _ptr]
    loaded.nbm_dare_merge.argtypes = inputs + [_ptr, _i64, _f32, _ptr, _ptr, _int, _f32, _ptr, _int]
    loaded.nbm_linear.argtypes = inputs + [_ptr, _int]
    loaded.nbm_dot_norms.argtypes = [_i64, _ptr, _int, _ptr, _int, _ptr]
    for kernel in (loaded.nbm_ties_merge, loaded.nbm_ties_sign_balance, loaded.nbm_ties_band, loaded.nbm_ties_sample,
                   loaded.nbm_ties_bracketed, loaded.nbm_ties_fixup, loaded.nbm_kth_largest, loaded.nbm_dare_l1,
                   loaded.nbm_dare_merge,
                   loaded.nbm_linear, loaded.nbm_dot_norms):
        kernel.restype = ctypes.c_int
    return loaded


@lru_cache(maxsize=1)
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=PARTS, thread_name_prefix="nbmerge-kernel")


def map_in_threads(function, items) -> list:
    """``[function(item) for item in items]``, run in the kernels' thread pool (for work that releases the GIL,
    such as torch's selection kernels)."""
    items = list(items)
    if len(items) < 2 or PARTS < 2:
        return [function(item) for item in items]
    return list(_workers().map(function, items))


def accepts(job: TensorJob, needs_base: bool = True) -> bool:
    """The kernels apply: library loaded, a base (unless ``needs_base`` is false), every tensor float32 or
    bfloat16, contiguous, on the CPU, and at most MAX_MODELS models."""
    if (needs_base and job.base is None) or not 1 <= len(job.models) <= MAX_MODELS or library() is None:
        return False
    inputs = job.models + ([job.base] if job.base is not None else [])
    return all(t.dtype in DTYPE_CODES and t.device.type == "cpu" and t.is_contiguous() for t in inputs)


def output_dtype(job: TensorJob) -> torch.dtype:
    """The dtype a kernel writes: the job's output dtype when the kernels can write it, else float32."""
    return job.out_dtype if job.out_dtype in DTYPE_CODES else torch.float32


def _ranges(count: int) -> list[tuple[int, int]]:
    """[start, stop) ranges, one per core for a large tensor, each starting on a tile boundary."""
    parts = PARTS if count >= SPLIT_AT else 1
    step = max(_TILE, -(-count // parts // _TILE) * _TILE)
    return [(start, min(start + step, count)) for start in range(0, count, step)] or [(0, 0)]


def _run(kernel, ranges: list[tuple[int, int]], call):
    """``call(kernel, start, stop)`` for every range, concurrently when there are several; results in order."""
    if len(ranges) == 1:
        return [call(kernel, *ranges[0])]
    futures = [_workers().submit(call, kernel, start, stop) for start, stop in ranges]
    return [future.result() for future in futures]


class _Inputs:
    """A job's input pointers, offset to a range of positions, in the layout the kernels take."""

    def __init__(self, job: TensorJob, weights: list[float] | None = None, with_base: bool = True):
        self.models, self.base = job.models, job.base if with_base else None
        self.n = len(job.models)
        self.dtypes = (ctypes.c_int * self.n)(*[DTYPE_CODES[m.dtype] for m in job.models])
        self.weights = (ctypes.c_float * self.n)(*(weights or job.params.get("weights") or [1.0] * self.n))

    def at(self, start: int, stop: int) -> list:
        models = (ctypes.c_void_p * self.n)(*[_address(m, start) for m in self.models])
        base, base_dtype = (None, 0) if self.base is None else (_address(self.base, start),
                                                                DTYPE_CODES[self.base.dtype])
        return [self.n, stop - start, models, self.dtypes, base, base_dtype, self.weights]


def _address(tensor: torch.Tensor, start: int) -> int:
    return tensor.data_ptr() + start * tensor.element_size()


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def float32_rounded(values, rounding: str) -> list[float]:
    """Each value as the float32 nearest it from above ("up") or below ("down"), so that for float32 m the
    float comparisons m >= up(t), m <= down(t), m > down(t) are exactly m >= t, m <= t, m > t."""
    exact = torch.tensor([float(v) for v in values], dtype=torch.float64)
    rounded = exact.float()
    toward = torch.tensor(float("inf") if rounding == "up" else float("-inf"))
    wrong_side = rounded.double() < exact if rounding == "up" else rounded.double() > exact
    return torch.where(wrong_side, torch.nextafter(rounded, toward), rounded).tolist()


def _float32_bounds(values, rounding: str) -> ctypes.Array:
    """``float32_rounded`` as a C float array for the kernels."""
    return (ctypes.c_float * len(values))(*float32_rounded(values, rounding))


def _check(status: int, kernel: str) -> None:
    if status != 0:
        raise AssertionError(f"native kernel {kernel} refused its arguments (status {status})")


def ties_merge(job: TensorJob, thresholds: list[float], sign: str, tie_sign: float, merge_func: str,
               scaling: float) -> torch.Tensor:
    """θ_0 + λ · disjoint_merge(trim(w_i τ_i), γ), in ``output_dtype(job)``, the base's shape; see ties.py."""
    out = job.empty(job.base.shape, output_dtype(job))
    inputs, bounds = _Inputs(job), _float32_bounds(thresholds, "up")

    def call(kernel, start, stop):
        _check(kernel(*inputs.at(start, stop), bounds, int(sign == "count"), tie_sign, MERGE_FUNCS[merge_func],
                      scaling, _address(out, start), DTYPE_CODES[out.dtype]), "ties_merge")

    _run(library().nbm_ties_merge, _ranges(job.base.numel()), call)
    return out


def ties_sign_balance(job: TensorJob, thresholds: list[float], sign: str) -> int:
    """Σ over positions of sign(γ) after trimming, exact ties counted 0."""
    inputs, bounds = _Inputs(job), _float32_bounds(thresholds, "up")

    def call(kernel, start, stop):
        balance = ctypes.c_int64(0)
        _check(kernel(*inputs.at(start, stop), bounds, int(sign == "count"), ctypes.byref(balance)),
               "ties_sign_balance")
        return balance.value

    return sum(_run(library().nbm_ties_sign_balance, _ranges(job.base.numel()), call))


def ties_band(job: TensorJob, brackets: list[tuple[float, float]], capacity: int):
    """One counting pass over m_i = |w_i τ_i|: (positions some model changed, #{m_i > hi_i} per task vector,
    the m_i inside [lo_i, hi_i] per task vector, in position order). The bands are None when one held more than
    ``capacity`` entries (then the caller collects them another way)."""
    inputs = _Inputs(job)
    lows = _float32_bounds([lo for lo, _ in brackets], "up")
    highs = _float32_bounds([hi for _, hi in brackets], "down")
    ranges = _ranges(job.base.numel())
    range_capacity = max(1, min(capacity, job.base.numel()) // len(ranges) + _TILE)

    def call(kernel, start, stop):
        bands = torch.empty((inputs.n, range_capacity), dtype=torch.float32)
        above, lengths = (ctypes.c_int64 * inputs.n)(), (ctypes.c_int64 * inputs.n)()
        changed = ctypes.c_int64(0)
        _check(kernel(*inputs.at(start, stop), lows, highs, above, _pointers(list(bands)), lengths,
                      range_capacity, ctypes.byref(changed)), "ties_band")
        return changed.value, list(above), bands, list(lengths)

    results = _run(library().nbm_ties_band, ranges, call)
    changed = sum(result[0] for result in results)
    above = [sum(result[1][i] for result in results) for i in range(inputs.n)]
    if any(length > range_capacity for result in results for length in result[3]):
        return changed, above, None
    bands = [torch.cat([result[2][i, :result[3][i]] for result in results]) for i in range(inputs.n)]
    return changed, above, bands


@dataclass
class BracketedPass:
    """What ``ties_bracketed`` leaves: ``merged`` (final except at the deferred positions), the counts of the
    threshold selection (as ``ties_band`` gives them; ``bands`` None when one overflowed its buffer) and the
    deferred positions with their gathered values, per range (None when they overflowed theirs)."""

    merged: torch.Tensor
    changed: int
    above: list[int]
    bands: list[torch.Tensor] | None
    deferred: list[tuple[int, torch.Tensor, torch.Tensor]] | None  # (range start, positions, values)


def ties_bracketed(job: TensorJob, brackets: list[tuple[float, float]], band_capacity: int, deferred_capacity: int,
                   sign: str, tie_sign: float, merge_func: str, scaling: float) -> BracketedPass:
    """TIES over the whole tensor in one pass, given a bracket [lo_i, hi_i] assumed to hold each threshold:
    every position no |w_i τ_i| of which lies inside its bracket is merged, the others deferred to
    ``ties_fixup``; meanwhile the counting of ``ties_band``. See kernels.c (nbm_ties_bracketed)."""
    merged = job.empty(job.base.shape, output_dtype(job))
    inputs = _Inputs(job)
    lows = _float32_bounds([lo for lo, _ in brackets], "up")
    highs = _float32_bounds([hi for _, hi in brackets], "down")
    ranges = _ranges(job.base.numel())
    band_room = max(1, min(band_capacity, job.base.numel()) // len(ranges) + _TILE)
    deferred_room = max(1, min(deferred_capacity, job.base.numel()) // len(ranges) + _TILE)

    def call(kernel, start, stop):
        bands = torch.empty((inputs.n, band_room), dtype=torch.float32)
        positions = torch.empty(deferred_room, dtype=torch.int64)
        values = torch.empty((deferred_room, inputs.n + 1), dtype=torch.float32)
        above, lengths = (ctypes.c_int64 * inputs.n)(), (ctypes.c_int64 * inputs.n)()
        changed, deferred = ctypes.c_int64(0), ctypes.c_int64(0)
        _check(kernel(*inputs.at(start, stop), lows, highs, int(sign == "count"), tie_sign, MERGE_FUNCS[merge_func],
                      scaling, _address(merged, start), DTYPE_CODES[merged.dtype], above, _pointers(list(bands)),
                      lengths, band_room, ctypes.byref(changed), positions.data_ptr(), values.data_ptr(),
                      ctypes.byref(deferred), deferred_room), "ties_bracketed")
        return start, changed.value, list(above), bands, list(lengths), positions, values, deferred.value

    parts = _run(library().nbm_ties_bracketed, ranges, call)
    bands = None
    if all(length <= band_room for part in parts for length in part[4]):
        bands = [torch.cat([part[3][i, :part[4][i]] for part in parts]) for i in range(inputs.n)]
    deferred = None
    if all(part[7] <= deferred_room for part in parts):
        deferred = [(part[0], part[5][:part[7]], part[6][:part[7]]) for part in parts]
    return BracketedPass(merged, sum(part[1] for part in parts),
                         [sum(part[2][i] for part in parts) for i in range(inputs.n)], bands, deferred)


def ties_fixup(job: TensorJob, done: BracketedPass, thresholds: list[float], sign: str, tie_sign: float,
               merge_func: str, scaling: float) -> torch.Tensor:
    """``done.merged`` completed: the deferred positions merged with the exact ``thresholds``."""
    merged, bounds = done.merged, _float32_bounds(thresholds, "up")
    weights = _Inputs(job).weights

    def call(part):
        start, positions, values = part
        if positions.numel():
            _check(library().nbm_ties_fixup(len(job.models), positions.numel(), positions.data_ptr(),
                                            values.data_ptr(), weights, bounds, int(sign == "count"), tie_sign,
                                            MERGE_FUNCS[merge_func], scaling, _address(merged, start),
                                            DTYPE_CODES[merged.dtype]), "ties_fixup")

    map_in_threads(call, done.deferred)
    return merged


def kth_largest(values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The r-th largest of non-negative float32 CPU ``values`` (NaN the largest) for each 1-based rank r from the
    top, 1 <= r <= numel, by radix selection (kernels.c, nbm_kth_largest)."""
    flat = values.reshape(-1).contiguous()
    histogram = torch.empty(1 << 16, dtype=torch.int64)
    found = []
    for rank in ranks:
        value = ctypes.c_float()
        _check(library().nbm_kth_largest(flat.numel(), flat.data_ptr(), rank, histogram.data_ptr(),
                                         ctypes.byref(value)), "kth_largest")
        found.append(value.value)
    return found


def ties_sample(job: TensorJob, first: int, stride: int, run: int) -> torch.Tensor:
    """|w_i τ_i| at the runs of ``run`` consecutive flat positions starting at first, first + stride, ... below
    the tensor's end: [n, positions] float32 (kernels.c, nbm_ties_sample)."""
    total = job.base.numel()
    starts = max(0, -(-(total - first) // stride))
    samples = 0 if not starts else (starts - 1) * run + min(run, total - first - (starts - 1) * stride)
    inputs = _Inputs(job)
    magnitudes = torch.empty((inputs.n, samples), dtype=torch.float32)
    if samples:
        _check(library().nbm_ties_sample(*inputs.at(first, total), stride, run, samples, magnitudes.data_ptr()),
               "ties_sample")
    return magnitudes


def dare_merge(job: TensorJob, keys: list[int], keep_from: float) -> torch.Tensor:
    """θ_0 + λ · combine_i(w_i · m_i ⊙ τ_i, rescaled), m_i drawn from ``keys`` (dare.py's counter-based draws;
    an entry is kept when its draw is >= ``keep_from``), in ``output_dtype(job)``; see dare.py."""
    params, n = job.params, len(job.models)
    inputs, ranges = _Inputs(job), _ranges(job.base.numel())
    key_array = (ctypes.c_uint64 * n)(*keys)
    divisors = [1.0 - params["drop_rate"] if params["rescale"] is True else 1.0] * n
    multipliers = [1.0] * n
    if params["rescale"] == "l1":
        def norms(kernel, start, stop):
            before, after = (ctypes.c_double * n)(), (ctypes.c_double * n)()
            _check(kernel(*inputs.at(start, stop)[:6], key_array, start, keep_from, before, after), "dare_l1")
            return list(before), list(after)

        sums = _run(library().nbm_dare_l1, ranges, norms)
        before = [sum(part[0][i] for part in sums) for i in range(n)]
        after = [sum(part[1][i] for part in sums) for i in range(n)]
        multipliers = [b / a if a > 0 else 1.0 for b, a in zip(before, after)]
    out = job.empty(job.base.shape, output_dtype(job))
    divisor_array, multiplier_array = (ctypes.c_float * n)(*divisors), (ctypes.c_float * n)(*multipliers)

    def call(kernel, start, stop):
        _check(kernel(*inputs.at(start, stop), key_array, start, keep_from, divisor_array, multiplier_array,
                      int(params["combine"] == "ties"), params["scaling"], _address(out, start),
                      DTYPE_CODES[out.dtype]), "dare_merge")

    _run(library().nbm_dare_merge, ranges, call)
    return out


def linear_combination(job: TensorJob, coefficients: list[float], with_base: bool) -> torch.Tensor:
    """θ_0 + Σ_i c_i (θ_i − θ_0) with the base, Σ_i c_i θ_i without, in ``output_dtype(job)``."""
    inputs = _Inputs(job, coefficients, with_base)
    out = job.empty(job.models[0].shape, output_dtype(job))

    def call(kernel, start, stop):
        _check(kernel(*inputs.at(start, stop), _address(out, start), DTYPE_CODES[out.dtype]), "linear")

    _run(library().nbm_linear, _ranges(out.numel()), call)
    return out


def dot_and_norms(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float, float]:
    """(‖a‖, ‖b‖, a · b) of two same-sized float32 or bfloat16 CPU tensors, accumulated in double."""
    def call(kernel, start, stop):
        sums = (ctypes.c_double * 3)()
        _check(kernel(stop - start, _address(first, start), DTYPE_CODES[first.dtype], _address(second, start),
                      DTYPE_CODES[second.dtype], sums), "dot_norms")
        return list(sums)

    parts = _run(library().nbm_dot_norms, _ranges(first.numel()), call)
    squares_a, squares_b, dot = (sum(part[k] for part in parts) for k in range(3))
    return squares_a ** 0.5, squares_b ** 0.5, dot
