"""nbmerge: model merging in the notebook.

``nbmerge.merge(method, models, base=None, out=None, device="auto", **params)`` merges; ``nbmerge.methods()``
lists the registered methods. Plugins implement the hooks of ``nbmerge.hookspecs`` with ``@nbmerge.hookimpl``.
Heavy modules (torch, the engine, plugins) load on first use so that ``import nbmerge`` stays cheap.
"""

from __future__ import annotations

import importlib

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
    "OutputExistsError": "errors",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbmerge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
