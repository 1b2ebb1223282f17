"""WE-MoE, weight-ensembling mixture of experts (Tang et al. 2024, arXiv 2402.00433), with test-time adaptation.

Every transformer layer's MLP (every convolution of a MobileNet/EfficientNet) becomes a mixture: the frozen
pretrained weight plus the frozen task vectors of the fine-tuned models, weighted per input by a router,
W = W_0 + Σ_e r_e τ_e (see ``layers``); every
other tensor is task arithmetic θ_0 + init_lambda Σ_e τ_e. The routers (fc2(ReLU(fc1(h))), H→H→E, N(0, 0.01²)
weights, fc2 bias init_lambda) are then trained alone for ``steps`` Adam steps (``lr``) to minimise the summed
entropy of every task's predictions on ``batch_size`` unlabeled inputs of that task per step
(``nbmerge_plugins.test_time._test_time``; ``objective="information_max"`` subtracts the entropy of each batch's mean
prediction, against the collapse of few-class tasks onto one class). Routing is the same in adaptation and in use:
per sample (the paper's), or with ``batch_reduce`` each batch by its mean routing vector, in adaptation and in use
alike (what FusionBench's reported numbers effectively use: its batches hold one task's inputs, and so do the task
pools' evaluation batches). Every ``select_every`` steps the model is scored on the pool's validation split and the
best step's routers are kept (0: the last step, no labels used). ``steps=0`` keeps the initial routers
(≈ task arithmetic). Defaults are the paper's; FusionBench's configs/method/wemoe/weight_ensembling_moe.yaml has
the same λ₀, lr, steps and batch size.

The method builds a module, so it runs through ``nbmerge.merge("we_moe", {task: model}, base=..., pool=...)``.
"""

from __future__ import annotations

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, BuiltModule, MergeMethod, ModuleJob, Param, check_fits
from nbmerge_plugins.test_time._test_time import OBJECTIVES, SELECT_EVERY, AdaptationTask, adaptation_record, shuffled_batches
from nbmerge_plugins.test_time.we_moe.adapt import adapt
from nbmerge_plugins.test_time.we_moe.layers import router_parameters, upcycle

PARAMS = (
    Param("init_lambda", "float", 0.3, "initial routing weight of every task vector, and λ of the task "
          "arithmetic used outside the MLPs"),
    Param("router_hidden_layers", "int", 2, "router depth: 0 = a learned constant per layer, 1 = H→E, "
          "2 = H→H→E (the paper's)", low=0, high=4),
    Param("lr", "float", 1e-4, "Adam learning rate of the routers", low=0.0, low_inclusive=False),
    Param("steps", "int", 1000, "test-time adaptation steps (0: no adaptation)", low=0),
    Param("batch_size", "int", 16, "unlabeled inputs per task per step", low=1),
    Param("batch_reduce", "bool", False, "route each batch by its mean routing vector, in adaptation and in use "
          "(FusionBench's recipe over single-task batches, several times faster); false: every sample by itself "
          "(the paper's)"),
    Param("objective", "choice", "entropy", "what adaptation minimises per task: 'entropy' of the predictions "
          "(the paper's), or 'information_max' = entropy − entropy of the batch's mean prediction, which keeps "
          "few-class tasks from collapsing onto one class", choices=OBJECTIVES, grid=OBJECTIVES),
    SELECT_EVERY,
    Param("seed", "int", 0, "seeds the routers' initialisation and the order of the unlabeled batches", low=0),
)


def build_we_moe(job: ModuleJob) -> BuiltModule:
    """Upcycle job.base with job.models as experts, then adapt the routers (or load job.trained_state)."""
    params = job.params
    model = upcycle(job.base, job.models, init_lambda=params["init_lambda"],
                    router_hidden_layers=params["router_hidden_layers"], batch_reduce=params["batch_reduce"],
                    seed=params["seed"])
    history, record = None, {}
    if job.trained_state is not None:
        load_routers(model, job.trained_state)
    elif params["steps"] > 0:
        tasks = {name: AdaptationTask(job.tasks[name].logits,
                                      shuffled_batches(job.tasks[name].inputs, params["batch_size"],
                                                       params["seed"] * 1000 + index))
                 for index, name in enumerate(job.models)}
        history = adapt(model, tasks, lr=params["lr"], steps=params["steps"], objective=params["objective"],
                        progress=job.progress,
                        on_step=lambda done, _loss: job.step_done(done, params["steps"]),
                        select=None if job.validation_score is None else lambda: job.validation_score(model),
                        select_every=params["select_every"])
        record = adaptation_record(history)
    trained = {name: parameter.detach().clone() for name, parameter in router_parameters(model).items()}
    return BuiltModule(model, trained, history, record)


def load_routers(model, state) -> None:
    """Copy saved router tensors into an upcycled model; the names and shapes must match exactly.

    A whole exported state (every tensor of an upcycled model) is loaded whole, experts included.
    """
    parameters = router_parameters(model)
    if len(state) > len(parameters):
        _load_whole(model, state)
        return
    check_fits(state, {name: p.shape for name, p in parameters.items()}, "we_moe: the saved routers",
               noun="router tensor", allow_extra=False)
    for name, parameter in parameters.items():
        parameter.data.copy_(state[name])


def _load_whole(model, state) -> None:
    check_fits(state, {name: t.shape for name, t in model.state_dict().items()}, "we_moe: the exported state",
               noun="tensor", allow_extra=False)
    model.load_state_dict(state)


WE_MOE = MergeMethod(
    name="we_moe",
    summary="Weight-ensembling MoE: routed MLP task vectors, routers adapted on unlabeled task inputs",
    formula="MLP linears (convolutions in a convnet): W = W_0 + Σ_e r_e(x) τ_e, r = router(h) averaged over "
            "tokens (pixels); elsewhere θ_0 + λ Σ_e τ_e; routers minimise Σ_tasks entropy, step chosen on validation",
    params=PARAMS,
    merge_tensor=None,
    build_module=build_we_moe,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(WE_MOE)
