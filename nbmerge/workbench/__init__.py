"""The evaluation workbench: how good a merge is, on task pools built on this machine.

``evaluate`` (one model on a pool), ``sweep`` (one parameter's curve), ``run_bench`` (every method, tuned on
validation, over seeds), ``cosine_matrix`` / ``layer_statistics`` (what the task vectors look like) and ``plots``;
``models`` builds the checkpoints and data they run on (the MiniLM zoo, a causal LM, synthetic Llama sets).
Nothing in ``nbmerge.io`` or ``nbmerge.engine`` imports this package. Names load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "evaluate": "evaluation", "EvalReport": "evaluation", "sweep": "sweep", "SweepResult": "sweep",
    "run_bench": "bench", "BenchResult": "bench", "cosine_matrix": "taskvectors",
    "layer_statistics": "taskvectors", "build_zoo": "models.zoo", "load_zoo": "models.zoo", "Zoo": "models.zoo",
}
__all__ = [*_LAZY, "plots", "models"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("plots", "models"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
