"""The plugin contract: every hook nbmerge calls, with when it is called and what it must do.

Plugins implement these with ``@nbmerge.hookimpl`` and are found through the ``nbmerge`` entry-point group;
the built-in methods (package ``nbmerge_plugins``) are registered exactly the same way.
"""

import pluggy

hookspec = pluggy.HookspecMarker("nbmerge")
hookimpl = pluggy.HookimplMarker("nbmerge")


@hookspec
def register_merge_methods(register):
    """Called once, when the method registry is first needed.

    Call ``register(method)`` with an ``nbmerge.MergeMethod`` for every method the plugin provides. Two plugins
    registering the same method name is an error naming both plugins.
    """


@hookspec
def register_task_pools(register):
    """Called once, when the task-pool registry is first needed (``nbmerge.task_pool``, ``nbmerge bench``).

    Call ``register(name, build, description)`` for every evaluation task pool the plugin provides: ``build``
    is called with keyword options (e.g. ``seed``, ``cache_dir``, ``progress``) and returns an
    ``nbmerge.TaskPool``. Two plugins registering the same pool name is an error naming both plugins.
    """
