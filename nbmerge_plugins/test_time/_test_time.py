"""Test-time adaptation on unlabeled inputs: the machinery AdaMerging and WE-MoE share.

Each step draws one unlabeled batch per task and minimises L = Σ_tasks ℓ(softmax(logits_task(model, batch)))
with Adam over the given parameters only (WE-MoE's routers, AdaMerging's merging coefficients); every other tensor
stays as it is. The objective ℓ is

- ``"entropy"`` (the papers'): the mean prediction entropy  (1/B) Σ_b H(p_b),  H(p) = −Σ_c p_c log p_c;
- ``"information_max"``: (1/B) Σ_b H(p_b) − H(p̄),  p̄ = (1/B) Σ_b p_b  (SHOT, Liang et al. 2020). The second
  term rewards a batch whose predictions spread over the classes, so a task cannot lower its loss by predicting
  one class for everything, which entropy alone rewards and which happens on few-class tasks.

The gradient of the sum is accumulated task by task (one backward per task): the same gradient with one task's
activations in memory at a time. An interrupt (KeyboardInterrupt) stops between steps: the parameters keep the
last completed step and the history records the steps done, marked ``interrupted``.

Step choice: with a ``select`` score (the validation accuracy of the model as it stands, on labelled data other
than the unlabeled inputs, as every other method's hyperparameters are chosen) and ``select_every`` = k > 0, the
model is scored before the first step, every k steps and after the last; the parameters of the best-scoring step
(the earliest of equal scores) are restored at the end, also after an interrupt. Entropy minimisation drifts: on
the MiniLM pool information_max peaked near step 100 and lost 3 points by step 1000.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nbmerge.errors import ParameterError
from nbmerge.method import Param

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
OBJECTIVES = ("entropy", "information_max")
SELECT_EVERY = Param("select_every", "int", 100, "score the model on the pool's labelled validation split before "
                     "the first step, every this many steps and after the last, and keep the best-scoring step "
                     "(0: keep the last step)", low=0)


@dataclass(frozen=True)
class AdaptationTask:
    """One task's part of test-time adaptation: ``logits(model, batch)`` -> [batch, classes] (differentiable), and
    an iterable of unlabeled batches (re-iterated when exhausted)."""

    logits: LogitsFn
    batches: Iterable[Any]


@dataclass
class AdaptationHistory:
    """The loss curve: per completed step the summed objective and each task's mean prediction entropy (nats)."""

    planned_steps: int
    loss: list[float] = field(default_factory=list)
    task_entropy: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False
    validation: list[tuple[int, float]] = field(default_factory=list)  # (steps done, score) when selecting
    selected_step: int | None = None  # the step whose parameters were kept (None: no selection, the last)

    @property
    def steps(self) -> int:
        return len(self.loss)

    def __str__(self) -> str:
        state = "interrupted" if self.interrupted else "done"
        first = f"{self.loss[0]:.4f}" if self.loss else "-"
        last = f"{self.loss[-1]:.4f}" if self.loss else "-"
        text = (f"test-time adaptation {state}: {self.steps}/{self.planned_steps} steps in {self.seconds:.1f} s, "
                f"summed loss {first} -> {last}")
        if self.selected_step is not None:
            best = dict(self.validation)[self.selected_step]
            text += f"; kept step {self.selected_step} (validation {best:.1f}, scored every {self._every()} steps)"
        return text

    def _every(self) -> int:
        steps = [step for step, _ in self.validation]
        return steps[1] - steps[0] if len(steps) > 1 else 0

    def to_dict(self) -> dict:
        return {"planned_steps": self.planned_steps, "loss": self.loss, "task_entropy": self.task_entropy,
                "seconds": self.seconds, "interrupted": self.interrupted,
                "validation": [list(point) for point in self.validation], "selected_step": self.selected_step}

    def plot(self, ax=None, smooth: int = 20):
        """The loss curve (each task's entropy and their sum, moving average over ``smooth`` steps); a Figure."""
        import matplotlib.pyplot as plt

        figure = ax.figure if ax is not None else plt.figure(figsize=(6, 3.5))
        ax = ax if ax is not None else figure.add_subplot()
        for label, values in [("sum", self.loss), *self.task_entropy.items()]:
            ax.plot(range(1, len(values) + 1), _moving_average(values, smooth), label=label,
                    linewidth=2 if label == "sum" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("nats (sum: the loss; tasks: entropy)")
        ax.set_title("WE-MoE test-time adaptation")
        ax.legend(fontsize="small")
        return figure


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(softmax(logits)) = −Σ_c p_c log p_c."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p̄) of the batch's mean prediction p̄ = (1/B) Σ_b softmax(logits_b)."""
    mean = F.softmax(logits.float(), dim=-1).mean(0)
    return -(mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum()


def objective_loss(logits: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean entropy): loss = entropy, or entropy − H(p̄) for ``"information_max"``."""
    mean_entropy = entropy(logits)
    if objective == "entropy":
        return mean_entropy, mean_entropy
    if objective == "information_max":
        return mean_entropy - marginal_entropy(logits), mean_entropy
    raise ParameterError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def adaptation_record(history: AdaptationHistory) -> dict[str, Any]:
    """What a build records of its adaptation in the recipe."""
    return {"steps_done": history.steps, "interrupted": history.interrupted,
            "adaptation_seconds": round(history.seconds, 2), "selected_step": history.selected_step}


def shuffled_batches(inputs: Sequence[Any], batch_size: int, seed: int) -> Iterator[list]:
    """An endless stream of batches of ``inputs``: each epoch a fresh seeded permutation, the last short batch
    dropped unless it is the only one."""
    if len(inputs) == 0:
        raise ParameterError("a task has no unlabeled inputs to adapt on")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(inputs))
    while True:
        order = torch.randperm(len(inputs), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            yield [inputs[i] for i in order[start:start + size]]


def minimise(model: nn.Module, parameters: list[torch.Tensor], tasks: Mapping[str, AdaptationTask], *,
             lr: float, steps: int, objective: str = "entropy", owner: str = "adaptation", progress: bool = True,
             on_step: Callable[[int, float], None] | None = None, select: Callable[[], float] | None = None,
             select_every: int = 0) -> AdaptationHistory:
    """Adam on ``parameters`` for ``steps`` steps, minimising the summed ``objective`` of every task's logits.

    The model runs in eval mode (dropout off: only the adapted parameters change the predictions; its mode is
    restored afterwards). ``owner`` names the method in errors, warnings and the progress bar. ``on_step(done,
    loss)`` is called after each step (it may raise to stop, e.g. MergeCancelled). Returns the loss history; on
    KeyboardInterrupt, the partial history with ``interrupted=True``. ``select()`` and ``select_every``: the step
    choice of the module docstring (``select`` is called with the model in eval mode and must not need gradients).
    """
    if not tasks:
        raise ParameterError(f"{owner}: test-time adaptation needs at least one task's unlabeled inputs")
    if objective not in OBJECTIVES:
        raise ParameterError(f"{owner}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    streams = {name: _endless(owner, name, task.batches) for name, task in tasks.items()}
    history = AdaptationHistory(planned_steps=steps, task_entropy={name: [] for name in tasks})
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{owner} test-time adaptation", unit="step", dynamic_ncols=True, leave=False)
    started = time.perf_counter()
    selecting = select is not None and select_every > 0 and steps > 0
    best: tuple[float, list[torch.Tensor]] | None = None

    def score() -> None:
        nonlocal best
        with torch.no_grad():
            value = float(select())
        history.validation.append((history.steps, value))
        if best is None or value > best[0]:
            best = (value, [p.detach().clone() for p in parameters])
            history.selected_step = history.steps

    try:
        if selecting:
            score()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            step_entropy, total = {}, 0.0
            for name, task in tasks.items():
                logits = _check_logits(owner, name, task.logits(model, next(streams[name])))
                loss, mean_entropy = objective_loss(logits, objective)
                loss.backward()
                step_entropy[name] = mean_entropy.item()
                total += loss.item()
            _step_uninterrupted(optimizer)
            history.loss.append(total)
            for name, value in step_entropy.items():
                history.task_entropy[name].append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", refresh=False)
            if on_step is not None:
                on_step(history.steps, total)
            if selecting and (history.steps % select_every == 0 or history.steps == steps):
                score()
    except KeyboardInterrupt:
        history.interrupted = True
        warnings.warn(f"{owner}: test-time adaptation interrupted after {history.steps} of {steps} steps; the "
                      f"adapted parameters keep the last completed step", stacklevel=3)
    finally:
        if best is not None:
            with torch.no_grad():
                for parameter, kept in zip(parameters, best[1]):
                    parameter.copy_(kept)
        history.seconds = time.perf_counter() - started
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        if bar is not None:
            bar.close()
    return history


def _step_uninterrupted(optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step that an interrupt cannot leave half-applied: on KeyboardInterrupt inside it, restore
    the parameters and optimizer state from before the step, then re-raise."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    state_before = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                    for k, s in optimizer.state.items()}
    try:
        optimizer.step()
    except KeyboardInterrupt:
        with torch.no_grad():
            for p, saved in zip(params, before):
                p.copy_(saved)
        optimizer.state.clear()
        optimizer.state.update(state_before)
        raise


def _endless(owner: str, name: str, batches: Iterable[Any]) -> Iterator[Any]:
    if isinstance(batches, Iterator):
        yield from batches
        raise ParameterError(f"{owner}: the batches of task {name!r} ran out (pass a re-iterable such as a list, "
                             f"or an endless iterator)")
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ParameterError(f"{owner}: task {name!r} has no unlabeled batches")


def _check_logits(owner: str, name: str, logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ParameterError(f"{owner}: task {name!r}: logits must be a [batch, classes] tensor, got {shape}")
    if not logits.requires_grad:
        raise ParameterError(f"{owner}: task {name!r}: the logits do not depend on the adapted parameters "
                             f"(computed without gradients, or with another model?)")
    return logits


def _moving_average(values: list[float], window: int) -> list[float]:
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out
