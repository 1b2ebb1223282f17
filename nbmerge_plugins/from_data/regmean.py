"""RegMean (Jin et al. 2023, arXiv 2212.09849; FusionBench 0.2.33's ``fusion_bench/method/regmean``): every
linear layer merged in closed form from the Gram matrices of its inputs,

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,    G_i = X_iᵀX_i / n_i,    G̃_i = α G_i + (1 − α) diag(G_i),

X_i the inputs (one row per token) that linear receives when model i runs on ``num_regmean_examples`` inputs of
its own task, α = ``reduce_non_diagonal_ratio``; every other tensor is the mean of the models
(``_regmean_solve``). Two stages: the data pass (``_data_pass.input_grams``: each fine-tuned model on its task's
inputs, drawn with ``seed``, in batches of ``batch_size``), then the per-tensor closed form.

The inputs are the task pool's, of the split ``nbmerge.merge`` is given (``split=``; FusionBench uses each task's
training split: ``split="train"``); no label is read. The base gives the architecture, none of its values
(``_static_build``). Defaults are FusionBench's base config (``configs/method/regmean/regmean.yaml``).
"""

from __future__ import annotations

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, BuiltModule, MergeMethod, ModuleJob
from nbmerge_plugins.from_data._data_pass import input_grams, per_model_statistics, task_inputs
from nbmerge_plugins.from_data._regmean_solve import BATCH_SIZE, NUM_EXAMPLES, SEED, merged_state, ratio_param
from nbmerge_plugins.from_data._static_build import built, model_states

PARAMS = (NUM_EXAMPLES,
          ratio_param(0.1, "base RegMean config (its CLIP config uses 0.95, its GPT-2 config 0.6)"),
          BATCH_SIZE, SEED)


def build_regmean(job: ModuleJob) -> BuiltModule:
    """Collect every model's Gram matrices on its task's inputs, then merge tensor by tensor."""
    if job.trained_state is not None:  # a saved merge: the whole merged state
        return built(job.base, job.trained_state, "regmean")
    params = job.params
    states = model_states(job, "regmean")
    inputs = task_inputs(job, params["num_regmean_examples"], params["seed"], "regmean")
    grams = per_model_statistics(job, inputs, lambda model, logits, chosen: input_grams(
        model, logits, chosen, params["batch_size"], owner="regmean"))
    names = list(job.base.state_dict())
    merged = merged_state(list(states.values()), grams, params["reduce_non_diagonal_ratio"], names, list(states),
                          "regmean")
    return built(job.base, merged, "regmean", {"examples": {label: len(chosen) for label, chosen in inputs.items()}})


REGMEAN = MergeMethod(
    name="regmean",
    summary="RegMean: each linear layer the least-squares merge of the models' outputs on their tasks' inputs",
    formula="linear W: Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ, G_i = X_iᵀX_i/n on task i's inputs, off-diagonal × α; "
            "other tensors: mean",
    params=PARAMS,
    merge_tensor=None,
    build_module=build_regmean,
    min_models=2,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(REGMEAN)
