"""Test-time adaptation of a weight-ensembling MoE model's routers (``nbmerge_plugins.test_time._test_time`` does the
minimising), routed as the model routes in use: per sample, or each batch (one task's inputs) by its mean routing
vector when the model was upcycled with ``batch_reduce``."""

from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from nbmerge_plugins.test_time._test_time import AdaptationHistory, AdaptationTask, minimise
from nbmerge_plugins.test_time.we_moe.layers import router_parameters


def adapt(model: nn.Module, tasks: Mapping[str, AdaptationTask], *, lr: float = 1e-4, steps: int = 1000,
          objective: str = "entropy", progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          select: Callable[[], float] | None = None, select_every: int = 0) -> AdaptationHistory:
    """Train the routers of ``model`` (upcycled by ``we_moe.layers.upcycle``) for ``steps`` Adam steps.

    Training routes exactly as the model will be used (its own ``batch_reduce`` setting), so the routers are
    trained for the routing they serve with; ``select()`` scores the model in that same mode. Every tensor other
    than the routers stays bit-identical.
    """
    parameters = list(router_parameters(model).values())
    return minimise(model, parameters, tasks, lr=lr, steps=steps, objective=objective, owner="we_moe",
                    progress=progress, on_step=on_step, select=select, select_every=select_every)
