"""Merge search on a task pool: CMA-ES over a method's parameters (per model and per block of layers), greedy and
uniform model soups, candidates scored on Ray actors (a local cluster or a running one), checkpointed per
generation and resumable. Entry points: ``nbmerge.search`` and ``nbmerge.greedy_soup`` (``runner``), the
``%merge_search`` magic and ``nbmerge search``.
"""
