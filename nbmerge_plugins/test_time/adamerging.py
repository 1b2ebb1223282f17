"""AdaMerging (Yang et al. 2024, arXiv 2310.02575): task arithmetic whose coefficients are learned at test time.

With task vectors τ_k = θ_k − θ_0, every group g of tensors is merged as

    θ^g = θ_0^g + Σ_k λ_k^g τ_k^g,

one coefficient λ_k^g per task and group: ``granularity="task"`` (task-wise AdaMerging: one group), ``"layer"``
(the tensors of transformer layer i share one λ per task; the tensors outside the layer stack share one more), or
``"tensor"`` (one λ per task and parameter tensor: FusionBench's layer-wise AdaMerging, the default). λ starts at
``init_lambda`` (task arithmetic); Adam (``lr``, ``steps``) then minimises the summed entropy of every task's
predictions on ``batch_size`` unlabeled inputs of that task per step (``nbmerge_plugins.test_time._test_time``, the
machinery WE-MoE uses), through the merged weights; every ``select_every`` steps the merge is scored on the pool's
validation split and the best step's λ is kept. With ``clamp`` each λ is kept in [0, 1] after every step
(FusionBench's ``clamp_weights``). Only parameters are merged, as FusionBench does: buffers (BatchNorm running
statistics) and tensors no model changed stay θ_0.

The result is a plain module of the base's architecture holding the merged weights: a static merge, found on
the unlabeled test inputs. What is saved and reloaded (``BuiltModule.trained``) is λ alone, [K tasks, G groups].
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from nbmerge import hookimpl
from nbmerge.errors import ModelInputError
from nbmerge.method import BASE_REQUIRED, BuiltModule, MergeMethod, ModuleJob, Param, check_fits
from nbmerge.method.tensor_names import layer_index
from nbmerge_plugins.test_time._test_time import (OBJECTIVES, SELECT_EVERY, AdaptationTask, adaptation_record, minimise,
                                        shuffled_batches)

COEFFICIENTS = "merging_coefficients"
GRANULARITIES = ("task", "layer", "tensor")

PARAMS = (
    Param("granularity", "choice", "tensor", "one coefficient per task ('task'), per task and transformer layer "
          "('layer'), or per task and tensor ('tensor', FusionBench's layer-wise)", choices=GRANULARITIES),
    Param("init_lambda", "float", 0.3, "every coefficient's starting value (task arithmetic with this λ)"),
    Param("lr", "float", 1e-3, "Adam learning rate of the coefficients", low=0.0, low_inclusive=False),
    Param("steps", "int", 1000, "test-time adaptation steps (0: task arithmetic with init_lambda)", low=0),
    Param("batch_size", "int", 16, "unlabeled inputs per task per step", low=1),
    Param("clamp", "bool", False, "keep every coefficient in [0, 1] after each step"),
    Param("objective", "choice", "entropy", "what adaptation minimises per task: 'entropy' of the predictions "
          "(the paper's) or 'information_max' (entropy − entropy of the batch's mean prediction)",
          choices=OBJECTIVES, grid=OBJECTIVES),
    SELECT_EVERY,
    Param("seed", "int", 0, "seeds the order of the unlabeled batches", low=0),
)


class AdaMergedModule(nn.Module):
    """The base's architecture run with θ^g = θ_0^g + Σ_k λ_k^g τ_k^g recomputed from ``coefficients`` at every
    forward call (``torch.func.functional_call``), so that gradients reach λ. Only λ requires grad."""

    def __init__(self, base: nn.Module, models: dict[str, nn.Module], granularity: str, init_lambda: float):
        super().__init__()
        self.template = copy.deepcopy(base).eval().requires_grad_(False)
        base_state = {name: tensor.detach() for name, tensor in base.state_dict().items()}
        model_states = {name: _state_of(name, model, base_state) for name, model in models.items()}
        parameters = {name for name, _ in base.named_parameters(remove_duplicate=False)}
        self.merged_names = [name for name, tensor in base_state.items() if name in parameters
                             and tensor.is_floating_point()
                             and any(not torch.equal(state[name], tensor) for state in model_states.values())]
        self.base_tensors = {name: base_state[name] for name in self.merged_names}
        self.task_vectors = {name: torch.stack([state[name] - base_state[name] for state in model_states.values()])
                             for name in self.merged_names}
        self.group_of = groups(self.merged_names, granularity)
        group_count = max(self.group_of.values(), default=-1) + 1
        self.coefficients = nn.Parameter(torch.full((len(model_states), group_count), float(init_lambda)))

    def merged_state(self) -> dict[str, torch.Tensor]:
        """θ_0 + Σ_k λ_k^g τ_k for every tensor some model changed (differentiable with respect to λ)."""
        merged = {}
        for name in self.merged_names:
            vectors = self.task_vectors[name]
            weights = self.coefficients[:, self.group_of[name]].to(vectors.dtype)
            merged[name] = self.base_tensors[name] + torch.tensordot(weights, vectors, dims=1)
        return merged

    def forward(self, *args, **kwargs):
        return functional_call(self.template, self.merged_state(), args, kwargs, strict=False)

    def merged_module(self) -> nn.Module:
        """A plain copy of the base holding the current merge (no per-call merging, no gradients)."""
        module = copy.deepcopy(self.template)
        with torch.no_grad():
            module.load_state_dict(self.merged_state(), strict=False)
        return module.eval()


def groups(names: list[str], granularity: str) -> dict[str, int]:
    """The coefficient group of every merged tensor: 0 for all ("task"); one per layer index, the tensors outside
    the layer stack last ("layer"); one per tensor ("tensor")."""
    if granularity == "task":
        return {name: 0 for name in names}
    if granularity == "tensor":
        return {name: index for index, name in enumerate(names)}
    layers = sorted({layer_index(name) for name in names} - {None})
    position = {layer: index for index, layer in enumerate(layers)}
    return {name: position.get(layer_index(name), len(layers)) for name in names}


def build_adamerging(job: ModuleJob) -> BuiltModule:
    """Merge job.models into job.base with learned coefficients (or those of job.trained_state)."""
    params = job.params
    merging = AdaMergedModule(job.base, job.models, params["granularity"], params["init_lambda"])
    history, record = None, {}
    if job.trained_state is not None:
        if COEFFICIENTS not in job.trained_state:  # an exported whole state (export_module): every tensor
            return _whole(merging, job.trained_state)
        check_fits(job.trained_state, {COEFFICIENTS: merging.coefficients.shape}, "adamerging: the saved state",
                   noun="tensor", allow_extra=False)
        merging.coefficients.data.copy_(job.trained_state[COEFFICIENTS])
    elif params["steps"] > 0:
        tasks = {name: AdaptationTask(job.tasks[name].logits,
                                      shuffled_batches(job.tasks[name].inputs, params["batch_size"],
                                                       params["seed"] * 1000 + index))
                 for index, name in enumerate(job.models)}

        def after_step(done: int, _loss: float) -> None:
            if params["clamp"]:
                with torch.no_grad():
                    merging.coefficients.clamp_(0.0, 1.0)
            job.step_done(done, params["steps"])

        history = minimise(merging, [merging.coefficients], tasks, lr=params["lr"], steps=params["steps"],
                           objective=params["objective"], owner="adamerging", progress=job.progress,
                           on_step=after_step, select=_selector(merging, job.validation_score),
                           select_every=params["select_every"])
        record = adaptation_record(history)
    trained = {COEFFICIENTS: merging.coefficients.detach().clone()}
    return BuiltModule(merging.merged_module(), trained, history, record)


def _selector(model: nn.Module, validation_score):
    return None if validation_score is None else (lambda: validation_score(model))


def _whole(merging: AdaMergedModule, state: dict[str, torch.Tensor]) -> BuiltModule:
    module = copy.deepcopy(merging.template)
    check_fits(state, {name: t.shape for name, t in module.state_dict().items()}, "adamerging: the exported state",
               noun="tensor", allow_extra=False)
    module.load_state_dict(state)
    return BuiltModule(module.eval(), dict(state))


def _state_of(name: str, model: nn.Module, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    check_fits(state, {key: tensor.shape for key, tensor in base_state.items()},
               f"adamerging: fine-tuned model {name!r}", noun="tensor", allow_extra=False,
               hint=" (it must have the base's architecture)")
    for key, tensor in base_state.items():
        if not tensor.is_floating_point() and not torch.equal(state[key], tensor):
            raise ModelInputError(f"adamerging: non-floating tensor {key!r} of model {name!r} differs from the "
                                  f"base's; it cannot be merged")
    return state


ADAMERGING = MergeMethod(
    name="adamerging",
    summary="AdaMerging: task arithmetic with per-task (and per-layer) coefficients learned on unlabeled inputs",
    formula="θ^g = θ_0^g + Σ_k λ_k^g τ_k^g, λ minimising Σ_tasks entropy of the predictions",
    params=PARAMS,
    merge_tensor=None,
    build_module=build_adamerging,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(ADAMERGING)
