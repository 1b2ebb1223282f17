"""What a merge returns (``MergeResult`` with its ``MergeReport``), the recipe header every merge records, and
the one answer to "which models were given, under which names".

Both ways of merging build their results here: ``api`` (tensor by tensor) and ``module_merge`` (methods that
build a module). This module imports no engine, so that the workbench and the notebook can check
``isinstance(value, MergeResult)`` cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.errors import ParameterError
from nbmerge.version import __version__


@dataclass(frozen=True)
class MergeReport:
    """What one merge did: tensors produced, bytes read and written, seconds, peak memory.

    ``bytes_read`` counts every pass over the inputs (TIES with a model-wide threshold reads them more than
    once); ``input_bytes`` is the inputs' size, read once (0 where unknown), so ``passes`` = bytes_read /
    input_bytes."""

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
    input_bytes: int = 0

    @property
    def passes(self) -> float | None:
        """How many times the inputs were read (None where their size is unknown)."""
        return self.bytes_read / self.input_bytes if self.input_bytes else None

    def __str__(self) -> str:
        gib = 1024**3
        device_peak = "" if self.peak_device_bytes is None else f", peak {self.device} {self.peak_device_bytes / gib:.2f} GiB"
        passes = self.passes
        reads = (f" ({self.input_bytes / gib:.2f} GiB of inputs, {passes:.3g} passes)"
                 if passes is not None and round(passes, 2) != 1 else "")
        return (f"{self.method}: {self.tensors} tensors, read {self.bytes_read / gib:.2f} GiB{reads}, wrote "
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
    # how this result writes itself to a path (set by the merge that made it): ``save`` calls it
    writer: Callable[..., Path] | None = field(default=None, repr=False, compare=False)

    def save(self, path: str | Path, *, overwrite: bool = False, evaluation: Any = None,
             shard_size: int | str | None = None) -> Path:
        """Write this result to ``path`` and return it: an in-memory merge as the folder ``out=`` would have
        written (shards, config and tokenizer files, nbmerge_recipe.json, a README.md model card); a written one
        copied there (``path`` its own folder: only its card is rewritten); a module-building merge's trained
        tensors to a ``.safetensors`` file (``nbmerge.load_trained``). ``evaluation``: one or a list of evaluation
        reports (``nbmerge.evaluate``) put into the model card. Atomic: a failure leaves nothing at ``path``."""
        if self.writer is None:
            raise ParameterError("this result has no model to save (it was built without its merge)")
        written = self.writer(Path(path).expanduser(), overwrite=overwrite, evaluation=evaluation,
                              shard_size=shard_size)
        if self.path is None:
            self.path = written
        return written

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

    @property
    def merged(self) -> Any:
        """What to merge or load again: the module, else the state dict, else the written path."""
        if self.module is not None:
            return self.module
        return self.state_dict if self.state_dict is not None else self.path


def recipe_header(method, params: dict, models: Sequence[str], base: str | None, **extra: Any) -> dict:
    """The recipe every merge records (``nbmerge_recipe.json``, a trained-state file's metadata, ``.recipe``):
    version, method, plugin, the checked parameters in plain JSON form, model names and base, then ``extra``."""
    return {
        "nbmerge_version": __version__,
        "method": method.name,
        "plugin": method.plugin,
        "params": {p.name: p.plain(params[p.name]) for p in method.params},
        "models": list(models),
        "base": base,
        **extra,
    }


def module_report(method: str, recipe: dict, tensors: int, seconds: float, peak_rss: int, device: str,
                  stage: str) -> MergeReport:
    """The report of a module-building merge (no tensor files read or written)."""
    return MergeReport(method=method, params=recipe["params"], tensors=tensors, bytes_read=0, bytes_written=0,
                       seconds=seconds, peak_rss_bytes=peak_rss, peak_device_bytes=None, device=device,
                       stages=[stage])


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping whose every value is a tensor."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def model_label(model: Any, fallback: str) -> str:
    """How a model is named in errors and recipes: its path (``model+adapter`` with a LoRA adapter whose model is a
    path), else ``fallback``."""
    reference = getattr(model, "reference", None)  # nbmerge.io.lora.WithLora
    if isinstance(reference, str):
        return reference
    return str(model) if isinstance(model, (str, Path)) else fallback


def labelled_models(models: Sequence[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, model) pairs of a list (named by path, else ``models[i]``) or of a {name: model} dict.

    A single model (a path, a state dict, an nn.Module) is an error: the caller meant a list of them.
    """
    if isinstance(models, Mapping) and not is_state_dict(models):
        return [(str(name), model) for name, model in models.items()]
    if isinstance(models, (str, Path, torch.nn.Module)) or is_state_dict(models):
        raise ParameterError("models must be a list (or a {name: model} dict) of models, got a single model")
    return [(model_label(model, f"models[{i}]"), model) for i, model in enumerate(models)]


def model_count(models: Any) -> int:
    """How many models ``models`` holds (a single model counts 1)."""
    if isinstance(models, (str, Path, torch.nn.Module)) or is_state_dict(models):
        return 1
    return len(models)
