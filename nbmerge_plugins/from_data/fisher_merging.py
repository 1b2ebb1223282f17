"""Fisher merging (Matena & Raffel 2022, arXiv 2111.09832; FusionBench 0.2.33's ``fusion_bench/method/
fisher_merging``): every parameter the average of the models' values weighted per entry by their diagonal Fisher
information,

    θ = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε),

F_i the diagonal Fisher of model i on ``num_fisher_examples`` inputs of its own task, of the model's own
predictive distribution (no label is read; ``_data_pass.fisher_diagonals``), ε = ``minimal_fisher_weight``.
With ``normalize_fisher_weight`` the models are weighted by the inverse of their Fisher's global L2 norm,
c_i = (1/K) · (‖F_i‖ + ε)⁻¹ / Σ_j (‖F_j‖ + ε)⁻¹ (‖F_i‖ over every merged parameter of model i), else c_i = 1/K.
Floating buffers are averaged; integer tensors must agree and are copied. The base gives the architecture, none
of its values (``_static_build``).

``estimate="expected"`` (the paper's) computes F_i = (1/N) Σ_x Σ_c p_c(x) (∇ log p_c(x))² exactly, one backward
per example and class; ``"fusionbench"`` is FusionBench's estimator, the squared gradient of
Σ_{x∈batch} Σ_c √p_c(x) log p_c(x) per batch of ``batch_size``, summed over batches, over N: cheaper, with cross
terms between classes and examples, and dependent on the batch size. Defaults are FusionBench's
(``configs/method/fisher_merging/fisher_merging.yaml``; batch size 32 from its CLIP config).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, BuiltModule, MergeMethod, ModuleJob, Param
from nbmerge_plugins.from_data._data_pass import FISHER_ESTIMATES, fisher_diagonals, per_model_statistics, task_inputs
from nbmerge_plugins.from_data._static_build import agreed_integer_tensor, built, model_states

PARAMS = (
    Param("num_fisher_examples", "int", 256, "inputs per task whose gradients give its model's Fisher", low=1),
    Param("normalize_fisher_weight", "bool", True, "weight each model by the inverse of its Fisher's global L2 "
          "norm, so that no model dominates by the scale of its gradients"),
    Param("minimal_fisher_weight", "float", 1e-6, "ε added to every Fisher entry (and norm): where no model has "
          "information the merge is the plain mean", low=0.0, low_inclusive=False),
    Param("estimate", "choice", "expected", "'expected': the exact Fisher Σ_c p_c (∇ log p_c)², per example (the "
          "paper's); 'fusionbench': FusionBench's squared gradient of a batch's Σ √p log p (cheaper, depends on "
          "batch_size)", choices=FISHER_ESTIMATES),
    Param("batch_size", "int", 32, "inputs per backward pass of the 'fusionbench' estimate ('expected' runs one "
          "input at a time)", low=1),
    Param("seed", "int", 0, "seeds which inputs of each task are drawn, and their order", low=0),
)


def model_coefficients(fishers: Sequence[Mapping[str, torch.Tensor]], normalize: bool,
                       epsilon: float) -> list[float]:
    """c_i = 1/K, or with ``normalize`` (1/K) · (‖F_i‖ + ε)⁻¹ / Σ_j (‖F_j‖ + ε)⁻¹."""
    count = len(fishers)
    if not normalize:
        return [1.0 / count] * count
    norms = [math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values())) for fisher in fishers]
    inverses = [1.0 / (norm + epsilon) for norm in norms]
    return [inverse / sum(inverses) / count for inverse in inverses]


def fisher_weighted(values: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], coefficients: Sequence[float],
                    epsilon: float) -> torch.Tensor:
    """Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε), computed in float32 or wider, in the first value's dtype."""
    wide = torch.promote_types(values[0].dtype, torch.float32)
    weights = [c * (f.to(wide) + epsilon) for c, f in zip(coefficients, fishers)]
    numerator = sum(w * v.to(wide) for w, v in zip(weights, values))
    return (numerator / sum(weights)).to(values[0].dtype)


def build_fisher_merging(job: ModuleJob) -> BuiltModule:
    """Each model's diagonal Fisher on its task's inputs, then the Fisher-weighted average tensor by tensor."""
    if job.trained_state is not None:  # a saved merge: the whole merged state
        return built(job.base, job.trained_state, "fisher_merging")
    params = job.params
    states = model_states(job, "fisher_merging")
    inputs = task_inputs(job, params["num_fisher_examples"], params["seed"], "fisher_merging")
    fishers = per_model_statistics(job, inputs, lambda model, logits, chosen: fisher_diagonals(
        model, logits, chosen, params["batch_size"], params["estimate"]))
    epsilon = params["minimal_fisher_weight"]
    coefficients = model_coefficients(fishers, params["normalize_fisher_weight"], epsilon)
    labels, state_list = list(states), list(states.values())
    merged = {}
    for name in state_list[0]:
        values = [state[name] for state in state_list]
        if not values[0].is_floating_point():
            merged[name] = agreed_integer_tensor(name, values, labels, "fisher_merging")
        elif name in fishers[0]:
            merged[name] = fisher_weighted(values, [fisher[name] for fisher in fishers], coefficients, epsilon)
        else:  # a buffer: no gradient, no Fisher
            merged[name] = fisher_weighted(values, [torch.zeros_like(v) for v in values], [1.0] * len(values), 1.0)
    return built(job.base, merged, "fisher_merging",
                 {"examples": {label: len(chosen) for label, chosen in inputs.items()}, "model_coefficients": [round(c, 6) for c in coefficients]})


FISHER_MERGING = MergeMethod(
    name="fisher_merging",
    summary="Fisher merging: each parameter the models' average weighted by their diagonal Fisher on their tasks' "
            "inputs",
    formula="θ = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε), F_i = E_x Σ_c p_c (∇ log p_c)² of model i on task i; "
            "c_i ∝ 1/‖F_i‖ when normalised",
    params=PARAMS,
    merge_tensor=None,
    build_module=build_fisher_merging,
    min_models=2,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(FISHER_MERGING)
