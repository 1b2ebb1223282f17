"""Oracle tests: TSV-M, Iso-C and Iso-CTS against FusionBench 0.2.33's own classes on the same in-memory Llama
models (float32: q/k/v/o and MLP projections, token embeddings, LM head, norms).

The classes run as FusionBench runs them (``run(modelpool)`` on a ``BaseModelPool``, on the CPU); FusionBench mutates
the models it is given, so every call gets fresh copies. The SVDs are float32 on both sides (LAPACK's gesdd) and
the singular directions of nearly equal singular values are ill-conditioned, so results agree within ~3e-6
(measured: TSV-M 3e-7, Iso-C 1.5e-7, Iso-CTS 2.3e-6) where the merges move entries by up to ~0.1, not bit for bit.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_llama_config
from fusion_bench.method import (  # the oracle extra: `make test` installs it
    IsotropicMergingInCommonAndTaskSubspace,
    IsotropicMergingInCommonSubspace,
    TaskSingularVectorMerging,
)
from fusion_bench.modelpool import BaseModelPool
from transformers import LlamaForCausalLM

import nbmerge

logging.getLogger("fusion_bench").setLevel(logging.WARNING)
ATOL = 1e-5
FT = ("ft0", "ft1", "ft2")


@pytest.fixture(scope="module")
def modules(llama_set):
    def load(state):
        module = LlamaForCausalLM(tiny_llama_config())
        module.load_state_dict(state)
        return module

    return {"base": load(llama_set.base), **{f"ft{i}": load(s) for i, s in enumerate(llama_set.models)}}


def theirs(algorithm, modules, names=FT) -> dict[str, torch.Tensor]:
    chosen = {"_pretrained_": copy.deepcopy(modules["base"]), **{n: copy.deepcopy(modules[n]) for n in names}}
    merged = algorithm.run(BaseModelPool(chosen))
    return {k: v.detach() for k, v in merged.state_dict().items()}


def ours(method, modules, names=FT, **params) -> dict[str, torch.Tensor]:
    return nbmerge.merge(method, [modules[n] for n in names], base=modules["base"], progress=False,
                         **params).state_dict


def largest_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def moved_matrices(result: dict, base: dict) -> int:
    """How many 2-D tensors the merge changed (guards against a vacuous agreement)."""
    return sum(1 for k, v in result.items() if v.dim() == 2 and not torch.equal(v, base[k]))


@pytest.mark.parametrize("alpha, params", [
    (1, {}),                                          # FusionBench's default alpha: 1
    (0.7, {"scaling": 0.7}),                          # one alpha scales the merged task vector
    ([0.5, 1.0, 2.0], {"weights": [0.5, 1.0, 2.0]}),  # a list scales each task vector before the SVDs
], ids=["default", "scaled", "per-task"])
def test_tsv_m_is_fusionbench_task_singular_vector_merging(modules, alpha, params, capsys):
    reference = theirs(TaskSingularVectorMerging(alpha=alpha), modules)
    capsys.readouterr()  # FusionBench prints a line per tensor
    mine = ours("tsv_m", modules, **params)
    assert moved_matrices(mine, modules["base"].state_dict()) == sum(v.dim() == 2 for v in mine.values())
    assert largest_difference(mine, reference) <= ATOL


def test_tsv_m_of_two_models(modules, capsys):
    """T = 2: each task keeps int(k / 2) directions (k = 16 for k_proj, 32 for the others)."""
    reference = theirs(TaskSingularVectorMerging(alpha=1), modules, names=("ft0", "ft2"))
    capsys.readouterr()
    assert largest_difference(ours("tsv_m", modules, names=("ft0", "ft2")), reference) <= ATOL


@pytest.mark.parametrize("scaling", [1.0, 1.4])
def test_iso_c_is_fusionbench_isotropic_merging_in_common_subspace(modules, scaling, capsys):
    reference = theirs(IsotropicMergingInCommonSubspace(scaling_factor=scaling), modules)
    capsys.readouterr()
    options = {} if scaling == 1.0 else {"scaling": scaling}  # 1.0 is the default
    assert largest_difference(ours("iso_c", modules, **options), reference) <= ATOL


@pytest.mark.parametrize("scaling, fraction", [(1.0, 0.8), (1.2, 0.5), (1.0, 0.95)])
def test_iso_cts_is_fusionbench_isotropic_merging_in_common_and_task_subspaces(modules, scaling, fraction, capsys):
    """How k directions split into c common + d per task (k_proj: k = 16; the other matrices: k = 32):
    f = 0.8 (the default) 13 + 1 and 26 + 2; f = 0.5: 7 + 3 and 17 + 5; f = 0.95: 16 + 0 (no task space) and 29 + 1."""
    reference = theirs(IsotropicMergingInCommonAndTaskSubspace(scaling_factor=scaling,
                                                               common_space_fraction=fraction), modules)
    capsys.readouterr()
    defaults = {"scaling": 1.0, "common_space_fraction": 0.8}
    options = {k: v for k, v in {"scaling": scaling, "common_space_fraction": fraction}.items() if v != defaults[k]}
    assert largest_difference(ours("iso_cts", modules, **options), reference) <= ATOL
