"""Test-time adaptation of a weight-ensembling MoE model's routers (``nbmerge_plugins._test_time`` does the
minimising): each training batch of one task is routed with its mean routing vector when ``batch_reduce``."""

from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from nbmerge_plugins._test_time import AdaptationHistory, AdaptationTask, minimise
from nbmerge_plugins.we_moe.layers import routed_blocks, router_parameters, set_batch_reduce


def adapt(model: nn.Module, tasks: Mapping[str, AdaptationTask], *, lr: float = 1e-4, steps: int = 1000,
          batch_reduce: bool = True, objective: str = "entropy", progress: bool = True,
          on_step: Callable[[int, float], None] | None = None, select: Callable[[], float] | None = None,
          select_every: int = 0) -> AdaptationHistory:
    """Train the routers of ``model`` (upcycled by ``we_moe.layers.upcycle``) for ``steps`` Adam steps.

    batch_reduce: route each training batch (one task's inputs) with its mean routing vector, as FusionBench's
    recipe does (the layer then costs one weight build and one plain matmul instead of E expert matmuls); the
    model's own routing mode is restored afterwards, and is the one ``select()`` (the step choice of
    ``_test_time.minimise``) scores the model with. Every other tensor of the model stays bit-identical.
    """
    parameters = list(router_parameters(model).values())
    routing_modes = {path: block.batch_reduce for path, block in routed_blocks(model).items()}

    def restore_routing() -> None:
        for path, block in routed_blocks(model).items():
            block.batch_reduce = routing_modes[path]

    def select_as_used() -> float:
        restore_routing()
        try:
            return select()
        finally:
            set_batch_reduce(model, batch_reduce)

    set_batch_reduce(model, batch_reduce)
    try:
        return minimise(model, parameters, tasks, lr=lr, steps=steps, objective=objective, owner="we_moe",
                        progress=progress, on_step=on_step, select=None if select is None else select_as_used,
                        select_every=select_every)
    finally:
        restore_routing()
