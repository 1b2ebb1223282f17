"""Methods that build a module (``MergeMethod.build_module``) rather than merge tensor by tensor: from whole
models and a task pool's unlabeled inputs to a trained module; saving what was trained with its recipe; and
rebuilding the module from that file without training again.

``save_trained`` writes the ``BuiltModule.trained`` tensors and the recipe (``nbmerge.io.trained_state``), and
``load_trained`` rebuilds the module on the same models (checked by fingerprint). ``export_module`` writes the
whole built module instead (every tensor), reloadable from the base alone with ``load_exported``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from nbmerge.engine.memory import peak_rss_bytes, reset_peak_rss
from nbmerge.engine.progress import ProgressEvent, check_cancel
from nbmerge.errors import ModelInputError, NonFiniteError, ParameterError, shown
from nbmerge.io.trained_state import checked_out_path, fingerprint, read_trained, write_trained
from nbmerge.method.declaration import MergeMethod, ModuleJob, UnlabeledTask
from nbmerge.plugins import get_method
from nbmerge.results import MergeResult, is_state_dict, model_label, module_report, recipe_header


def build_merge(method: MergeMethod, models: Sequence[Any] | Mapping[str, Any], base: Any, pool: Any,
                params: dict[str, Any], *, split: str = "test", out: str | Path | None = None,
                overwrite: bool = False, progress: bool = True, trained_state: dict | None = None,
                expected_fingerprints: dict | None = None, source: str = "", on_progress=None,
                cancel: threading.Event | None = None, allow_nonfinite: bool = False):
    """Run ``method.build_module`` on modules from ``pool`` and return a MergeResult with ``.module``.

    models: {task name: model} (or a list of paths whose folder names are task names); every model's task in
    ``pool`` gives the unlabeled inputs of ``split``. out: a ``.safetensors`` file for the trained state.
    on_progress gets a ProgressEvent("adapt", steps done, steps planned) after each training step; a set
    ``cancel`` event stops the build before its next step (MergeCancelled; nothing is written). A model holding
    NaN or Inf, or a build whose trained tensors end up so, raises NonFiniteError naming the model (or method) and
    tensor before anything is written, unless ``allow_nonfinite``.
    """
    def step_done(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(ProgressEvent("adapt", done, total))
        check_cancel(cancel, f"after training step {done} of {total}")

    if pool is None:
        raise ParameterError(
            f"{method.name}: builds a model from each task's inputs (unlabeled), so it needs a task pool: "
            f"nbmerge.merge({method.name!r}, {{task: model, ...}}, base=pretrained, pool=nbmerge.task_pool(NAME))")
    if base is None:
        raise ParameterError(f"{method.name}: needs a base (pretrained) model: pass base=...")
    named = _named_models(method, models, pool)
    checked = method.validate(params, len(named), True)
    out_path = checked_out_path(out, overwrite)
    reset_peak_rss()
    started = time.perf_counter()
    base_module = pool.load_encoder(base)
    modules = {name: pool.load_encoder(model) for name, model in named.items()}
    if not allow_nonfinite:
        for label, module in [("base", base_module), *modules.items()]:
            _check_finite(module.state_dict(), f"{method.name}: model {shown(label)}", "fix the input")
    fingerprints = {"base": fingerprint(base_module), "models": {n: fingerprint(m) for n, m in modules.items()}}
    if expected_fingerprints is not None:
        _check_same_models(source, expected_fingerprints, fingerprints)
    tasks = {name: _unlabeled(pool.task(name), split) for name in named}
    check_cancel(cancel, "before training")
    built = method.build_module(ModuleJob(base_module, modules, checked, tasks, trained_state, progress, step_done,
                                          _validation_score(pool, list(named))))
    if not allow_nonfinite:
        _check_finite(built.trained or {}, f"{method.name}: the trained", "lower the learning rate or the steps")
    seconds = time.perf_counter() - started
    recipe = recipe_header(method, checked, list(named), model_label(base, type(base).__name__),
                           pool=getattr(pool, "name", ""), split=split, fingerprints=fingerprints,
                           build=built.record)
    state = built.module.state_dict()
    report = module_report(method.name, recipe, len(state), seconds, peak_rss_bytes(),
                           str(next(iter(state.values())).device), "build_module")
    result = MergeResult(report, recipe, module=built.module, history=built.history, trained=built.trained)
    result.writer = lambda path, overwrite=False, evaluation=None, shard_size=None: _save_built(result, path, overwrite,
                                                                                              shard_size)
    if out_path is not None:
        save_trained(result, out_path, overwrite=overwrite)
        result.path = out_path
    return result


def _save_built(result, path: Path, overwrite: bool, shard_size) -> Path:
    """``MergeResult.save`` of a built module: its trained tensors (an evaluation is not kept in the file)."""
    if shard_size is not None:
        raise ParameterError("save: a built module's trained tensors are one .safetensors file; drop shard_size")
    return save_trained(result, path, overwrite)


def save_trained(result, path: str | Path, overwrite: bool = False) -> Path:
    """Write a built result's trained tensors and recipe to a ``.safetensors`` file (atomically)."""
    if result.trained is None:
        raise ParameterError("save_trained: this result was not built by a module-building method "
                             "(it has no trained state); a merged state dict is written with merge(..., out=...)")
    return write_trained(result.trained, result.recipe, path, overwrite)


def export_module(result, path: str | Path, overwrite: bool = False) -> Path:
    """Write a built module's whole state (every parameter and buffer) and recipe to a ``.safetensors`` file.

    Self-contained: ``load_exported(path, base, pool)`` rebuilds the module from it and the base model's
    architecture alone, without the fine-tuned models.
    """
    if result.module is None:
        raise ParameterError("export_module: this result holds no built module (merge(..., out=...) writes a "
                             "merged state dict)")
    # cloned: an upcycled module's buffers may share storage, which a safetensors file cannot hold
    state = {name: tensor.detach().clone() for name, tensor in result.module.state_dict().items()}
    return write_trained(state, dict(result.recipe, exported=True), path, overwrite)


def load_exported(path: str | Path, base: Any, pool: Any):
    """Rebuild the module written by ``export_module``: the base gives the architecture, the file every tensor."""
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
    report = module_report(method.name, recipe, len(tensors), 0.0, peak_rss_bytes(), "cpu", "load_exported")
    return MergeResult(report, recipe, module=built.module, trained=built.trained, path=Path(path))


def load_trained(path: str | Path, models: Sequence[Any] | Mapping[str, Any], base: Any, pool: Any,
                 progress: bool = True):
    """Rebuild a module from ``save_trained``'s file on the same base and models, without training.

    The method and its parameters come from the file's recipe; the models must be the ones it was trained on
    (same names, same fingerprints), else a ModelInputError names the model that differs.
    """
    tensors, recipe = read_trained(path)
    method = get_method(recipe["method"])
    if method.build_module is None:
        raise ModelInputError(f"{path}: method {shown(recipe['method'])} does not build modules")
    named = _named_models(method, models, pool)
    if list(named) != recipe["models"]:
        raise ModelInputError(f"{path}: trained on models {recipe['models']}, given {list(named)} "
                              f"(same names, same order)")
    return build_merge(method, named, base, pool, recipe["params"], split=recipe.get("split", "test"),
                       progress=progress, trained_state=tensors, expected_fingerprints=recipe["fingerprints"],
                       source=str(path))


def _check_finite(state: Mapping, where: str, fix: str) -> None:
    """NonFiniteError naming the first floating-point tensor of ``state`` that holds NaN or Inf."""
    from nbmerge.engine.stream import finite

    for name, tensor in state.items():
        if not finite(tensor):
            raise NonFiniteError(f"{where} tensor {shown(name)} holds NaN or Inf; nothing was written. {fix[0].upper()}"
                                 f"{fix[1:]}, or pass allow_nonfinite=True (--allow-nonfinite) to go on anyway")


def _check_same_models(source: str, expected: dict, found: dict) -> None:
    if expected["base"] != found["base"]:
        raise ModelInputError(f"{source}: was trained on a different base model than the one given")
    for name, value in found["models"].items():
        if expected["models"].get(name) != value:
            raise ModelInputError(f"{source}: was trained on a different model {shown(name)} than the one given")


def _named_models(method: MergeMethod, models, pool) -> dict[str, Any]:
    task_names = [task.name for task in pool.tasks] if pool is not None else []
    if isinstance(models, Mapping) and not is_state_dict(models):
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


def _validation_score(pool, task_names: list[str]):
    """score(module) = mean over the tasks of the validation accuracy (%), or None when the pool has no
    labelled validation split."""
    tasks = [pool.task(name) for name in task_names]
    try:
        labels = [task.labels("validation") for task in tasks]
    except (AttributeError, KeyError, NotImplementedError, ValueError):
        return None

    def score(module) -> float:
        correct = [(task.predict(module, "validation") == truth).double().mean().item()
                   for task, truth in zip(tasks, labels)]
        return 100.0 * sum(correct) / len(correct)

    return score


def _unlabeled(task, split: str) -> UnlabeledTask:
    return UnlabeledTask(task.name, task.inputs(split), task.logits)
