"""Running a merge: the engine passes of one or several parts (a layer stack has one per slice) into one sink,
finished atomically or aborted; and the checks of the options every entry point shares (device, output dtype,
an output apart from every input)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nbmerge.engine.memory import peak_rss_bytes, reset_peak_rss
from nbmerge.engine.progress import Progress
from nbmerge.engine.sinks import FolderSink, MemorySink, copy_model_folder, parse_size
from nbmerge.engine.stream import Engine, collector_paused, compute_threads
from nbmerge.errors import ParameterError
from nbmerge.io.safetensors import DTYPES
from nbmerge.io.sources import ModelSource
from nbmerge.io.untrusted import CONFIG_FILES, TOKENIZER_FILES, check_model_files
from nbmerge.model_card import CardSource, read_config
from nbmerge.results import MergeReport, MergeResult

_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                  "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float64": torch.float64, "fp64": torch.float64}


@dataclass
class MergePart:
    """One engine run writing some of the output's tensors: a method over models (and base), its plan, and how
    its tensor names map to the output's (a layer stack renumbers each slice's layers)."""

    method: Any
    params: dict
    plan: Any
    models: list[ModelSource]
    base: ModelSource | None
    rename: Callable[[str], str] = staticmethod(lambda name: name)

    @property
    def sources(self) -> list[ModelSource]:
        return self.models + ([self.base] if self.base is not None else [])


@dataclass
class Output:
    """Where a merge goes: ``path`` (None: in memory), its recipe, shard size, overwrite, the folder whose config
    files are copied, the folder whose tokenizer files are copied (default: the config folder), and edits to
    config.json (e.g. a layer stack's layer count)."""

    path: Path | None
    recipe: dict
    shard_size: int
    overwrite: bool
    config_folder: Path | None
    tokenizer_folder: Path | None = None
    config_edits: dict | None = None
    chat_template: str | None = None  # the template text the tokenizer gets
    card: CardSource | None = None  # what the folder's README.md model card says beyond the recipe


def run_parts(parts: list[MergePart], output: Output, device, progress, on_progress, cancel,
              allow_nonfinite) -> MergeResult:
    """Run every part's stages and merge into one sink, then finish the output (atomically) or abort it."""
    total = sum(part.plan.bytes_for() + sum(stage.pass_count(part.params, part.plan.wide) for stage in
                                            part.method.stages if stage.applies(part.params)) *
                part.plan.bytes_for("merge") for part in parts)
    name = parts[0].method.name if len(parts) == 1 else "layer stack"
    tracker = Progress(total, progress, on_progress, f"nbmerge {name}", cancel,
                       lambda: leases_released([source for part in parts for source in part.sources]))
    layout = [(part.rename(n), dtype, shape) for part in parts for n, dtype, shape in part.plan.layout]
    sources = [source for part in parts for source in part.sources]

    def check_inputs_unchanged() -> None:
        for source in sources:
            source.check_unchanged()

    stages: list[str] = []
    try:
        if output.path is not None:  # the files copied at the end, checked before anything is written
            check_model_files(output.config_folder, CONFIG_FILES, "config files")
            check_model_files(output.tokenizer_folder or output.config_folder, TOKENIZER_FILES, "tokenizer files")
        sink = MemorySink() if output.path is None else _folder_sink(output, output.path, layout, output.overwrite)
    except BaseException:
        tracker.close()
        raise
    try:
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for part in parts:
            engine = Engine(part.method, part.params, part.plan, part.models, part.base, device, tracker,
                            allow_nonfinite)
            with compute_threads(device), collector_paused():
                engine.run_stages()
                engine.merge_into(lambda tensor_name, tensor, rename=part.rename: sink.put(rename(tensor_name),
                                                                                          tensor))
            stages += [stage for stage in engine.stage_results if stage not in stages]
        check_inputs_unchanged()
        sink.finish(before_install=check_inputs_unchanged)  # again after the config files were copied
    except BaseException:
        sink.abort()
        raise
    finally:
        tracker.close()
    seconds = time.perf_counter() - started
    report = MergeReport(
        method=name, params=output.recipe.get("params", {}), tensors=len(layout), bytes_read=tracker.done,
        bytes_written=sum(part.plan.out_bytes for part in parts), seconds=seconds, peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device), stages=stages, input_bytes=sum(part.plan.bytes_for() for part in parts))
    if output.path is None:
        return MergeResult(report, output.recipe, state_dict=sink.state_dict,
                           writer=lambda path, **options: write_state_dict(sink.state_dict, output, path, **options))
    return MergeResult(report, output.recipe, path=output.path,
                       writer=lambda path, **options: copy_output(output, path, **options))


def _folder_sink(output: Output, path: Path, layout: list, overwrite: bool, shard_size: int | None = None,
                 evaluation: Any = None) -> FolderSink:
    return FolderSink(path, layout, output.recipe, shard_size or output.shard_size, overwrite, output.config_folder,
                      output.tokenizer_folder, output.config_edits, output.chat_template, output.card, evaluation)


def write_state_dict(state_dict: dict[str, torch.Tensor], output: Output, path: Path, overwrite: bool = False,
                     evaluation: Any = None, shard_size: int | str | None = None) -> Path:
    """Write an in-memory merge to ``path`` as its merge would have (``MergeResult.save``): the same folder with
    config, tokenizer and model card (``evaluation`` in the card when given), atomically."""
    layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state_dict.items()]
    sink = _folder_sink(output, path, layout, overwrite, None if shard_size is None else parse_size(shard_size),
                        evaluation)
    try:
        for name, tensor in state_dict.items():
            sink.put(name, tensor)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return path


def copy_output(output: Output, path: Path, overwrite: bool = False, evaluation: Any = None,
                shard_size: int | str | None = None) -> Path:
    """A written merge saved again (``MergeResult.save``): ``output``'s folder copied to ``path`` (atomically), its
    model card rewritten with ``evaluation`` when given; ``path`` its own folder: only the card is rewritten."""
    if shard_size is not None:
        raise ParameterError("save: a merge written to a folder keeps its shards; shard_size applies to in-memory "
                             "results only")
    return copy_model_folder(output.path, path, overwrite,
                             output.card.files(output.recipe, read_config(output.path), path.name, evaluation)
                             if output.card is not None and output.path.is_dir() else {})


@contextmanager
def leases_released(sources: list[ModelSource]):
    """Run user code (an on_progress callback, which may write an input itself: in this thread, a write would wait
    for the read lease to time out) with the inputs' leases released; then take them again and check every input
    unchanged before any mapped page is touched again."""
    for source in sources:
        source.release_leases()
    yield
    for source in sources:
        source.take_leases()
        source.check_unchanged()


def check_chat_template_output(chat_template, out_path: Path | None) -> None:
    if chat_template is not None and (out_path is None or out_path.suffix == ".safetensors"):
        raise ParameterError("chat_template: goes into the output folder's tokenizer files; give out=FOLDER (an "
                             "in-memory merge or a single .safetensors file has none)")


def check_output_apart(out_path: Path, sources: list[ModelSource]) -> None:
    """The output is neither an input file, nor inside an input's folder, nor a folder holding an input (writing or
    overwriting it would destroy or mix with what is being read)."""
    out = out_path.resolve()
    for source in sources:
        for path in source.paths():
            path = path.resolve()
            if out == path or out.is_relative_to(path) or path.is_relative_to(out):
                raise ParameterError(f"out: {out_path} overlaps the input {source.label} ({path}); write the merge "
                                     f"to a path apart from every input")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N', checked."""
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


def resolve_compute_dtype(compute_dtype, method, params: dict) -> torch.dtype | str | None:
    """A merge's compute dtype: None (nbmerge's float32 arithmetic), "inputs" (each tensor's inputs' promoted dtype)
    or a floating dtype, checked against the method: one given selects the method's mergekit kernel, so the method
    needs one and parameters mergekit has."""
    if compute_dtype is None:
        return None
    chosen = "inputs" if compute_dtype == "inputs" else resolve_dtype(compute_dtype, "compute_dtype")
    if method.mergekit_tensor is None:
        raise ParameterError(f"compute_dtype: {method.name} computes in float32 only (compute_dtype selects "
                             f"mergekit's arithmetic, which nbmerge reproduces for linear/weighted_average, "
                             f"task_arithmetic, ties, breadcrumbs, slerp and passthrough); drop compute_dtype")
    reason = method.mergekit_refuses(params) if method.mergekit_refuses is not None else None
    if reason:
        raise ParameterError(f"compute_dtype: {method.name} with {reason} has no mergekit counterpart; drop "
                             f"compute_dtype to compute in float32")
    return chosen


def resolve_dtype(out_dtype, what: str = "out_dtype") -> torch.dtype | None:
    """The output dtype from a torch dtype or a name (float32/fp32, float16/fp16/half, bfloat16/bf16, ...)."""
    if out_dtype is None or isinstance(out_dtype, torch.dtype):
        return out_dtype
    name = str(out_dtype).lower().removeprefix("torch.")
    if name in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name]
    if name.upper() in DTYPES and DTYPES[name.upper()].is_floating_point:
        return DTYPES[name.upper()]
    raise ParameterError(f"{what}: expected one of {', '.join(_DTYPE_ALIASES)}, got {out_dtype!r}")
