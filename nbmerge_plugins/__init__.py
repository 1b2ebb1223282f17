"""nbmerge's built-in merge methods and task pools, registered through the ``nbmerge`` entry-point group exactly as
a third-party package registers its own. One module per method, grouped by family:

- ``interpolation``: averages and interpolations of whole models (linear, SLERP, Model Stock, ...);
- ``arithmetic``: task-vector arithmetic (task arithmetic, TIES, DARE, MagMax, ...);
- ``singular``: per-matrix SVD methods (TSV-M, Iso-C, Iso-CTS);
- ``optimised``: data-free optimisation of the merged task vector (WUDI, DOGE-TA);
- ``from_data``: closed forms from each fine-tune's input statistics (RegMean, RegMean++, Fisher merging);
- ``test_time``: adaptation on unlabeled inputs (AdaMerging, WE-MoE).

Steps several families share live here (``_task_vectors``, ``_selection``, ``_mergekit_arithmetic``, ``native``);
a family's own shared steps live in the family (its ``_``-prefixed modules). No method module imports another.
``task_pools`` registers the workbench's task pools."""
