"""nbmerge: model merging in the notebook.

The public surface, for users: ``nbmerge.merge(method, models, base=None, out=None, device="auto", **params)``
merges; ``nbmerge.stack(slices)`` stacks layers of several models (``LayerSlice``); ``nbmerge.methods()`` lists
the registered methods; ``nbmerge.evaluate``, ``nbmerge.sweep``, ``nbmerge.search`` (CMA-ES over a method's
parameters), ``nbmerge.search_data_flow`` (over which layers of which models), ``nbmerge.greedy_soup`` and
``nbmerge.task_pool`` are the workbench (more in ``nbmerge.workbench``); for causal LMs, ``nbmerge.lm_pool``
(perplexity and multiple-choice tasks for ``evaluate``; ``compare_reports`` tabulates several models),
``nbmerge.compare_generations`` / ``nbmerge.generate`` (the same prompts through several models) and
``nbmerge.evaluate_harness`` (lm-evaluation-harness tasks); ``MergePanel``, ``SweepPanel``, ``SearchPanel`` and
``GenerationPanel`` are the widget panels. For plugin authors: ``nbmerge.hookimpl`` and ``nbmerge.method``
(``MergeMethod``, ``TensorJob``, ``Param``, ...). Every other module path is internal.

Everything loads on first use, so ``import nbmerge`` stays cheap (no torch). In IPython/Jupyter, ``%load_ext
nbmerge`` registers the magics (``%merge``, ``%%merge``, ``%merge_eval``, ``%merge_sweep``, ``%merge_search``,
``%merge_methods``);
``import nbmerge`` inside a running shell registers them lazily (loaded on first use), as does the IPython config
``c.MagicsManager.lazy_magics = {"merge": "nbmerge", ...}``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from nbmerge.hookspecs import hookimpl
from nbmerge.notebook import MAGIC_NAMES, load_ipython_extension
from nbmerge.version import __version__

# name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "merge": "api", "methods": "api", "MergeResult": "results", "MergeReport": "results",
    "stack": "layer_stack", "LayerSlice": "layer_stack",
    "search": "merge_search.runner", "search_data_flow": "merge_search.runner", "greedy_soup": "merge_search.runner",
    "SearchResult": "merge_search.runner",
    "MergeMethod": "method", "TensorJob": "method", "Stage": "method", "ModuleJob": "method",
    "BuiltModule": "method", "UnlabeledTask": "method", "Param": "method",
    "save_trained": "module_merge", "load_trained": "module_merge", "export_module": "module_merge",
    "load_exported": "module_merge",
    "ProgressEvent": "engine.progress", "WithLora": "io.lora",
    "evaluate": "workbench.evaluation", "EvalReport": "workbench.evaluation",
    "compare_reports": "workbench.evaluation", "ReportTable": "workbench.evaluation",
    "lm_pool": "workbench.models.lmpool", "CausalLMPool": "workbench.models.lmpool",
    "generate": "workbench.generation", "compare_generations": "workbench.generation",
    "GenerationTable": "workbench.generation",
    "evaluate_harness": "workbench.harness", "HarnessReport": "workbench.harness",
    "sweep": "workbench.sweep", "SweepResult": "workbench.sweep",
    "TaskPool": "taskpool", "Task": "taskpool",
    "task_pool": "plugins", "register_plugin": "plugins", "unregister_plugin": "plugins",
    "reload_plugins": "plugins",
    "NBMergeError": "errors", "ParameterError": "errors", "ModelInputError": "errors", "PluginError": "errors",
    "OutputExistsError": "errors", "OutputWriteError": "errors", "MergeCancelled": "errors",
    "RecipeError": "errors",
    "MergePanel": "notebook.panels", "SweepPanel": "notebook.panels", "SearchPanel": "notebook.panels",
    "GenerationPanel": "notebook.generation_panel",
}

# module paths of nbmerge 0.1's flat layout that notebooks and plugins import, kept for one release
MOVED_MODULES = {
    "params": "method.params", "names": "method.tensor_names",
    "statedicts": "workbench.models.statedicts", "zoo": "workbench.models.zoo",
    "synthetic": "workbench.models.synthetic_llama", "plots": "workbench.plots", "panels": "notebook.panels",
    "causal_lm": "workbench.models.causal_lm", "lm_variants": "workbench.models.lm_variants",
}

__all__ = ["__version__", "hookimpl", "load_ipython_extension", *_LAZY]


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import nbmerge.zoo`` (a 0.1 path) gives the module at its new path, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package == __name__ and name in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        name = spec.name.partition(".")[2]
        warnings.warn(f"nbmerge.{name} moved to nbmerge.{MOVED_MODULES[name]}; the old path goes away in 0.3",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[name]}")
        spec.loader_state = module.__spec__  # the import system replaces the module's spec by this one next
        return module

    def exec_module(self, module):
        """The module was executed at its new path: give it back its own spec."""
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def _register_lazy_magics() -> None:
    """Inside a running IPython, let ``%merge`` load the extension on first use (nothing heavy is imported)."""
    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is None or not hasattr(shell, "magics_manager"):
        return
    registered = shell.magics_manager.magics
    for name in MAGIC_NAMES:
        if name not in registered["line"] and name not in registered["cell"]:
            shell.magics_manager.register_lazy(name, __name__)


_register_lazy_magics()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'nbmerge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
