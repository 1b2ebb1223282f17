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
