"""Test-time adaptation of a weight-ensembling MoE model's routers (``nbmerge_plugins._test_time`` does the
minimising): each training batch of one task is routed with its mean routing vector when ``batch_reduce``."""

from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from nbmerge_plugins._test_time import AdaptationHistory, AdaptationTask, minimise
from nbmerge_plugins.we_moe.layers import routed_blocks, router_parameters, set_batch_reduce


def adapt(model: nn.Module, tasks: Mapping[str, AdaptationTask], *, lr: float = 1e-4, steps: int = 1000,
          batch_reduce: bool = True, objective: str = "entropy", progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> AdaptationHistory:
    """Train the routers of ``model`` (upcycled by ``we_moe.layers.upcycle``) for ``steps`` Adam steps.

    batch_reduce: route each training batch (one task's inputs) with its mean routing vector, as FusionBench's
    recipe does (the layer then costs one weight build and one plain matmul instead of E expert matmuls); the
    model's own routing mode is restored afterwards. Every other tensor of the model stays bit-identical.
    """
    parameters = list(router_parameters(model).values())
    routing_modes = {path: block.batch_reduce for path, block in routed_blocks(model).items()}
    set_batch_reduce(model, batch_reduce)
    try:
        return minimise(model, parameters, tasks, lr=lr, steps=steps, objective=objective, owner="we_moe",
                        progress=progress, on_step=on_step)
    finally:
        for path, block in routed_blocks(model).items():
            block.batch_reduce = routing_modes[path]
