"""The data pass of the data-driven static merges (RegMean, RegMean++, Fisher merging): run a model on a task's
inputs and collect, per tensor, the statistic its merge weighs by. The merges themselves are then per tensor.

- ``input_grams``: for every ``nn.Linear`` of the module, the Gram matrix of its inputs, the mean over every row
  fed to it (each token of each example, padding included, as FusionBench counts them):
  G = (1/n) Σ_rows x xᵀ = XᵀX / n, [in_features, in_features]. A linear called twice in one forward pass counts
  both calls' rows.
- ``fisher_diagonals``: per parameter the diagonal of the Fisher information of the model's own predictive
  distribution, averaged over the examples:
  ``"expected"`` (Matena & Raffel 2022): F = (1/N) Σ_x Σ_c p_c(x) (∇ log p_c(x))², the exact expectation over the
  classes, one backward per example and class;
  ``"fusionbench"`` (FusionBench's and MergeLM's estimator): F = (1/N) Σ_batches (∇ Σ_{x∈batch} Σ_c √p_c(x)
  log p_c(x))² with p detached: one backward per batch, the squared gradient of a sum (its cross terms between
  classes and between the batch's examples make it depend on the batch size).

The inputs are ``count`` of the task's inputs drawn without replacement in a seeded order (``chosen_inputs``),
run in batches of ``batch_size`` through ``logits(module, batch)``, the task's own function: the statistics see
exactly what the task feeds its model. The caller's module is never modified (its mode is restored).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from nbmerge.errors import ModelInputError, ParameterError
from nbmerge.method import ModuleJob

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
FISHER_ESTIMATES = ("expected", "fusionbench")


def chosen_inputs(inputs: Sequence[Any], count: int, seed: int, owner: str, task: str) -> list:
    """``count`` of ``inputs`` (all of them when there are fewer) in a seeded random order."""
    if len(inputs) == 0:
        raise ParameterError(f"{owner}: task {task!r} has no inputs to compute its statistics on")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [inputs[i] for i in order[:count]]


def task_inputs(job: ModuleJob, count: int, seed: int, owner: str) -> dict[str, list]:
    """Each fine-tuned model's ``count`` inputs of its own task, the i-th model's drawn with seed ``seed·1000 + i``."""
    return {label: chosen_inputs(job.tasks[label].inputs, count, seed * 1000 + index, owner, label)
            for index, label in enumerate(job.models)}


def per_model_statistics(job: ModuleJob, inputs: Mapping[str, Sequence[Any]],
                         statistic: Callable[[nn.Module, LogitsFn, Sequence[Any]], Any]) -> list:
    """``statistic(model, its task's logits function, inputs[label])`` for every fine-tuned model in order, each
    model's completion reported as a step of the job."""
    results = []
    for done, (label, model) in enumerate(job.models.items(), start=1):
        results.append(statistic(model, job.tasks[label].logits, inputs[label]))
        job.step_done(done, len(job.models))
    return results


def batches(inputs: Sequence[Any], batch_size: int) -> Iterator[list]:
    for start in range(0, len(inputs), batch_size):
        yield list(inputs[start:start + batch_size])


def linear_modules(module: nn.Module, owner: str) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``module`` by its module path; an error naming the module when it has none."""
    linears = {path: child for path, child in module.named_modules() if isinstance(child, nn.Linear)}
    if not linears:
        raise ModelInputError(f"{owner}: {type(module).__name__} has no nn.Linear layer to merge by its inputs")
    return linears


class GramAccumulator:
    """Forward hooks on linears summing XᵀX and counting rows; ``grams()`` gives XᵀX / n per linear."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.hooked = list(linears)
        self._handles = [linear.register_forward_hook(self._hook(path)) for path, linear in linears.items()]

    def _hook(self, path: str):
        def hook(_module, args, _output):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
            product = x.T @ x
            self.sums[path] = product if path not in self.sums else self.sums[path] + product
            self.rows[path] = self.rows.get(path, 0) + x.shape[0]
        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        return {path: total / self.rows[path] for path, total in self.sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode (dropout off) for the block; every submodule's own mode restored after."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for child, training in modes:
            child.training = training


class _Stop(Exception):
    """Raised by the hook of ``stop_after`` to end a forward pass whose remaining layers nothing needs."""


def input_grams(module: nn.Module, logits: LogitsFn, inputs: Sequence[Any], batch_size: int,
                linears: dict[str, nn.Linear] | None = None, stop_after: nn.Module | None = None,
                owner: str = "regmean") -> dict[str, torch.Tensor]:
    """G = XᵀX / n of the inputs of every linear (``linears``, default: all of ``module``'s) over ``inputs``.

    stop_after: a submodule after whose forward call each batch's pass ends (the layers after it are not run).
    """
    accumulator = GramAccumulator(linears if linears is not None else linear_modules(module, owner))
    handles = [] if stop_after is None else [stop_after.register_forward_hook(_raise_stop)]
    try:
        with torch.no_grad(), evaluating(module):
            for batch in batches(inputs, batch_size):
                try:
                    logits(module, batch)
                except _Stop:
                    pass
    finally:
        accumulator.remove()
        for handle in handles:
            handle.remove()
    missing = [path for path in accumulator.hooked if path not in accumulator.rows]
    if stop_after is None and len(missing) == len(accumulator.hooked):
        raise ModelInputError(f"{owner}: the task's logits never ran the model's linear layers")
    return accumulator.grams()


def _raise_stop(_module, _args, _output):
    raise _Stop


class _WithTensors(nn.Module):
    """``module`` run with ``tensors`` in place of its own (``functional_call``), so that gradients reach copies
    of its parameters and never the caller's module."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = module
        self.tensors = tensors

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.tensors, args, kwargs, strict=False)


def fisher_diagonals(module: nn.Module, logits: LogitsFn, inputs: Sequence[Any], batch_size: int,
                     estimate: str = "expected", owner: str = "fisher_merging") -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every floating parameter of ``module`` over ``inputs`` (module docstring); a
    parameter the logits do not depend on gets zeros."""
    if estimate not in FISHER_ESTIMATES:
        raise ParameterError(f"{owner}: estimate must be one of {', '.join(FISHER_ESTIMATES)}, got {estimate!r}")
    params = {name: p.detach().requires_grad_(True) for name, p in module.named_parameters()
              if p.is_floating_point()}
    names, leaves = list(params), list(params.values())
    totals = [torch.zeros_like(leaf, dtype=torch.promote_types(leaf.dtype, torch.float32)) for leaf in leaves]
    wrapped = _WithTensors(module, params)
    examples = 0
    with torch.enable_grad(), evaluating(module):
        if estimate == "fusionbench":
            for batch in batches(inputs, batch_size):
                log_probs = _log_probs(owner, logits(wrapped, batch))
                surrogate = (log_probs.detach().exp().sqrt() * log_probs).sum()
                _add_squares(totals, torch.autograd.grad(surrogate, leaves, allow_unused=True), 1.0)
                examples += len(batch)
        else:
            for example in inputs:
                log_probs = _log_probs(owner, logits(wrapped, [example]))[0]
                probabilities = log_probs.detach().exp()
                for c in range(log_probs.shape[0]):
                    gradients = torch.autograd.grad(log_probs[c], leaves, retain_graph=c < log_probs.shape[0] - 1,
                                                    allow_unused=True)
                    _add_squares(totals, gradients, float(probabilities[c]))
                examples += 1
    return {name: total / examples for name, total in zip(names, totals)}


def _log_probs(owner: str, logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ParameterError(f"{owner}: a task's logits must be a [batch, classes] tensor, got {shape}")
    if not logits.requires_grad:
        raise ParameterError(f"{owner}: a task's logits do not depend on the model's parameters (computed without "
                             f"gradients, or with another model?)")
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _add_squares(totals: list[torch.Tensor], gradients, weight: float) -> None:
    for total, gradient in zip(totals, gradients):
        if gradient is not None:
            total.add_(gradient.to(total.dtype).square(), alpha=weight)
