"""The Python API: ``merge`` and ``methods``. The CLI, the magics and the panels all call these."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import __version__
from .engine import Engine, collector_paused, compute_threads
from .errors import ParameterError
from .memory import peak_rss_bytes, reset_peak_rss
from .method import MergeMethod
from .output import FolderSink, MemorySink, parse_size
from .plan import make_plan
from .progress import Progress, ProgressEvent
from .registry import all_methods, get_method
from .safetensors_io import DTYPES
from .sources import ModelSource, open_model

_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                  "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float64": torch.float64, "fp64": torch.float64}


@dataclass(frozen=True)
class MergeReport:
    """What one merge did: tensors produced, bytes read and written, seconds, peak memory."""

    method: str
    params: dict
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    peak_device_bytes: int | None
    device: str
    stages: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        gib = 1024**3
        device_peak = "" if self.peak_device_bytes is None else f", peak {self.device} {self.peak_device_bytes / gib:.2f} GiB"
        return (f"{self.method}: {self.tensors} tensors, read {self.bytes_read / gib:.2f} GiB, wrote "
                f"{self.bytes_written / gib:.2f} GiB in {self.seconds:.2f} s on {self.device} "
                f"(peak RSS {self.peak_rss_bytes / gib:.2f} GiB{device_peak})")


@dataclass
class MergeResult:
    """The merged model: ``state_dict`` when merged in memory, ``path`` when written; plus the ``report``.

    A module-building method fills ``module`` (the built nn.Module), ``trained`` (the tensors it trained, what
    ``nbmerge.save_trained`` writes) and ``history`` (its training history); ``path`` is then the trained-state
    file when ``out`` was given.
    """

    report: MergeReport
    recipe: dict
    state_dict: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    module: torch.nn.Module | None = None
    trained: dict[str, torch.Tensor] | None = None
    history: Any = None

    def __repr__(self) -> str:
        if self.module is not None:
            where = f"module={type(self.module).__name__}, trained=<{len(self.trained)} tensors>"
            if self.path is not None:
                where += f", path={str(self.path)!r}"
        elif self.path is not None:
            where = f"path={str(self.path)!r}"
        else:
            where = f"state_dict=<{len(self.state_dict)} tensors>"
        return f"MergeResult({where}, report={str(self.report)!r})"


methods = all_methods  # every registered merge method by name (built-ins and installed plugins)


def merge(method: str, models: Sequence[Any] | Mapping[str, Any], base: Any = None, out: str | Path | None = None,
          *, device: str = "auto", out_dtype: str | torch.dtype | None = None, shard_size: int | str = "5GB",
          overwrite: bool = False, progress: bool = True,
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

    Methods that build a module (test-time adaptation on unlabeled inputs) need ``pool``, a task pool whose
    tasks are named like the models ({task: model}); they adapt on the inputs of ``split`` and ``out`` is a
    ``.safetensors`` file for what they trained (reload it with ``nbmerge.load_trained``).
    """
    merge_method = get_method(method)
    if merge_method.build_module is not None:
        from .build import build_merge

        return build_merge(merge_method, models, base, pool, params, split=split, out=out, overwrite=overwrite,
                           progress=progress, on_progress=on_progress, cancel=cancel)
    if pool is not None:
        raise ParameterError(f"{merge_method.name}: merges tensor by tensor and uses no task pool; drop pool=...")
    labelled = _labelled_models(models)
    checked = merge_method.validate(params, len(labelled), base is not None)
    target_device = _device(device)
    dtype = _dtype(out_dtype)
    out_path = None if out is None else Path(out).expanduser()
    sources: list[ModelSource] = []
    try:
        for label, model in labelled:
            sources.append(open_model(model, label))
        base_source = None if base is None else open_model(base, _label(base, "base"))
        if base_source is not None:
            sources.append(base_source)
        model_sources = sources[:len(labelled)]
        plan = make_plan(merge_method, checked, model_sources, base_source, dtype)
        recipe = _recipe(merge_method, checked, labelled, base, dtype)
        return _run(merge_method, checked, plan, model_sources, base_source, target_device, recipe, out_path,
                    parse_size(shard_size), overwrite, progress, on_progress, cancel)
    finally:
        for source in sources:
            source.close()


def _run(method, params, plan, models, base, device, recipe, out_path, shard_size, overwrite, progress,
         on_progress, cancel) -> MergeResult:
    stage_passes = sum(stage.pass_count(params, plan.wide) for stage in method.stages if stage.applies(params))
    total = plan.bytes_for() + stage_passes * plan.bytes_for("merge")
    tracker = Progress(total, progress, on_progress, f"nbmerge {method.name}", cancel)
    config_folder = base.folder if base is not None else models[0].folder
    sink = (MemorySink() if out_path is None
            else FolderSink(out_path, plan, recipe, shard_size, overwrite, config_folder))
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    engine = Engine(method, params, plan, models, base, device, tracker)
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


def _labelled_models(models) -> list[tuple[str, Any]]:
    if isinstance(models, Mapping) and not _is_state_dict(models):
        return [(str(name), model) for name, model in models.items()]
    if isinstance(models, (str, Path)) or _is_state_dict(models) or isinstance(models, torch.nn.Module):
        raise ParameterError("models must be a list (or a {name: model} dict) of models, got a single model")
    return [(_label(model, f"models[{i}]"), model) for i, model in enumerate(models)]


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _label(model, fallback: str) -> str:
    return str(model) if isinstance(model, (str, Path)) else fallback


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


def _recipe(method: MergeMethod, params: dict, labelled, base, out_dtype) -> dict:
    return {
        "nbmerge_version": __version__,
        "method": method.name,
        "plugin": method.plugin,
        "params": {p.name: p.plain(params[p.name]) for p in method.params},
        "models": [label for label, _ in labelled],
        "base": None if base is None else _label(base, "base"),
        "out_dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
    }

