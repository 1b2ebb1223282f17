"""Oracle tests: nbmerge against FusionBench 0.2.33 on the same in-memory Llama models.

FusionBench mutates the models it is given, so every call gets fresh copies. Where its semantics differ from
nbmerge's defaults the test pins the documented difference (TIES keeps int(d·K)+1 entries; ExPO's LLaMA class
default attention scaling is 0.5).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_llama_config
from fusion_bench.method import (  # the oracle extra: `make test` installs it
    ExPOAlgorithm,
    ExPOAlgorithmForLlama,
    SimpleAverageAlgorithm,
    SlerpMergeAlgorithm,
    TaskArithmeticAlgorithm,
    TiesMergingAlgorithm,
    WeightedAverageAlgorithm,
)
from fusion_bench.modelpool import BaseModelPool
from transformers import LlamaForCausalLM

import nbmerge

logging.getLogger("fusion_bench").setLevel(logging.WARNING)
ATOL = 2e-6


def as_modules(model_set) -> dict[str, LlamaForCausalLM]:
    def load(state):
        module = LlamaForCausalLM(tiny_llama_config()).to(next(iter(state.values())).dtype)
        module.load_state_dict(state)
        return module

    return {"base": load(model_set.base), **{f"ft{i}": load(s) for i, s in enumerate(model_set.models)}}


@pytest.fixture(scope="module")
def modules(llama_set):
    return as_modules(llama_set)


@pytest.fixture(scope="module")
def sparse_modules(sparse_llama_set):
    return as_modules(sparse_llama_set)


def pool(modules, *names, with_base=True):
    chosen = {name: copy.deepcopy(modules[name]) for name in names}
    if with_base:
        chosen = {"_pretrained_": copy.deepcopy(modules["base"]), **chosen}
    return BaseModelPool(chosen)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def ours(method, modules, *names, with_base=True, **params) -> dict[str, torch.Tensor]:
    base = modules["base"] if with_base else None
    return nbmerge.merge(method, [modules[n] for n in names], base=base, progress=False, **params).state_dict


def largest_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


FT = ("ft0", "ft1", "ft2")


def test_simple_average(modules):
    theirs = state(SimpleAverageAlgorithm().run(pool(modules, *FT, with_base=False)))
    assert largest_difference(ours("simple_average", modules, *FT, with_base=False), theirs) <= ATOL


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average(modules, normalize):
    weights = [0.3, 0.5, 0.2]
    theirs = state(WeightedAverageAlgorithm(normalize=normalize, weights=weights, verbose=False)
                   .run(pool(modules, *FT, with_base=False)))
    mine = ours("weighted_average", modules, *FT, with_base=False, weights=weights, normalize=normalize)
    assert largest_difference(mine, theirs) <= ATOL


def test_task_arithmetic(modules):
    theirs = state(TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(modules, *FT)))
    assert largest_difference(ours("task_arithmetic", modules, *FT, scaling=0.3), theirs) <= ATOL


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_model_scope_reproduces_fusionbench_up_to_one_entry(modules, merge_func):
    """FusionBench keeps int(d·K)+1 entries of each flattened task vector; nbmerge keeps int(d·K).

    With the density raised by one entry nbmerge reproduces FusionBench; at the same density the results differ
    at no more than one position per task vector.
    """
    theirs = state(TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func=merge_func)
                   .run(pool(modules, *FT)))
    total = sum(t.numel() for t in modules["base"].state_dict().values())
    kept_by_fusionbench = int(total * 0.2) + 1
    one_more = ours("ties", modules, *FT, density=(kept_by_fusionbench + 0.5) / total, trim_scope="model",
                    merge_func=merge_func, scaling=0.5)
    assert largest_difference(one_more, theirs) <= ATOL
    same_density = ours("ties", modules, *FT, density=0.2, trim_scope="model", merge_func=merge_func, scaling=0.5)
    differing = sum(int(((same_density[k] - theirs[k]).abs() > ATOL).sum()) for k in theirs)
    assert 1 <= differing <= len(FT)


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_default_ties_density_counts_every_position_as_fusionbench(sparse_modules, merge_func):
    """Task vectors that change ~60% of positions, frozen tensors and a half-changed head: the default TIES
    (density over all positions, model scope) is FusionBench's TIES but for its one extra entry per task vector.

    nbmerge computes in float32 whatever the inputs; FusionBench computes in the inputs' dtype, so for bfloat16
    inputs the reference is FusionBench on float32 copies and the result must be its rounding to bfloat16.
    """
    in_float32 = {name: copy.deepcopy(module).float() for name, module in sparse_modules.items()}
    theirs = state(TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func=merge_func)
                   .run(pool(in_float32, *FT)))
    total = sum(t.numel() for t in theirs.values())
    one_more = ours("ties", sparse_modules, *FT, density=(int(total * 0.2) + 1.5) / total, merge_func=merge_func,
                    scaling=0.5)
    assert entries_off(one_more, theirs) == 0
    assert entries_off(ours("ties", sparse_modules, *FT, density=0.2, merge_func=merge_func, scaling=0.5),
                       theirs) <= len(FT)
    over_changed = ours("ties", sparse_modules, *FT, density=0.2, merge_func=merge_func, scaling=0.5,
                        density_over="changed")
    assert entries_off(over_changed, theirs) > 0.01 * total  # the option really is the other convention


def entries_off(result: dict, reference: dict) -> int:
    """Entries of ``result`` farther from the float32 ``reference`` than ATOL plus, for bfloat16 results, the
    half step of rounding to bfloat16 (2⁻⁸ of the magnitude)."""
    assert set(result) == set(reference)
    off = 0
    for name, exact in reference.items():
        value = result[name]
        rounding = 2.0 ** -8 * exact.abs() if value.dtype == torch.bfloat16 else 0.0
        off += int(((value.float() - exact).abs() > ATOL + rounding).sum())
    return off


def test_expo_defaults_are_fusionbench_expo(modules):
    """The default ExPO is the seed's formula on every parameter, FusionBench's ExPOAlgorithm."""
    theirs = state(ExPOAlgorithm(extrapolation_factor=0.1).run(pool(modules, "ft0", "ft1")))
    assert largest_difference(ours("expo", modules, "ft0", "ft1"), theirs) <= ATOL


LLAMA_DEFAULTS = dict(attention_scaling=0.5, on_linear_bias=False, on_norm=False, on_embedding=False,
                      only_on_backbone=True)  # ExPOAlgorithmForLlama's class defaults, opt-in in nbmerge


@pytest.mark.parametrize("options", [
    {},
    {"attention_scaling_factor": 1.0, "on_embedding": True, "only_on_backbone": False},
    {"fix_first_n_layers": "half"},
    {"fix_last_n_layers": 1},
    {"magnitude_sparsity_ratio": 0.5},
    {"on_linear_weights": False},
], ids=["defaults", "embedding-and-head", "fix-first-half", "fix-last-1", "sparsity", "no-linear"])
def test_expo_llama_options(modules, options):
    theirs = state(ExPOAlgorithmForLlama(extrapolation_factor=0.4, **options).run(pool(modules, "ft0")))
    mine_options = {**LLAMA_DEFAULTS, **options}
    if "attention_scaling_factor" in mine_options:
        mine_options["attention_scaling"] = mine_options.pop("attention_scaling_factor")
    mine = ours("expo", modules, "ft0", alpha=0.4, **mine_options)
    assert largest_difference(mine, theirs) <= ATOL


def test_slerp(modules):
    theirs = state(SlerpMergeAlgorithm(t=0.3).run(pool(modules, "ft0", "ft1", with_base=False)))
    mine = ours("slerp", modules, "ft0", "ft1", with_base=False, t=0.3)
    assert largest_difference(mine, theirs) <= 1e-5
