"""The Python API: ``merge`` and ``methods``. The CLI, the magics and the panels all call these."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
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
          pool: Any = None, split: str = "test", tokenizer_source: Any = None, **params: Any) -> MergeResult:
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
      tokenizer_source: the model (a label, the object or path given) whose tokenizer files the output folder
      gets instead of the base's (or first model's); every model's vocabulary must equal it ("union": the
      vocabularies must already be one), since nbmerge does not permute embedding rows.
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
        part = MergePart(merge_method, checked, plan, model_sources, base_source)
        output = Output(out_path, recipe, parse_size(shard_size), overwrite,
                        base_source.folder if base_source is not None else model_sources[0].folder,
                        tokenizer_folder(tokenizer_source, sources, labelled, base))
        return run_parts([part], output, target_device, progress, on_progress, cancel, allow_nonfinite)
    finally:
        for source in sources:
            source.close()


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


def run_parts(parts: list[MergePart], output: Output, device, progress, on_progress, cancel,
              allow_nonfinite) -> MergeResult:
    """Run every part's stages and merge into one sink, then finish the output (atomically) or abort it."""
    total = sum(part.plan.bytes_for() + sum(stage.pass_count(part.params, part.plan.wide) for stage in
                                            part.method.stages if stage.applies(part.params)) *
                part.plan.bytes_for("merge") for part in parts)
    name = parts[0].method.name if len(parts) == 1 else "layer stack"
    tracker = Progress(total, progress, on_progress, f"nbmerge {name}", cancel)
    layout = [(part.rename(n), dtype, shape) for part in parts for n, dtype, shape in part.plan.layout]
    sink = (MemorySink() if output.path is None
            else FolderSink(output.path, layout, output.recipe, output.shard_size, output.overwrite,
                            output.config_folder, output.tokenizer_folder, output.config_edits))
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    stages: list[str] = []
    try:
        for part in parts:
            engine = Engine(part.method, part.params, part.plan, part.models, part.base, device, tracker,
                            allow_nonfinite)
            with compute_threads(device), collector_paused():
                engine.run_stages()
                engine.merge_into(lambda tensor_name, tensor, rename=part.rename: sink.put(rename(tensor_name),
                                                                                          tensor))
            stages += [stage for stage in engine.stage_results if stage not in stages]
        for part in parts:
            for source in part.sources:
                source.check_unchanged()
        sink.finish()
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
        device=str(device), stages=stages)
    if output.path is None:
        return MergeResult(report, output.recipe, state_dict=sink.state_dict)
    return MergeResult(report, output.recipe, path=output.path)


def tokenizer_folder(tokenizer_source, sources: list[ModelSource], labelled: list, base) -> Path | None:
    """The folder whose tokenizer files the output gets: that of the model ``tokenizer_source`` names (a label,
    the model object or path given, or another model's folder), or "union" (the base's, else the first model's).
    Every merged model's vocabulary must equal it: nbmerge copies one tokenizer and does not permute embeddings."""
    if tokenizer_source is None:
        return None
    candidates = list(zip([label for label, _ in labelled], sources[:len(labelled)], [m for _, m in labelled]))
    if base is not None:
        candidates.append((sources[-1].label, sources[-1], base))
    if tokenizer_source == "union":
        chosen = sources[-1] if base is not None else sources[0]
        folder, label = chosen.folder, chosen.label
    else:
        chosen = next((source for label, source, model in candidates
                       if tokenizer_source is model or tokenizer_source == label
                       or (isinstance(tokenizer_source, (str, Path)) and isinstance(model, (str, Path))
                           and Path(tokenizer_source).expanduser() == Path(model).expanduser())), None)
        if chosen is not None:
            folder, label = chosen.folder, chosen.label
        elif isinstance(tokenizer_source, (str, Path)) and Path(tokenizer_source).expanduser().is_dir():
            folder, label = Path(tokenizer_source).expanduser(), str(tokenizer_source)
        else:
            raise ParameterError(f"tokenizer_source: {tokenizer_source!r} is neither one of the merged models nor "
                                 f"a model folder")
    wanted = read_vocabulary(folder, label)
    for _, source, _ in candidates:
        have = read_vocabulary(source.folder, source.label)
        if have is None or wanted is None or have == wanted:
            continue
        token = min(t for t in set(have) | set(wanted) if have.get(t) != wanted.get(t))
        what = "a union of the vocabularies" if tokenizer_source == "union" else f"the tokenizer of {label}"
        raise ParameterError(f"tokenizer_source: {source.label}'s vocabulary differs from {label}'s (token "
                             f"{token!r}); {what} would need embedding rows permuted, which nbmerge does not do: "
                             f"merge models that share one tokenizer")
    return folder


def read_vocabulary(folder: Path | None, label: str) -> dict | None:
    """token -> id of a model's tokenizer (tokenizer.json's model.vocab and added tokens, or vocab.json); None
    where the folder has neither."""
    import json

    if folder is None:
        return None
    tokenizer, vocab = folder / "tokenizer.json", folder / "vocab.json"
    try:
        if tokenizer.is_file():
            data = json.loads(tokenizer.read_text())
            table = data.get("model", {}).get("vocab")
            table = dict(table) if isinstance(table, dict) else {
                entry[0]: i for i, entry in enumerate(table or []) if isinstance(entry, list) and entry}
            table.update({added["content"]: added["id"] for added in data.get("added_tokens", [])
                          if isinstance(added, dict) and "content" in added and "id" in added})
            return table
        if vocab.is_file():
            return dict(json.loads(vocab.read_text()))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ParameterError(f"tokenizer_source: cannot read the vocabulary of {label} ({exc})") from None
    return None


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
