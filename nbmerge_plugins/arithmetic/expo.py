"""ExPO (Zheng et al. 2024): extrapolate from the base (SFT) model through the fine-tuned (aligned) model.

θ = θ_r + a · (θ_r − θ_0), where θ_r is the fine-tuned model, or the simple average of several (with
``drop_rate`` > 0, the DARE average θ_0 + (1/n) Σ_i DARE(τ_i)). The factor a is ``alpha`` (default 0.1), times
``attention_scaling`` for attention projections. By default every tensor is extrapolated (the seed's formula and
FusionBench's ExPOAlgorithm). The options of FusionBench's ExPOAlgorithmForLlama generalise to any transformer
through tensor-name filters (its defaults: ``on_linear_bias``, ``on_norm``, ``on_embedding`` false,
``only_on_backbone`` true, ``attention_scaling`` 0.5); a tensor that is not extrapolated is θ_r:
  - inside the layer stack, layers [fix_first_n_layers, L − fix_last_n_layers) are extrapolated ("half" = L // 2);
    2-D weights when ``on_linear_weights``, biases when ``on_linear_bias``, other tensors (norms) when ``on_norm``;
  - embedding tables when ``on_embedding``;
  - other tensors outside the layer stack (head, final norm) only when ``only_on_backbone`` is false, by the
    same weight / bias / norm filters. A model with no recognised layer stack is all backbone.
``magnitude_sparsity_ratio`` r: in each row of a 2-D delta, the int(cols · r) smallest |δ| are zeroed first.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob
from nbmerge.method.tensor_names import is_attention, is_bias, is_embedding, is_linear_weight
from nbmerge_plugins._task_vectors import RESCALE, SEED, drop_and_rescale, keep_mask

PARAMS = (
    Param("alpha", "float", 0.1, "extrapolation factor α", grid=(0.1, 0.3, 0.5, 1.0)),
    Param("attention_scaling", "float", 1.0, "attention projections use α · attention_scaling"),
    Param("on_linear_weights", "bool", True, "extrapolate 2-D weights"),
    Param("on_linear_bias", "bool", True, "extrapolate biases"),
    Param("on_norm", "bool", True, "extrapolate the other tensors of a layer (norm weights)"),
    Param("on_embedding", "bool", True, "extrapolate embedding tables"),
    Param("only_on_backbone", "bool", False, "leave the head and final norm at θ_r"),
    Param("fix_first_n_layers", "layers", 0, "leave the first n layers at θ_r (a count or 'half')"),
    Param("fix_last_n_layers", "layers", 0, "leave the last n layers at θ_r (a count or 'half')"),
    Param("magnitude_sparsity_ratio", "float", None, "zero this fraction of the smallest |δ| in each row first",
          low=0.0, high=1.0, high_inclusive=False),
    Param("drop_rate", "float", 0.0, "DARE variant: θ_r is the DARE average with this drop rate",
          low=0.0, high=1.0, high_inclusive=False),
    RESCALE,
    SEED,
)


def _layer_count(value, num_layers: int) -> int:
    return num_layers // 2 if value == "half" else value


def extrapolation_factor(job: TensorJob, ndim: int) -> float:
    """a for this tensor, 0 where the filters leave it at θ_r."""
    params, name = job.params, job.name
    if is_embedding(name):
        selected = params["on_embedding"]
    else:
        in_stack = job.layer is not None or job.num_layers == 0
        if in_stack and job.layer is not None:
            first = _layer_count(params["fix_first_n_layers"], job.num_layers)
            last = job.num_layers - _layer_count(params["fix_last_n_layers"], job.num_layers)
            in_stack = first <= job.layer < last
        elif not in_stack:
            in_stack = not params["only_on_backbone"]
        if not in_stack:
            return 0.0
        if is_linear_weight(name, ndim):
            selected = params["on_linear_weights"]
        elif is_bias(name):
            selected = params["on_linear_bias"]
        else:
            selected = params["on_norm"]
    if not selected:
        return 0.0
    return params["alpha"] * (params["attention_scaling"] if is_attention(name) else 1.0)


def sparsify_rows(delta: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the int(cols · ratio) smallest |δ| of every row of a 2-D delta."""
    drop = int(delta.shape[-1] * ratio)
    if delta.dim() != 2 or drop == 0:
        return delta
    smallest = delta.abs().topk(drop, dim=-1, largest=False).indices
    return delta.scatter(-1, smallest, 0.0)


def _expo(job: TensorJob) -> torch.Tensor:
    params = job.params
    if params["drop_rate"] > 0:
        sparse = [drop_and_rescale(model - job.base, keep_mask(job, i, params["drop_rate"]), params["drop_rate"],
                                   params["rescale"]) for i, model in enumerate(job.models)]
        reference = job.base + torch.stack(sparse).mean(0)
    else:
        reference = torch.stack(job.models).mean(0)
    factor = extrapolation_factor(job, reference.dim())
    if factor == 0.0:
        return reference
    delta = reference - job.base
    if params["magnitude_sparsity_ratio"]:
        delta = sparsify_rows(delta, params["magnitude_sparsity_ratio"])
    return reference + factor * delta


EXPO = MergeMethod(
    name="expo",
    summary="ExPO: extrapolate beyond the fine-tuned model, away from the base",
    formula="θ = θ_r + α (θ_r − θ_0), θ_r = mean_i θ_i; per-tensor filters select where α applies",
    params=PARAMS,
    merge_tensor=_expo,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(EXPO)
