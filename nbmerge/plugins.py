"""The one owner of nbmerge's PluginManager and of the table of registered merge methods.

Plugins are loaded lazily, on the first call that needs a method, so ``import nbmerge`` stays cheap. Setting
``NBMERGE_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-in plugins shipped with nbmerge itself, not other
installed packages' entry points. A plugin that raises while it is imported is left out, with a warning, and
listed by ``broken_plugins()`` (and ``nbmerge methods``); every other plugin still works.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import threading
import warnings

import pluggy

from nbmerge import hookspecs
from nbmerge.errors import ParameterError, PluginError
from nbmerge.method.declaration import MergeMethod
from nbmerge.method.params import unknown_parameter_message
from nbmerge.taskpool import TaskPool, TaskPoolSpec

ENTRY_POINT_GROUP = "nbmerge"
AUTOLOAD_ENV = "NBMERGE_DISABLE_PLUGIN_AUTOLOAD"
_lock = threading.Lock()
_state: dict = {}


def plugin_manager() -> pluggy.PluginManager:
    """The PluginManager with every plugin loaded (built on first use)."""
    with _lock:
        if "pm" not in _state:
            _state["pm"] = _load_plugins()
        return _state["pm"]


def _load_plugins() -> pluggy.PluginManager:
    """Every entry point of the group, each imported on its own: one that raises is recorded as broken."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    only_builtin = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")
    broken: dict[str, str] = {}
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if only_builtin and (dist.metadata["Name"] or "").lower() != "nbmerge":
            continue
        for entry_point in dist.entry_points:
            if entry_point.group != ENTRY_POINT_GROUP or pm.has_plugin(entry_point.name) \
                    or entry_point.name in broken:
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:  # any error of someone else's import: the rest must keep working
                broken[entry_point.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"nbmerge plugin {entry_point.name!r} ({dist.metadata['Name']} {dist.version}) "
                              f"failed to import and is left out: {broken[entry_point.name]}", stacklevel=2)
                continue
            pm.register(plugin, name=entry_point.name)
            versions[entry_point.name] = dist.version
    pm.check_pending()
    _state["broken"], _state["versions"] = broken, versions
    return pm


def broken_plugins() -> dict[str, str]:
    """Plugin (entry point) name -> the error its import raised, for plugins left out."""
    plugin_manager()
    return dict(_state.get("broken", {}))


def reload_plugins() -> None:
    """Forget loaded plugins; the next call rediscovers entry points (e.g. after installing a plugin package)."""
    with _lock:
        _state.clear()
    importlib.invalidate_caches()


def register_plugin(plugin, name: str | None = None) -> None:
    """Register a plugin object or module at run time (e.g. one defined in a notebook) and refresh the table."""
    pm = plugin_manager()
    pm.register(plugin, name=name)
    pm.check_pending()
    with _lock:
        _state.pop("methods", None)
        _state.pop("task_pools", None)


def unregister_plugin(name: str) -> None:
    pm = plugin_manager()
    pm.unregister(name=name)
    with _lock:
        _state.pop("methods", None)
        _state.pop("task_pools", None)


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method by name, each stamped with the plugin that registered it."""
    pm = plugin_manager()
    with _lock:
        if "methods" not in _state:
            _state["methods"] = _collect_methods(pm)
        return dict(_state["methods"])


def _collect_methods(pm: pluggy.PluginManager) -> dict[str, MergeMethod]:
    methods: dict[str, MergeMethod] = {}
    for impl in reversed(pm.hook.register_merge_methods.get_hookimpls()):
        plugin_name = impl.plugin_name

        def register(method: MergeMethod, _plugin=plugin_name) -> None:
            if not isinstance(method, MergeMethod):
                raise PluginError(f"plugin {_plugin!r} registered {method!r}, which is not an nbmerge.MergeMethod")
            if method.name in methods:
                raise PluginError(f"merge method {method.name!r} is registered by two plugins: "
                                  f"{methods[method.name].plugin!r} and {_plugin!r}")
            methods[method.name] = dataclasses.replace(method, plugin=_plugin)

        impl.function(register=register)
    return dict(sorted(methods.items()))


def get_method(name: str) -> MergeMethod:
    """The registered method of that name (or of that name lower-cased); an unknown name is a ParameterError
    with a "did you mean" (the CLI and the magics also know mergekit's names: ``nbmerge.method_names``)."""
    methods = all_methods()
    if name in methods:
        return methods[name]
    if isinstance(name, str) and name.lower() in methods:
        return methods[name.lower()]
    raise ParameterError(unknown_parameter_message("nbmerge", name, sorted(methods), noun="merge method",
                                                   listed_as="registered methods"))


def plugin_versions() -> dict[str, str]:
    """Plugin name -> version of the distribution that provides it ('' for plugins registered by hand)."""
    pm = plugin_manager()
    versions = _state.get("versions", {})
    return {pm.get_name(plugin): versions.get(pm.get_name(plugin), "") for plugin in pm.get_plugins()}


def all_task_pools() -> dict[str, TaskPoolSpec]:
    """Every registered evaluation task pool by name (not built: building may train models)."""
    pm = plugin_manager()
    with _lock:
        if "task_pools" not in _state:
            _state["task_pools"] = _collect_task_pools(pm)
        return dict(_state["task_pools"])


def _collect_task_pools(pm: pluggy.PluginManager) -> dict[str, TaskPoolSpec]:
    pools: dict[str, TaskPoolSpec] = {}
    for impl in reversed(pm.hook.register_task_pools.get_hookimpls()):

        def register(name: str, build, description: str = "", _plugin=impl.plugin_name) -> None:
            if name in pools:
                raise PluginError(f"task pool {name!r} is registered by two plugins: {pools[name].plugin!r} "
                                  f"and {_plugin!r}")
            pools[name] = TaskPoolSpec(name, description, build, _plugin)

        impl.function(register=register)
    return dict(sorted(pools.items()))


def task_pool(name: str, **options) -> TaskPool:
    """Build (or load from its cache) the registered task pool ``name``; options go to its factory."""
    pools = all_task_pools()
    if name not in pools:
        raise ParameterError(unknown_parameter_message("nbmerge", name, sorted(pools), noun="task pool",
                                                       listed_as="registered task pools"))
    pool = pools[name].build(**options)
    if not isinstance(pool, TaskPool):
        raise PluginError(f"task pool {name!r} of plugin {pools[name].plugin!r} built {type(pool).__name__}, "
                          "not an nbmerge.TaskPool")
    return pool
