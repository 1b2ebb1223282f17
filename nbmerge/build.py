"""Methods that build a module (``MergeMethod.build_module``) rather than merge tensor by tensor: from whole
models and a task pool's unlabeled inputs to a trained module; saving what was trained with its recipe; and
rebuilding the module from that file without training again.

``export_module`` writes the whole built module instead (every tensor), reloadable from the base alone with
``load_exported``. The trained-state file is safetensors: the ``BuiltModule.trained`` tensors, and under the metadata key
``nbmerge_recipe`` the recipe as JSON (method, checked parameters, model names, the split adapted on, and a
fingerprint of the base and of every model) so that ``load_trained`` rebuilds on the same models and refuses
others with an error naming the model that differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import __version__
from .errors import ModelInputError, OutputExistsError, ParameterError
from .memory import peak_rss_bytes, reset_peak_rss
from .method import MergeMethod, ModuleJob, UnlabeledTask

RECIPE_KEY = "nbmerge_recipe"
_SAMPLES_PER_TENSOR = 4096


def build_merge(method: MergeMethod, models: Sequence[Any] | Mapping[str, Any], base: Any, pool: Any,
                params: dict[str, Any], *, split: str = "test", out: str | Path | None = None,
                overwrite: bool = False, progress: bool = True, trained_state: dict | None = None,
                expected_fingerprints: dict | None = None, source: str = "", on_progress=None,
                cancel: threading.Event | None = None):
    """Run ``method.build_module`` on modules from ``pool`` and return a MergeResult with ``.module``.

    models: {task name: model} (or a list of paths whose folder names are task names); every model's task in
    ``pool`` gives the unlabeled inputs of ``split``. out: a ``.safetensors`` file for the trained state.
    on_progress gets a ProgressEvent("adapt", steps done, steps planned) after each training step; a set
    ``cancel`` event stops the build before its next step (MergeCancelled; nothing is written).
    """
    from .api import MergeReport, MergeResult
    from .progress import ProgressEvent, check_cancel

    def step_done(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(ProgressEvent("adapt", done, total))
        check_cancel(cancel, f"after training step {done} of {total}")

    if pool is None:
        raise ParameterError(
            f"{method.name}: builds a model adapted on each task's unlabeled inputs, so it needs a task pool: "
            f"nbmerge.merge({method.name!r}, {{task: model, ...}}, base=pretrained, pool=nbmerge.task_pool(NAME))")
    if base is None:
        raise ParameterError(f"{method.name}: needs a base (pretrained) model: pass base=...")
    named = _named_models(method, models, pool)
    checked = method.validate(params, len(named), True)
    out_path = _checked_out(out, overwrite)
    reset_peak_rss()
    started = time.perf_counter()
    base_module = pool.load_encoder(base)
    modules = {name: pool.load_encoder(model) for name, model in named.items()}
    fingerprints = {"base": fingerprint(base_module), "models": {n: fingerprint(m) for n, m in modules.items()}}
    if expected_fingerprints is not None:
        _check_same_models(source, expected_fingerprints, fingerprints)
    tasks = {name: _unlabeled(pool.task(name), split) for name in named}
    check_cancel(cancel, "before training")
    built = method.build_module(ModuleJob(base_module, modules, checked, tasks, trained_state, progress, step_done))
    seconds = time.perf_counter() - started
    recipe = {
        "nbmerge_version": __version__, "method": method.name, "plugin": method.plugin,
        "params": {p.name: p.plain(checked[p.name]) for p in method.params},
        "models": list(named), "base": _label(base), "pool": getattr(pool, "name", ""), "split": split,
        "fingerprints": fingerprints, "build": built.record,
    }
    state = built.module.state_dict()
    report = MergeReport(method=method.name, params=recipe["params"], tensors=len(state), bytes_read=0,
                         bytes_written=0, seconds=seconds, peak_rss_bytes=peak_rss_bytes(), peak_device_bytes=None,
                         device=str(next(iter(state.values())).device), stages=["build_module"])
    result = MergeResult(report, recipe, module=built.module, history=built.history, trained=built.trained)
    if out_path is not None:
        save_trained(result, out_path, overwrite=overwrite)
        result.path = out_path
    return result


def save_trained(result, path: str | Path, overwrite: bool = False) -> Path:
    """Write a built result's trained tensors and recipe to a ``.safetensors`` file (atomically)."""
    from safetensors.torch import save_file

    if result.trained is None:
        raise ParameterError("save_trained: this result was not built by a module-building method "
                             "(it has no trained state); a merged state dict is written with merge(..., out=...)")
    path = _checked_out(path, overwrite)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in result.trained.items()}
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(partial), metadata={RECIPE_KEY: json.dumps(result.recipe)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def export_module(result, path: str | Path, overwrite: bool = False) -> Path:
    """Write a built module's whole state (every parameter and buffer) and recipe to a ``.safetensors`` file.

    Self-contained: ``load_exported(path, base, pool)`` rebuilds the module from it and the base model's
    architecture alone, without the fine-tuned models.
    """
    if result.module is None:
        raise ParameterError("export_module: this result holds no built module (merge(..., out=...) writes a "
                             "merged state dict)")
    state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in result.module.state_dict().items()}
    exported = copy.copy(result)
    exported.trained, exported.recipe = state, dict(result.recipe, exported=True)
    return save_trained(exported, path, overwrite=overwrite)


def load_exported(path: str | Path, base: Any, pool: Any):
    """Rebuild the module written by ``export_module``: the base gives the architecture, the file every tensor."""
    from .registry import get_method

    tensors, recipe = read_trained(path)
    if not recipe.get("exported"):
        raise ModelInputError(f"{path}: holds only the trained tensors; rebuild it with load_trained(path, models, "
                              f"base, pool)")
    method = get_method(recipe["method"])
    base_module = pool.load_encoder(base)
    if fingerprint(base_module) != recipe["fingerprints"]["base"]:
        raise ModelInputError(f"{path}: was built on a different base model than the one given")
    # the base stands in for every model: the file's tensors replace whatever the build derives from them
    stand_ins = {name: base_module for name in recipe["models"]}
    tasks = {name: _unlabeled(pool.task(name), recipe.get("split", "test")) for name in recipe["models"]}
    checked = method.validate(recipe["params"], len(stand_ins), True)
    built = method.build_module(ModuleJob(base_module, stand_ins, checked, tasks, tensors, progress=False))
    from .api import MergeReport, MergeResult

    report = MergeReport(method=method.name, params=recipe["params"], tensors=len(tensors), bytes_read=0,
                         bytes_written=0, seconds=0.0, peak_rss_bytes=peak_rss_bytes(), peak_device_bytes=None,
                         device="cpu", stages=["load_exported"])
    return MergeResult(report, recipe, module=built.module, trained=built.trained, path=Path(path))


def read_trained(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and the recipe of a file written by ``save_trained``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ModelInputError(f"{path}: cannot read a trained-state file: {exc}") from None
    if RECIPE_KEY not in metadata:
        raise ModelInputError(f"{path}: not an nbmerge trained-state file (no {RECIPE_KEY!r} in its metadata)")
    return tensors, json.loads(metadata[RECIPE_KEY])


def load_trained(path: str | Path, models: Sequence[Any] | Mapping[str, Any], base: Any, pool: Any,
                 progress: bool = True):
    """Rebuild a module from ``save_trained``'s file on the same base and models, without training.

    The method and its parameters come from the file's recipe; the models must be the ones it was trained on
    (same names, same fingerprints), else a ModelInputError names the model that differs.
    """
    from .registry import get_method

    tensors, recipe = read_trained(path)
    method = get_method(recipe["method"])
    if method.build_module is None:
        raise ModelInputError(f"{path}: method {recipe['method']!r} does not build modules")
    named = _named_models(method, models, pool)
    if list(named) != recipe["models"]:
        raise ModelInputError(f"{path}: trained on models {recipe['models']}, given {list(named)} "
                              f"(same names, same order)")
    return build_merge(method, named, base, pool, recipe["params"], split=recipe.get("split", "test"),
                       progress=progress, trained_state=tensors, expected_fingerprints=recipe["fingerprints"],
                       source=str(path))


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's tensors: every name, dtype and shape, and up to 4096 evenly spaced values of each.

    Cheap on any model size, and different for any two models that differ in more than a handful of entries.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _SAMPLES_PER_TENSOR:
            flat = flat[torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR).long()]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_same_models(source: str, expected: dict, found: dict) -> None:
    if expected["base"] != found["base"]:
        raise ModelInputError(f"{source}: was trained on a different base model than the one given")
    for name, value in found["models"].items():
        if expected["models"].get(name) != value:
            raise ModelInputError(f"{source}: was trained on a different model {name!r} than the one given")


def _named_models(method: MergeMethod, models, pool) -> dict[str, Any]:
    task_names = [task.name for task in pool.tasks] if pool is not None else []
    if isinstance(models, Mapping) and not all(isinstance(v, torch.Tensor) for v in models.values()):
        named = {str(name): model for name, model in models.items()}
    elif isinstance(models, (list, tuple)) and all(isinstance(m, (str, Path)) for m in models):
        named = {Path(m).name: m for m in models}
    else:
        raise ParameterError(f"{method.name}: name each model by its task: models={{task name: model}} "
                             f"(the pool's tasks: {', '.join(task_names)})")
    unknown = [name for name in named if name not in task_names]
    if unknown:
        raise ParameterError(f"{method.name}: model(s) {', '.join(map(repr, unknown))} match no task of pool "
                             f"{getattr(pool, 'name', '')!r} (its tasks: {', '.join(task_names)})")
    return named


def _unlabeled(task, split: str) -> UnlabeledTask:
    return UnlabeledTask(task.name, task.inputs(split), task.logits)


def _checked_out(out, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise ParameterError(f"out={str(out)!r}: a built module's trained state is one .safetensors file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path


def _label(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else type(model).__name__
