"""nbmerge's built-in merge methods and task pools, one module each, registered through the ``nbmerge``
entry-point group exactly as a third-party package registers its own. Steps several methods share live in
``_task_vectors`` and ``_selection``; no method module imports another."""
