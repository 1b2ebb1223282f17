"""The Python API: ``merge`` and ``methods``. The CLI, the magics and the panels all call these."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.engine.memory import peak_rss_bytes, reset_peak_rss
from nbmerge.engine.plan import make_plan
from nbmerge.engine.progress import Progress, ProgressEvent
from nbmerge.engine.sinks import FolderSink, MemorySink, parse_size
from nbmerge.engine.stream import Engine, collector_paused, compute_threads
from nbmerge.errors import ParameterError
from nbmerge.io.safetensors import DTYPES
from nbmerge.io.sources import ModelSource, open_model
from nbmerge.plugins import all_methods, get_method
from nbmerge.results import MergeReport, MergeResult, labelled_models, model_label, recipe_header

_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                  "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float64": torch.float64, "fp64": torch.float64}


methods = all_methods  # every registered merge method by name (built-ins and installed plugins)


def merge(method: str, models: Sequence[Any] | Mapping[str, Any], base: Any = None, out: str | Path | None = None,
          *, device: str = "auto", out_dtype: str | torch.dtype | None = None, shard_size: int | str = "5GB",
          overwrite: bool = False, progress: bool = True, allow_nonfinite: bool = False,
          on_progress: Callable[[ProgressEvent], None] | None = None, cancel: threading.Event | None = None,
          pool: Any = None, split: str = "test", **params: Any) -> MergeResult:
    """Merge ``models`` with ``method`` and return a MergeResult.

    models: paths (safetensors file, Hugging Face folder, weights-only pickle), state dicts or nn.Modules, as a
      list or as a {name: model} dict (names appear in errors and the recipe). base: the pretrained model, for
      methods that use one. out: a folder (sharded safetensors + index, config and tokenizer files copied from
      the base or first model, a recipe file) or a ``.safetensors`` file; None merges in memory and returns the
      state dict. device: "cpu", "cuda", "cuda:N" or "auto". Arithmetic is float32 (float64 stays float64);
      tensors are stored in the reference model's dtype unless ``out_dtype`` is given. Every check that headers
      allow (method, parameters, keys, shapes, dtypes, output path) runs before any tensor data is read.
      cancel: a ``threading.Event`` another thread may set (a panel's Stop button): the merge then stops after
      the tensor in hand (a module-building method: before its next training step), raises MergeCancelled and
      leaves no output behind.
      allow_nonfinite: merge inputs that hold NaN or Inf, and keep a result that does. By default such a tensor
      stops the merge with a NonFiniteError naming it (and its file), before anything is written.

    Methods that build a module (test-time adaptation on unlabeled inputs) need ``pool``, a task pool whose
    tasks are named like the models ({task: model}); they adapt on the inputs of ``split`` and ``out`` is a
    ``.safetensors`` file for what they trained (reload it with ``nbmerge.load_trained``).
    """
    merge_method = get_method(method)
    if merge_method.build_module is not None:
        from nbmerge.module_merge import build_merge

        return build_merge(merge_method, models, base, pool, params, split=split, out=out, overwrite=overwrite,
                           progress=progress, on_progress=on_progress, cancel=cancel)
    if pool is not None:
        raise ParameterError(f"{merge_method.name}: merges tensor by tensor and uses no task pool; drop pool=...")
    labelled = labelled_models(models)
    checked = merge_method.validate(params, len(labelled), base is not None)
    target_device = _device(device)
    dtype = _dtype(out_dtype)
    out_path = None if out is None else Path(out).expanduser()
    sources: list[ModelSource] = []
    try:
        for label, model in labelled:
            sources.append(open_model(model, label))
        base_source = None if base is None else open_model(base, model_label(base, "base"))
        if base_source is not None:
            sources.append(base_source)
        model_sources = sources[:len(labelled)]
        if out_path is not None:
            _check_output_apart(out_path, sources)
        plan = make_plan(merge_method, checked, model_sources, base_source, dtype)
        recipe = recipe_header(merge_method, checked, [label for label, _ in labelled],
                               None if base is None else model_label(base, "base"),
                               out_dtype=None if dtype is None else str(dtype).removeprefix("torch."))
        return _run(merge_method, checked, plan, model_sources, base_source, target_device, recipe, out_path,
                    parse_size(shard_size), overwrite, progress, on_progress, cancel, allow_nonfinite)
    finally:
        for source in sources:
            source.close()


def _run(method, params, plan, models, base, device, recipe, out_path, shard_size, overwrite, progress,
         on_progress, cancel, allow_nonfinite) -> MergeResult:
    stage_passes = sum(stage.pass_count(params, plan.wide) for stage in method.stages if stage.applies(params))
    total = plan.bytes_for() + stage_passes * plan.bytes_for("merge")
    tracker = Progress(total, progress, on_progress, f"nbmerge {method.name}", cancel)
    config_folder = base.folder if base is not None else models[0].folder
    sink = (MemorySink() if out_path is None
            else FolderSink(out_path, plan.layout, recipe, shard_size, overwrite, config_folder))
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    engine = Engine(method, params, plan, models, base, device, tracker, allow_nonfinite)
    try:
        with compute_threads(device), collector_paused():
            engine.run_stages()
            engine.merge_into(sink.put)
        for source in models + ([base] if base is not None else []):
            source.check_unchanged()
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        tracker.close()
    seconds = time.perf_counter() - started
    report = MergeReport(
        method=method.name, params=recipe["params"], tensors=len(plan.tensors), bytes_read=tracker.done,
        bytes_written=plan.out_bytes, seconds=seconds, peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device), stages=list(engine.stage_results))
    if out_path is None:
        return MergeResult(report, recipe, state_dict=sink.state_dict)
    return MergeResult(report, recipe, path=out_path)


def _check_output_apart(out_path: Path, sources: list[ModelSource]) -> None:
    """The output is neither an input file, nor inside an input's folder, nor a folder holding an input (writing or
    overwriting it would destroy or mix with what is being read)."""
    out = out_path.resolve()
    for source in sources:
        for path in source.paths():
            path = path.resolve()
            if out == path or out.is_relative_to(path) or path.is_relative_to(out):
                raise ParameterError(f"out: {out_path} overlaps the input {source.label} ({path}); write the merge "
                                     f"to a path apart from every input")


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'")
    if chosen.type not in ("cpu", "cuda"):
        raise ParameterError(f"device: nbmerge runs on 'cpu' or 'cuda', got {device!r}")
    return chosen


def _dtype(out_dtype) -> torch.dtype | None:
    if out_dtype is None or isinstance(out_dtype, torch.dtype):
        return out_dtype
    name = str(out_dtype).lower().removeprefix("torch.")
    if name in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name]
    if name.upper() in DTYPES and DTYPES[name.upper()].is_floating_point:
        return DTYPES[name.upper()]
    raise ParameterError(f"out_dtype: expected one of {', '.join(_DTYPE_ALIASES)}, got {out_dtype!r}")
