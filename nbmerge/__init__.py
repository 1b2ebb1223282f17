"""nbmerge: model merging in the notebook.

``nbmerge.merge(method, models, base=None, out=None, device="auto", **params)`` merges; ``nbmerge.methods()``
lists the registered methods. Plugins implement the hooks of ``nbmerge.hookspecs`` with ``@nbmerge.hookimpl``.
Heavy modules (torch, the engine, plugins) load on first use so that ``import nbmerge`` stays cheap.

In IPython/Jupyter: ``%load_ext nbmerge`` registers the magics (``%merge``, ``%%merge``, ``%merge_eval``,
``%merge_sweep``, ``%merge_methods``); ``import nbmerge`` inside a running shell registers them lazily (loaded on
first use), as does the IPython config ``c.MagicsManager.lazy_magics = {"merge": "nbmerge", ...}``.
"""

from __future__ import annotations

import importlib
import sys

from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "merge": "api", "methods": "api", "MergeResult": "api", "MergeReport": "api",
    "MergeMethod": "method", "TensorJob": "method", "Stage": "method", "ModuleJob": "method",
    "BuiltModule": "method", "UnlabeledTask": "method",
    "save_trained": "build", "load_trained": "build", "export_module": "build", "load_exported": "build",
    "Param": "params",
    "ProgressEvent": "progress",
    "evaluate": "evaluation", "EvalReport": "evaluation", "TaskPool": "taskpool", "Task": "taskpool",
    "task_pool": "registry", "register_plugin": "registry", "unregister_plugin": "registry", "reload_plugins": "registry",
    "NBMergeError": "errors", "ParameterError": "errors", "ModelInputError": "errors", "PluginError": "errors",
    "OutputExistsError": "errors", "MergeCancelled": "errors",
    "MergePanel": "panels", "SweepPanel": "panels", "sweep": "sweep", "SweepResult": "sweep",
}

__all__ = ["__version__", "hookimpl", "load_ipython_extension", *_LAZY]

# nbmerge.magics.MAGIC_NAMES, repeated here so that the import stays cheap
_MAGIC_NAMES = ("merge", "merge_eval", "merge_sweep", "merge_methods")


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbmerge``: register the magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def _register_lazy_magics() -> None:
    """Inside a running IPython, let ``%merge`` load the extension on first use (nothing heavy is imported)."""
    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is None or not hasattr(shell, "magics_manager"):
        return
    registered = shell.magics_manager.magics
    for name in _MAGIC_NAMES:
        if name not in registered["line"] and name not in registered["cell"]:
            shell.magics_manager.register_lazy(name, __name__)


_register_lazy_magics()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbmerge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
