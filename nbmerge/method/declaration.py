"""What a merge method declares once, and what its per-tensor kernel (or its module builder) receives.

A plugin builds a ``MergeMethod`` and hands it to the ``register`` callback of the ``register_merge_methods``
hook. The engine, the CLI flags, the magic's arguments and the widget's controls are all derived from it.
A method never opens files and never prints: its kernel receives a ``TensorJob`` and returns one tensor.

Most methods merge tensor by tensor. A method that instead builds a module from whole models and trains part
of it on unlabeled task inputs (test-time adaptation) declares ``build_module`` in place of ``merge_tensor``:
it receives a ``ModuleJob`` and returns a ``BuiltModule``; ``nbmerge.merge`` then needs a task pool.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from nbmerge.errors import ModelInputError, ParameterError, shown
from nbmerge.method.params import Param, holds_schedule, is_schedule, schedule_corners, validate_params

BASE_REQUIRED, BASE_OPTIONAL, BASE_UNUSED = "required", "optional", "unused"


@dataclass
class TensorJob:
    """One tensor to merge: the same-named tensor of every model, in the compute dtype on the compute device.

    ``models`` and ``base`` belong to the caller and may alias user memory: a kernel never modifies them in place.
    ``params`` are the validated parameters with schedules already resolved for this tensor.
    ``empty(shape, dtype)`` gives scratch or result memory on the job's device (reused across tensors by the
    engine, which never lends memory a live tensor still views); it defaults to ``torch.empty``.
    ``out_dtype``: the dtype the merged tensor is stored in; a kernel may return its result in it directly.
    For a method declared ``stored_inputs``, models and base on the CPU arrive in their stored floating dtype
    (float32, bfloat16 or float16; float64 inputs still make a float64 job): ``upcast()`` gives the job in the
    compute dtype for code that needs it.
    """

    name: str
    models: list[torch.Tensor]
    base: torch.Tensor | None
    params: dict[str, Any]
    layer: int | None
    num_layers: int
    stage_results: dict[str, Any] = field(default_factory=dict)
    empty: Callable[..., torch.Tensor] | None = None
    out_dtype: torch.dtype | None = None
    arithmetic_dtype: torch.dtype | None = None  # set: mergekit's arithmetic in this dtype (``mergekit_tensor``)

    def __post_init__(self):
        if self.empty is None:
            device = self.base.device if self.base is not None else self.models[0].device
            self.empty = lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype, device=device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The merge's compute dtype when it was given one (``arithmetic_dtype``), else float64 when some input is
        float64, else float32."""
        if self.arithmetic_dtype is not None:
            return self.arithmetic_dtype
        inputs = self.models + ([self.base] if self.base is not None else [])
        return torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32

    def upcast(self) -> "TensorJob":
        """This job with every input in the compute dtype (itself when they already are)."""
        compute = self.compute_dtype

        def converted(tensor):
            return tensor if tensor is None or tensor.dtype == compute else \
                self.empty(tensor.shape, compute).copy_(tensor)

        if all(t.dtype == compute for t in self.models) and (self.base is None or self.base.dtype == compute):
            return self
        return replace(self, models=[converted(t) for t in self.models], base=converted(self.base))

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ_0 for every model."""
        return [model - self.base for model in self.models]

    def random_key(self, seed: int, model_index: int) -> int:
        """A 64-bit key from (seed, tensor name, model index) for counter-based draws: a tensor's random numbers
        depend on nothing else (not on processing order, device or the other tensors)."""
        digest = hashlib.blake2b(f"{seed}\0{self.name}\0{model_index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Stage:
    """A whole-model pass a method needs before merging (e.g. one global trim threshold per task vector).

    ``run(stream, params, wide)`` calls ``stream(visit)`` ``passes`` times; each call streams every merged tensor
    as a ``TensorJob`` (without stage results) to ``visit``. ``wide`` is true when some merged tensor is computed
    in float64. What ``run`` returns is given to the kernel as ``job.stage_results[name]``. ``passes`` is a count
    or a function of (params, wide); ``applies(params)`` says whether this merge needs the stage at all.
    """

    name: str
    run: Callable[[Callable[[Callable[[TensorJob], None]], None], dict, bool], Any]
    passes: int | Callable[[dict, bool], int]
    applies: Callable[[dict], bool] = lambda params: True

    def pass_count(self, params: dict, wide: bool) -> int:
        return self.passes(params, wide) if callable(self.passes) else self.passes


@dataclass(frozen=True)
class UnlabeledTask:
    """One task's unlabeled inputs (never its labels) and how a model scores them.

    ``logits(module, inputs)`` returns [len(inputs), classes] logits, differentiable with respect to the module.
    """

    name: str
    inputs: Sequence[Any]
    logits: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor]


@dataclass
class ModuleJob:
    """What a module-building method receives: whole models instead of one tensor at a time.

    base and models (fine-tuned, by name) are the caller's modules: a builder copies, never modifies them.
    tasks: per model name, the unlabeled inputs of that model's task. trained_state: the tensors a previous
    build trained (``BuiltModule.trained``), to rebuild the same module without training again.
    A builder that trains calls ``step_done(done, total)`` after each step: it reports progress to the caller
    and raises MergeCancelled when the caller asked to stop (the builder lets it propagate).
    ``validation_score(module)``: the average accuracy (%) of a candidate module over the job's tasks on the
    pool's labelled validation split, for choosing a training step as every other method's hyperparameters are
    chosen (None when the pool has no validation split).
    """

    base: torch.nn.Module
    models: dict[str, torch.nn.Module]
    params: dict[str, Any]
    tasks: dict[str, UnlabeledTask]
    trained_state: dict[str, torch.Tensor] | None = None
    progress: bool = True
    step_done: Callable[[int, int], None] = lambda done, total: None
    validation_score: Callable[[torch.nn.Module], float] | None = None


@dataclass
class BuiltModule:
    """A module-building method's result: the module, the tensors it trained (by state-dict name; what is saved
    and reloaded), a training history (anything with a readable ``str``; None when nothing was trained), and
    ``record``: JSON-able facts about this build for the recipe (e.g. steps done when interrupted)."""

    module: torch.nn.Module
    trained: dict[str, torch.Tensor]
    history: Any = None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method's declaration.

    name: the registered name; summary: one line; formula: the formula in words and symbols (shown in help);
    params: the typed parameters; min_models / max_models: how many models it takes (base not counted);
    base: whether it needs a base (pretrained) model: "required", "optional" or "unused";
    merge_tensor: the per-tensor kernel; stages: whole-model passes run first;
    build_module: instead of merge_tensor, builds a module from whole models and unlabeled task data;
    copies_from_base(name, params): True where a tensor is taken unmerged from the base, or from the first model
    when there is no base (e.g. backbone-only);
    stored_inputs: on the CPU the kernel takes float32 jobs' inputs in their stored dtype (``TensorJob``) and
    converts what it needs itself (a fused kernel reading bfloat16 saves the engine's conversion pass);
    elementwise: the kernel is position-wise (each output entry depends only on the inputs' entries at the same
    position, and on parameters resolved per tensor), so the engine may call it on 1-D slices of a tensor (on the
    CPU it does, for tensors over its chunk size, so that the kernel's temporaries stay small);
    fused(job): True where the kernel runs this job as one streaming pass with no temporaries the size of the
    tensor (a fused native kernel): an elementwise method then gets whole tensors, not slices (no per-slice
    call, and its result is the output buffer itself instead of being copied into one);
    check(params, n_models, has_base): cross-parameter checks beyond each parameter's own range;
    mergekit_tensor: the kernel as mergekit 0.1.5 computes it, op for op, in the job's ``arithmetic_dtype``, run
    instead of merge_tensor when a merge is given a compute dtype (``nbmerge.merge(compute_dtype=...)``, every
    mergekit recipe); mergekit_refuses(params): why these parameters have no mergekit counterpart (None: they do).
    """

    name: str
    summary: str
    formula: str
    params: tuple[Param, ...]
    merge_tensor: Callable[[TensorJob], torch.Tensor] | None
    min_models: int = 2
    max_models: int | None = None
    base: str = BASE_UNUSED
    stages: tuple[Stage, ...] = ()
    copies_from_base: Callable[[str, dict], bool] | None = None
    elementwise: bool = False
    stored_inputs: bool = False
    fused: Callable[[TensorJob], bool] | None = None
    check: Callable[[dict, int, bool], None] | None = None
    build_module: Callable[[ModuleJob], BuiltModule] | None = None
    plugin: str = ""
    mergekit_tensor: Callable[[TensorJob], torch.Tensor] | None = None
    mergekit_refuses: Callable[[dict], str | None] | None = None

    def __post_init__(self):
        if (self.merge_tensor is None) == (self.build_module is None):
            raise ValueError(f"merge method {self.name!r}: declare exactly one of merge_tensor and build_module")

    def validate(self, given: Mapping[str, Any], n_models: int, has_base: bool) -> dict:
        """Validate user parameters and the model count before any tensor is read; return canonical params."""
        self.check_inputs(n_models, has_base)
        params = validate_params(self.name, self.params, given)
        for param in self.params:
            value = params[param.name]
            if param.per_model and isinstance(value, tuple) and not is_schedule(value) and len(value) != n_models:
                raise ParameterError(f"{self.name}: parameter {shown(param.name)} has {len(params[param.name])} values "
                                     f"for {n_models} models")
        varying = [p.name for p in self.params if p.kind != "schedule" and holds_schedule(params[p.name])]
        if varying and self.build_module is not None:
            raise ParameterError(f"{self.name}: {', '.join(map(repr, varying))} must be one value (this method "
                                 f"builds a module from whole models; values over layers or tensors do not apply)")
        for stage in self.stages:
            if varying and stage.applies(params):
                raise ParameterError(f"{self.name}: {', '.join(map(repr, varying))} varies over layers or tensors, "
                                     f"but this setting runs the whole-model pass {shown(stage.name)}, which needs one "
                                     f"value for the whole model; give one number per model")
        if self.check is not None:
            for corner in _corners(params, varying):
                self.check(corner, n_models, has_base)
        return params

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Raise ParameterError unless this method merges ``n_models`` models (besides the base), with a base or
        without one as given: the rules of ``min_models``, ``max_models`` and ``base``."""
        if self.base == BASE_REQUIRED and not has_base:
            raise ParameterError(f"{self.name}: needs a base (pretrained) model: pass base=...")
        if self.base == BASE_UNUSED and has_base:
            raise ParameterError(f"{self.name}: takes no base model (it merges the models as they are); "
                                 f"drop base=... or choose a method that uses one")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            wanted = (f"exactly {self.min_models}" if self.max_models == self.min_models
                      else f"at least {self.min_models}" if self.max_models is None
                      else f"{self.min_models} to {self.max_models}")
            raise ParameterError(f"{self.name}: takes {wanted} model(s) besides the base, got {n_models}")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "summary": self.summary,
            "formula": self.formula,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "base": self.base,
            "stages": [stage.name for stage in self.stages],
            "elementwise": self.elementwise,
            "builds_module": self.build_module is not None,
            "params": [p.describe() for p in self.params],
        }


def check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], what: str,
               noun: str = "weight", allow_extra: bool = True, hint: str = "") -> None:
    """Raise ModelInputError naming the first tensor of ``expected`` (name -> shape) that ``state`` lacks or holds
    in another shape, or (unless ``allow_extra``) the first name ``state`` holds that ``expected`` has not."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise ModelInputError(f"{what} lacks {len(missing)} {noun}(s), e.g. {shown(missing[0])}{hint}")
    extra = [] if allow_extra else [key for key in state if key not in expected]
    if extra:
        raise ModelInputError(f"{what} holds {len(extra)} unexpected tensor(s), e.g. {shown(extra[0])}{hint}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ModelInputError(f"{what}: tensor {shown(key)} has shape {tuple(state[key].shape)}, expected "
                                  f"{tuple(shape)}")


def _corners(params: dict, varying: list[str]) -> list[dict]:
    """The parameters with every varying value at each combination of its extremes (its smallest and largest
    anchors): a cross-parameter check that holds at those holds wherever the values interpolate between them.
    Past 10 varying values, all-smallest and all-largest only."""
    if not varying:
        return [params]
    extremes = [schedule_corners(params[name]) for name in varying]
    combos = itertools.product(*extremes) if len(varying) <= 10 else zip(*extremes)
    return [{**params, **dict(zip(varying, combo))} for combo in combos]
