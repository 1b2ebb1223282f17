"""RegMean++ (Nguyen et al. 2025, arXiv 2508.03121; FusionBench 0.2.33's ``fusion_bench/method/regmean_plusplus``):
RegMean whose Gram matrices are collected layer by layer on the partially merged model's activations.

Every tensor outside the transformer layer stack (embeddings, their norm, a final norm, a pooler) is the mean of
the models. Then for each layer l in order, with layers 0 … l−1 already merged:

    X_i^l = the inputs each linear of model i's layer l receives when the merged model, with its layer l
            replaced by model i's, runs on task i's inputs (the layers after l are not run);
    linear W of layer l:  Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,  G_i = X_i^lᵀX_i^l / n,  G̃_i = α G_i + (1 − α) diag(G_i);
    other tensors of layer l: the mean,

so that the merged layer l is fitted to the inputs it will actually receive. The layer stack is every module
named ``<…>.<layers|layer|h|blocks|block>.<i>`` in module order (``nbmerge.method.tensor_names``); a model
without one is refused. Parameters and the closed form are RegMean's (``_regmean_solve``); the data pass runs
the model once per layer and task (up to that layer), on ``num_regmean_examples`` inputs in batches.

FusionBench's CLIP class differs outside the stack: it averages the embeddings and the pre-norm but keeps the
base's post-norm (``vision_model.post_layernorm``); here every tensor outside the stack is averaged. Defaults are
FusionBench's RegMean++ config (``configs/method/regmean_plusplus/clip_regmean_plusplus.yaml``, its only one:
α = 0.95, 256 examples, batch 32).
"""

from __future__ import annotations

import copy

from torch import nn

from nbmerge import hookimpl
from nbmerge.errors import ModelInputError
from nbmerge.method import BASE_REQUIRED, BuiltModule, MergeMethod, ModuleJob
from nbmerge.method.tensor_names import layer_index
from nbmerge_plugins.from_data._data_pass import input_grams, linear_modules, task_inputs
from nbmerge_plugins.from_data._regmean_solve import BATCH_SIZE, NUM_EXAMPLES, SEED, merged_state, ratio_param
from nbmerge_plugins.from_data._static_build import built, model_states

PARAMS = (NUM_EXAMPLES, ratio_param(0.95, "RegMean++ config (its only one, for CLIP)"), BATCH_SIZE, SEED)


def layer_paths(model: nn.Module) -> list[str]:
    """The module paths of the transformer layers, in module order (a layer nested in a layer is not one)."""
    paths: list[str] = []
    for path, _ in model.named_modules():
        index = path.rsplit(".", 1)[-1]
        is_layer = index.isdigit() and layer_index(path + ".") == int(index)
        if is_layer and not any(path.startswith(outer + ".") for outer in paths):
            paths.append(path)
    return paths


def build_regmean_plusplus(job: ModuleJob) -> BuiltModule:
    """Average outside the layer stack, then merge the layers one by one on the merged model's activations."""
    if job.trained_state is not None:  # a saved merge: the whole merged state
        return built(job.base, job.trained_state, "regmean_plusplus")
    params = job.params
    states = model_states(job, "regmean_plusplus")
    labels, state_list = list(states), list(states.values())
    work = copy.deepcopy(job.base).eval().requires_grad_(False)  # the partially merged model
    layers = layer_paths(work)
    if not layers:
        raise ModelInputError(f"regmean_plusplus: {type(work).__name__} has no transformer layer stack "
                              f"(modules named layers.<i>, layer.<i>, h.<i>, blocks.<i>); use regmean")
    inside = {path: [name for name in state_list[0] if name.startswith(path + ".")] for path in layers}
    in_stack = {name for names in inside.values() for name in names}
    outside = [name for name in state_list[0] if name not in in_stack]
    merged = merged_state(state_list, [{}] * len(labels), 0.0, outside, labels, "regmean_plusplus")
    work.load_state_dict(merged, strict=False)
    inputs = task_inputs(job, params["num_regmean_examples"], params["seed"], "regmean_plusplus")
    for done, path in enumerate(layers, start=1):
        layer = work.get_submodule(path)
        linears = {f"{path}.{name}" if name else path: module
                   for name, module in linear_modules(layer, "regmean_plusplus").items()}
        grams = []
        for label, state in zip(labels, state_list):
            work.load_state_dict({name: state[name] for name in inside[path]}, strict=False)
            grams.append(input_grams(work, job.tasks[label].logits, inputs[label], params["batch_size"],
                                     linears=linears, stop_after=layer, owner="regmean_plusplus"))
        layer_merged = merged_state(state_list, grams, params["reduce_non_diagonal_ratio"], inside[path], labels,
                                    "regmean_plusplus")
        work.load_state_dict(layer_merged, strict=False)
        merged.update(layer_merged)
        job.step_done(done, len(layers))
    return built(job.base, merged, "regmean_plusplus",
                 {"examples": {label: len(chosen) for label, chosen in inputs.items()}, "layers": len(layers)})


REGMEAN_PLUSPLUS = MergeMethod(
    name="regmean_plusplus",
    summary="RegMean++: RegMean layer by layer, each layer's Gram matrices on the partially merged model's "
            "activations",
    formula="layer l's linear W: Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ, G_i from model i's layer l on the inputs the merged "
            "layers 0…l−1 give it; other tensors: mean",
    params=PARAMS,
    merge_tensor=None,
    build_module=build_regmean_plusplus,
    min_models=2,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(REGMEAN_PLUSPLUS)
