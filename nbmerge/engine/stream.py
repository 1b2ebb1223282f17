"""The streaming engine: one pass over tensor names, each read, merged on the device, and handed to a sink.

Memory stays a few tensors wide whatever the model size: reader threads (as many as inputs) prefetch the next
tensors of every model while the current one merges, and the sink writes the previous result in its own
thread. Whole-model stages (a method's ``Stage``) run first as passes of their own over the same stream.

On the CPU, the reader maps each input tensor from its file (the page cache's pages, not a copy), and tensors are
converted to the compute dtype and assembled in their output dtype in buffers lent by a ``BufferPool`` (reused,
so memory is not faulted in afresh for every tensor); an ``elementwise`` method's kernel runs on slices of
``CHUNK`` positions, so its temporaries stay small and are reused by the C heap (unless the method says its
kernel is ``fused`` for the job: it then streams through the whole tensor itself).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from nbmerge.engine.memory import release_free_heap
from nbmerge.engine.plan import BASE, EXACT, MergePlan, TensorPlan
from nbmerge.engine.progress import Progress
from nbmerge.errors import ModelInputError, NonFiniteError, shown
from nbmerge.io.buffers import BufferPool
from nbmerge.io.sources import ModelSource
from nbmerge.method.declaration import MergeMethod, TensorJob
from nbmerge.method.params import holds_schedule, resolved

PREFETCH_DEPTH = 2
MAX_READERS = 8  # reader threads: one per input, up to this many
TRIM_AFTER_BYTES = 16 * 2**20  # after a tensor this large, free heap pages go back to the OS
CHUNK = 1 << 20  # positions per kernel call for elementwise methods on the CPU
CACHE_LINE = 64  # bytes: a cache line, and the widest vector loads


class Engine:
    """Runs one merge: ``stages()`` then ``merge_into(sink)``. Holds nothing but the plan and open sources."""

    def __init__(self, method: MergeMethod, params: dict, plan: MergePlan, models: list[ModelSource],
                 base: ModelSource | None, device: torch.device, progress: Progress, allow_nonfinite: bool = False):
        self.method, self.params, self.plan = method, params, plan
        self.models, self.base = models, base
        self._sources = [*models, *([] if base is None else [base])]
        self.device, self.progress = device, progress
        self.allow_nonfinite = allow_nonfinite
        self._checked: set[str] = set()  # tensors whose inputs were found finite (by an earlier pass)
        self.stage_results: dict[str, Any] = {}
        self._varying = [p.name for p in method.params if holds_schedule(params[p.name])]
        self.pool = BufferPool()
        self._on_cpu = device.type == "cpu"

    # -- whole-model stages ---------------------------------------------------------------------------------
    def run_stages(self) -> None:
        for stage in self.method.stages:
            if stage.applies(self.params):
                self.stage_results[stage.name] = stage.run(self._stream_for(stage.name), self.params,
                                                           self.plan.wide)

    def _stream_for(self, stage_name: str) -> Callable[[Callable[[TensorJob], None]], None]:
        def stream(visit: Callable[[TensorJob], None]) -> None:
            self._pass(stage_name, self.plan.merged, lambda tensor, loaded: visit(self._job(tensor, loaded, {})))

        return stream

    # -- the merge pass -------------------------------------------------------------------------------------
    def merge_into(self, put: Callable[[str, torch.Tensor], None]) -> None:
        """Produce every output tensor in plan order and hand it, on the CPU in its output dtype, to ``put``."""
        self._pass("merge", self.plan.tensors, lambda tensor, loaded: put(tensor.name, self._produce(tensor, loaded)))

    def _pass(self, phase: str, tensors: list[TensorPlan], handle: Callable[[TensorPlan, dict], None]) -> None:
        """One streamed pass: ``handle`` each tensor with its loaded inputs, then free them and report progress."""
        self.progress.phase(phase)
        for tensor, loaded in self._prefetched(tensors):
            handle(tensor, loaded)
            for source in self._sources:
                source.check_no_writer()
            self._checked.add(tensor.name)
            del loaded
            if tensor.read_bytes >= TRIM_AFTER_BYTES:
                release_free_heap()
            self.progress.advance(tensor.read_bytes, tensor.name)

    def _produce(self, tensor: TensorPlan, loaded: dict) -> torch.Tensor:
        if tensor.route == BASE:
            produced = self.pool.empty(loaded["base"].shape, tensor.out_dtype).copy_(loaded["base"])
        elif tensor.route == EXACT:
            produced = _agreed_value(tensor.name, loaded, self.models, self.base)
        else:
            job = self._job(tensor, loaded, self.stage_results)
            if self._in_slices(tensor, job):
                produced = self._merge_in_chunks(tensor, loaded)
            else:
                kernel = self.method.mergekit_tensor if self.plan.mergekit_arithmetic else self.method.merge_tensor
                merged = kernel(job)
                self._check_shape(tensor, merged, tensor.info.shape)
                produced = self._to_output(merged, tensor.out_dtype)
            if not self.allow_nonfinite and not finite(produced):
                raise NonFiniteError(
                    f"{self.method.name}: the merged tensor {shown(tensor.name)} holds NaN or Inf although every input "
                    f"is finite (stored as {str(tensor.out_dtype).removeprefix('torch.')}: a value beyond its range "
                    f"overflows); nothing was written. Check the parameters, store in a wider out_dtype, or pass "
                    f"allow_nonfinite=True (--allow-nonfinite) to keep it")
        return _not_aliasing(produced, loaded)

    def _in_slices(self, tensor: TensorPlan, job: TensorJob) -> bool:
        """An elementwise method's kernel runs on slices of CHUNK positions on the CPU, unless it is fused for
        this job (its temporaries are then already small)."""
        return (self.method.elementwise and self._on_cpu and tensor.info.numel > CHUNK
                and not self.plan.mergekit_arithmetic
                and not (self.method.fused is not None and self.method.fused(job)))

    def _merge_in_chunks(self, tensor: TensorPlan, loaded: dict) -> torch.Tensor:
        """An elementwise kernel over 1-D slices of CHUNK positions, assembled in a pooled output tensor."""
        produced = self.pool.empty(tensor.info.shape, tensor.out_dtype)
        flat = {"models": [model.reshape(-1) for model in loaded["models"]]}
        if loaded.get("base") is not None:
            flat["base"] = loaded["base"].reshape(-1)
        produced_flat = produced.view(-1)
        for start in range(0, tensor.info.numel, CHUNK):
            part = slice(start, start + CHUNK)
            sliced = {"models": [model[part] for model in flat["models"]]}
            if "base" in flat:
                sliced["base"] = flat["base"][part]
            merged = self.method.merge_tensor(self._job(tensor, sliced, self.stage_results))
            self._check_shape(tensor, merged, produced_flat[part].shape)
            produced_flat[part].copy_(merged)
        return produced

    def _check_shape(self, tensor: TensorPlan, merged: torch.Tensor, expected) -> None:
        if tuple(merged.shape) != tuple(expected):
            raise AssertionError(f"method {self.method.name} returned shape {tuple(merged.shape)} for "
                                 f"{tensor.name}, expected {tuple(expected)}")

    def _to_output(self, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``merged`` on the CPU in ``dtype``; a conversion lands in a pooled buffer. A CPU tensor already in
        ``dtype`` is handed on as it is (its buffer stays out of the pool while the sink holds it; one aliasing
        an input is copied by ``_not_aliasing``)."""
        if merged.device.type == "cpu":
            return merged if merged.dtype == dtype else self.pool.empty(merged.shape, dtype).copy_(merged)
        return merged.to(device="cpu", dtype=dtype)

    def _job(self, tensor: TensorPlan, loaded: dict, stage_results: dict) -> TensorJob:
        compute = tensor.compute_dtype
        mergekit = self.plan.mergekit_arithmetic
        as_stored = self.method.stored_inputs and self._on_cpu and compute == torch.float32 and not mergekit
        params = dict(self.params)
        for name in self._varying:
            params[name] = resolved(params[name], tensor.name, tensor.layer, self.plan.num_layers)
        return TensorJob(
            name=tensor.name,
            models=[self._on_device(t, compute, as_stored) for t in loaded["models"]],
            base=None if loaded.get("base") is None else self._on_device(loaded["base"], compute, as_stored),
            params=params,
            layer=tensor.layer,
            num_layers=self.plan.num_layers,
            stage_results=stage_results,
            empty=self.pool.empty if self._on_cpu else None,
            out_dtype=tensor.out_dtype,
            arithmetic_dtype=compute if mergekit else None,
        )

    def _on_device(self, tensor: torch.Tensor, dtype: torch.dtype, as_stored: bool = False) -> torch.Tensor:
        """The tensor on the compute device in ``dtype`` (or as stored). On the CPU a tensor already in ``dtype``
        is used as it is when CACHE_LINE-aligned; a misaligned one (mapped from a file whose data does not start
        on such a boundary) is copied into an aligned pooled buffer, because BLAS reductions (dot, norm) sum in
        an order that depends on alignment, and a merge must not depend on how its inputs were stored."""
        if self._on_cpu and tensor.device.type == "cpu":
            if as_stored or (tensor.dtype == dtype and tensor.data_ptr() % CACHE_LINE == 0):
                return tensor
            return self.pool.empty(tensor.shape, dtype).copy_(tensor)
        return tensor.to(device=self.device, non_blocking=True).to(dtype)

    # -- reading ahead --------------------------------------------------------------------------------------
    def _sources_of(self, tensor: TensorPlan) -> tuple[list[ModelSource], bool]:
        """The inputs whose copies of ``tensor`` its merge reads, the base (if one is read) last, and whether one
        is (a tensor taken from the base: the base's copy alone)."""
        if tensor.route == BASE:
            return [self.base or self.models[0]], True
        return self.models + ([] if self.base is None else [self.base]), self.base is not None

    def _submit_reads(self, readers: ThreadPoolExecutor, tensor: TensorPlan) -> tuple[list[Future], bool]:
        """Ask the disk for every input's copy of ``tensor`` now (asynchronously), and queue one read per input."""
        sources, with_base = self._sources_of(tensor)
        for source in sources:
            source.advise(tensor.name)
        check = not self.allow_nonfinite and tensor.name not in self._checked
        return [readers.submit(read_input, source, tensor.name, self.pool, check) for source in sources], with_base

    def _prefetched(self, tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, dict]]:
        """Yield (tensor, its loaded inputs) while reader threads, as many as inputs, load the next PREFETCH_DEPTH
        tensors. The threads are one pool, not one per input (a thread per input measured slower cold: 4.2-4.6 s
        against 3.7-3.9 s on the large speed set), but a tensor's copies are queued together, so they are read at
        once: a read that waits for the disk (a page-cache miss) keeps every input file busy instead of one after
        the other."""
        inputs = len(self.models) + (self.base is not None)
        with ThreadPoolExecutor(max_workers=min(inputs, MAX_READERS), thread_name_prefix="nbmerge-read") as readers:
            pending: deque[tuple[TensorPlan, tuple[list[Future], bool]]] = deque()
            try:
                for tensor in tensors:
                    pending.append((tensor, self._submit_reads(readers, tensor)))
                    if len(pending) > PREFETCH_DEPTH:
                        done, reads = pending.popleft()
                        yield done, _loaded(*reads)
                while pending:
                    done, reads = pending.popleft()
                    yield done, _loaded(*reads)
            finally:
                for _, (futures, _) in pending:
                    for future in futures:
                        future.cancel()


def finite(tensor: torch.Tensor) -> bool:
    """No NaN and no ±Inf in ``tensor`` (an integer tensor is finite). One reduction at memory speed, no
    temporary: the minimum and maximum propagate NaN and are ±Inf when any entry is."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_input(source: ModelSource, name: str, pool: BufferPool, check_finite: bool) -> torch.Tensor:
    """``source.read``; with ``check_finite``, a tensor that holds NaN or Inf is refused (checked in the reader
    thread, while the pages are read in anyway)."""
    tensor = source.read(name, pool)
    if check_finite and not finite(tensor):
        raise NonFiniteError(f"{source.where(name)}: tensor {shown(name)} holds NaN or Inf, so the merge would be "
                             f"silently wrong; nothing was written. Fix the input, or pass allow_nonfinite=True "
                             f"(--allow-nonfinite) to merge it anyway")
    return tensor


def _loaded(futures: list[Future], with_base: bool) -> dict:
    """A tensor's inputs once read: {"models": [...], "base": ...} ("base", the last read, only where one is)."""
    values = [future.result() for future in futures]
    if not with_base:
        return {"models": values}
    return {"models": values[:-1], "base": values[-1]}


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to ``count`` for the duration (None: left as it is), then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_threads(device: torch.device):
    """On the CPU, torch's intra-op threads leave one core to the engine's reader and writer threads.

    With every core in torch's pool, its threads spin between the many short kernels of a merge and starve the
    reader and writer: on 2 cores a bf16 task-arithmetic merge took 15x the CPU time with 2 intra-op threads as
    with 1. The caller's setting is restored afterwards.
    """
    if device.type != "cpu":
        return torch_threads(None)
    return torch_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the duration of a merge (restored afterwards, if it was on).

    A merge allocates many short-lived objects (tensor handles, ctypes arguments, futures) but no reference
    cycles worth collecting, while every full collection walks every object of the session (torch, transformers
    and the notebook's own): measured at 8% of a bfloat16 weighted average's CPU time on the large speed set.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _agreed_value(name: str, loaded: dict, models: list[ModelSource], base: ModelSource | None) -> torch.Tensor:
    """Non-floating tensors are never averaged: all inputs must agree, and the base's (or first model's) is kept."""
    labelled = list(zip([m.label for m in models], loaded["models"]))
    if base is not None:
        labelled.insert(0, (base.label, loaded["base"]))
    reference_label, reference = labelled[0]
    differing = [label for label, value in labelled[1:] if not torch.equal(value, reference)]
    if differing:
        raise ModelInputError(f"non-floating tensor {shown(name)} (dtype {reference.dtype}) differs between "
                              f"{reference_label} and {', '.join(differing)}; it cannot be averaged, "
                              f"so the inputs must agree on it")
    return reference


def _not_aliasing(produced: torch.Tensor, loaded: dict) -> torch.Tensor:
    """A copy of ``produced`` if it shares memory with an input (in-memory inputs must never alias the output)."""
    inputs = loaded.get("models", []) + ([loaded["base"]] if loaded.get("base") is not None else [])
    storage = produced.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in inputs):
        return produced.clone()
    return produced
