"""Weighted average and simple average (model soup).

weighted_average: θ = Σ_i w_i θ_i; with ``normalize`` (default) w ← w / Σ_j w_j (Σ w = 0 is then an error).
simple_average: w_i = 1/n.
backbone_only: only tensors inside the transformer layer stack are averaged; embeddings, final norm and head
come from the base (or the first model when there is no base), so vocabularies may differ.
"""

import torch

from nbmerge import hookimpl
from nbmerge.errors import ParameterError
from nbmerge.method import BASE_OPTIONAL, MergeMethod, Param, TensorJob
from nbmerge.method.tensor_names import is_backbone
from nbmerge_plugins import native
from nbmerge_plugins._mergekit_arithmetic import linear

WEIGHTS = Param("weights", "floats", None, "one weight per model (default: equal weights)", per_model=True)
NORMALIZE = Param("normalize", "bool", True, "divide the weights by their sum")
BACKBONE_ONLY = Param("backbone_only", "bool", False,
                      "average only the transformer layers; embeddings, final norm and head come from the base")


def model_weights(params: dict, n_models: int) -> list[float]:
    """The per-model weights, normalised to sum to 1 when ``normalize`` is set (default: all equal)."""
    weights = list(params.get("weights") or [1.0] * n_models)
    if params.get("normalize", True):
        total = sum(weights)
        weights = [w / total for w in weights]
    return weights


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_i w_i t_i, accumulated in the tensors' (compute) dtype."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


def _average(job: TensorJob) -> torch.Tensor:
    weights = model_weights(job.params, len(job.models))
    if native.accepts(job, needs_base=False):
        return native.linear_combination(job, weights, with_base=False)
    return weighted_sum(job.upcast().models, weights)


def _check(params: dict, n_models: int, has_base: bool) -> None:
    if params["normalize"] and params["weights"] is not None and sum(params["weights"]) == 0:
        raise ParameterError("weighted_average: the weights sum to 0, so they cannot be normalised; "
                             "pass normalize=false or other weights")
    if has_base and not params["backbone_only"]:
        raise ParameterError("weighted_average: a base is used only with backbone_only=true (for the embeddings "
                             "and head); to average the base too, pass it among the models")


def _outside_backbone(name: str, params: dict) -> bool:
    return params["backbone_only"] and not is_backbone(name)


def _mergekit_linear(job: TensorJob) -> torch.Tensor:
    """mergekit's linear: the raw weights, divided by their sum after the float32 accumulation."""
    return linear(job.models, list(job.params["weights"] or [1.0] * len(job.models)), job.params["normalize"])


WEIGHTED_AVERAGE = MergeMethod(
    name="weighted_average",
    summary="Weighted average of the models' parameters",
    formula="θ = Σ_i w_i θ_i, with w ← w / Σ w when normalize",
    params=(WEIGHTS, NORMALIZE, BACKBONE_ONLY),
    merge_tensor=_average,
    min_models=1,
    base=BASE_OPTIONAL,
    copies_from_base=_outside_backbone,
    elementwise=True,
    stored_inputs=True,
    fused=lambda job: native.accepts(job, needs_base=False),
    check=_check,
    mergekit_tensor=_mergekit_linear,
    mergekit_refuses=lambda params: "backbone_only" if params["backbone_only"] else None,
)

SIMPLE_AVERAGE = MergeMethod(
    name="simple_average",
    summary="Uniform average of the models' parameters (model soup)",
    formula="θ = (1/n) Σ_i θ_i",
    params=(),
    merge_tensor=_average,
    min_models=1,
    elementwise=True,
    stored_inputs=True,
    fused=lambda job: native.accepts(job, needs_base=False),
)


@hookimpl
def register_merge_methods(register):
    register(WEIGHTED_AVERAGE)
    register(SIMPLE_AVERAGE)
