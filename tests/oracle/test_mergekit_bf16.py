"""mergekit recipes on bfloat16 checkpoints give mergekit 0.1.5's tensors bit for bit (torch.equal).

A recipe's ``dtype`` is the dtype mergekit's arithmetic runs in and ``out_dtype`` the output's; nbmerge then runs
its mergekit arithmetic (``compute_dtype``), including which of several equal magnitudes a density cut keeps.
The checkpoints: task vectors whose magnitudes take four values (most of each density cut is a tie), the tiny
bfloat16 Llama fine-tunes, and real bfloat16 fine-tunes of the packaged SmolLM2-135M (its embeddings and first
layer: the rest of the model is the same arithmetic on more tensors).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_folder
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file, save_file

import nbmerge
from nbmerge.recipes import parse_recipe, run_recipe

OPTIONS = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
WEIGHTS = (0.3, 0.5, 0.2)
SCHEDULE = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
            {"value": 0.25}]


def run_mergekit(recipe: dict, out) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=OPTIONS)
    return load_folder(out)


def run_ours(recipe: dict) -> dict[str, torch.Tensor]:
    return run_recipe(parse_recipe(json.dumps(recipe)), progress=False).state_dict


def differing(ours: dict, theirs: dict) -> tuple[int, int]:
    """(elements that are not bit-identical, elements) over every tensor; dtypes must agree."""
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype for k in theirs), {k: (ours[k].dtype, theirs[k].dtype) for k in theirs}
    return (sum(int((ours[k].view(torch.int16 if ours[k].itemsize == 2 else torch.int32)
                     != theirs[k].view(torch.int16 if theirs[k].itemsize == 2 else torch.int32)).sum())
                for k in theirs),
            sum(v.numel() for v in theirs.values()))


def assert_bitwise(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    unequal = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}; {differing(ours, theirs)}"


def recipe_for(method: str, base, models, parameters=None, per_model=None, **top) -> dict:
    per_model = per_model or [{} for _ in models]
    return {"merge_method": method, "base_model": str(base), "parameters": parameters or {}, **top,
            "models": [{"model": str(path), "parameters": own} for path, own in zip(models, per_model)]}


@pytest.fixture(scope="module")
def tied_set(bf16_llama_set, tmp_path_factory):
    """bfloat16 folders like the tiny Llama set, every value a multiple of 2⁻⁷ in [−1, 1] and every task vector
    entry one of 0, ±1, ±2, ±3 × 2⁻⁷ (all exact in bfloat16): magnitudes tie in the thousands at every cut."""
    root = tmp_path_factory.mktemp("tied")
    generator = torch.Generator().manual_seed(7)
    shapes = {k: v.shape for k, v in bf16_llama_set.base.items()}
    base = {k: (torch.randint(-128, 129, s, generator=generator) / 128).bfloat16() for k, s in shapes.items()}
    folders = []
    for i, state in enumerate([base] + [{k: (v.float() + torch.randint(-3, 4, v.shape, generator=generator) / 128)
                                         .bfloat16() for k, v in base.items()} for _ in range(3)]):
        folder = root / ("base" if i == 0 else f"ft{i}")
        folder.mkdir()
        shutil.copy(bf16_llama_set.base_dir / "config.json", folder / "config.json")
        save_file(state, folder / "model.safetensors")
        folders.append(folder)
    return folders[0], folders[1:]


def test_tied_set_ties_at_the_density_cut(tied_set):
    """The premise: at density 0.3 most kept magnitudes equal the cut value, so the tie-break decides."""
    base, models = tied_set
    name = "model.layers.0.mlp.up_proj.weight"
    magnitude = (load_file(models[0] / "model.safetensors")[name].float()
                 - load_file(base / "model.safetensors")[name].float()).abs().flatten()
    k = int(0.3 * magnitude.numel())
    cut = magnitude.sort(descending=True).values[k - 1]
    assert int((magnitude == cut).sum()) > k // 2 and int((magnitude >= cut).sum()) > k


@pytest.mark.parametrize("method, parameters, per_model", [
    ("ties", {}, [{"weight": w, "density": 0.3} for w in WEIGHTS]),
    ("ties", {"normalize": False, "lambda": 1.3},
     [{"weight": w, "density": d} for w, d in zip(WEIGHTS, (0.2, 0.5, 0.9))]),
    ("ties", {"rescale": True}, [{"weight": w, "density": 0.4} for w in WEIGHTS]),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": w} for w in WEIGHTS]),
    ("task_arithmetic", {"normalize": True, "lambda": 0.9},
     [{"weight": [0.2, 0.9]}, {"weight": 0.5}, {"weight": 0.3}]),
    ("breadcrumbs_ties", {}, [{"weight": w, "density": 0.5, "gamma": 0.05} for w in WEIGHTS]),
    ("breadcrumbs", {"rescale": True}, [{"weight": w, "density": 0.4, "gamma": 0.02} for w in WEIGHTS]),
])
@pytest.mark.parametrize("dtypes", [{"dtype": "bfloat16"}, {}, {"dtype": "float32", "out_dtype": "bfloat16"}],
                         ids=["bf16", "stored", "f32-to-bf16"])
def test_task_vector_recipes_on_tied_magnitudes_are_mergekits_bit_for_bit(tied_set, tmp_path, method, parameters,
                                                                          per_model, dtypes):
    base, models = tied_set
    recipe = recipe_for(method, base, models, parameters, per_model, **dtypes)
    assert_bitwise(run_ours(recipe), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_recipe_is_mergekits_bit_for_bit(tied_set, tmp_path, normalize):
    base, models = tied_set
    recipe = {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": normalize},
              "models": [{"model": str(path), "parameters": {"weight": w}} for path, w in zip(models, WEIGHTS)]}
    assert_bitwise(run_ours(recipe), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.parametrize("t", [0.35, SCHEDULE], ids=["number", "filters"])
def test_slerp_recipe_with_filter_gradients_is_mergekits_bit_for_bit(bf16_llama_set, tmp_path, t):
    base, model = str(bf16_llama_set.base_dir), str(bf16_llama_set.model_dirs[1])
    recipe = {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16", "parameters": {"t": t},
              "models": [{"model": base}, {"model": model}]}
    assert_bitwise(run_ours(recipe), run_mergekit(recipe, tmp_path / "mk"))


def test_float32_default_is_closer_to_the_exact_result_than_bfloat16_arithmetic(bf16_llama_set):
    """nbmerge.merge without compute_dtype computes in float32 and rounds once: nearer the float64 result than
    mergekit's bfloat16 arithmetic (what compute_dtype="bfloat16" reproduces), which rounds at every step."""
    model_set = bf16_llama_set
    kwargs = dict(base=model_set.base_dir, scaling=0.7, weights=list(WEIGHTS), progress=False)
    ours = nbmerge.merge("task_arithmetic", model_set.model_dirs, **kwargs).state_dict
    theirs = nbmerge.merge("task_arithmetic", model_set.model_dirs, compute_dtype="bfloat16", **kwargs).state_dict
    error_ours = error_theirs = 0.0
    for name, base in model_set.base.items():
        exact = base.double() + 0.7 * sum(w * (m[name].double() - base.double())
                                          for w, m in zip(WEIGHTS, model_set.models))
        error_ours += float((ours[name].double() - exact).abs().sum())
        error_theirs += float((theirs[name].double() - exact).abs().sum())
    assert ours[name].dtype == theirs[name].dtype == torch.bfloat16
    assert error_ours < error_theirs


def test_compute_dtype_is_refused_where_mergekit_has_no_such_arithmetic(bf16_llama_set):
    from nbmerge.errors import ParameterError

    with pytest.raises(ParameterError, match="compute_dtype: ties with trim_scope='model'"):
        nbmerge.merge("ties", bf16_llama_set.model_dirs, base=bf16_llama_set.base_dir, trim_scope="model",
                      compute_dtype="bfloat16", progress=False)
    with pytest.raises(ParameterError, match="karcher computes in float32 only"):
        nbmerge.merge("karcher", bf16_llama_set.model_dirs, compute_dtype="bfloat16", progress=False)


# -- real bfloat16 fine-tunes: SmolLM2-135M's SFT and aligned variants (nbmerge.workbench.models.lm_variants) ------
SMOL_KEEP = ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.")
SMOL_TOKENS = 8192  # embedding rows kept: the most frequent tokens' rows, where fine-tuning moved most


@pytest.fixture(scope="module")
def smollm2_subset(tmp_path_factory):
    """The packaged SmolLM2-135M-Instruct and its two cached bfloat16 fine-tunes, cut to the first SMOL_TOKENS
    embedding rows, the final norm and layer 0 (a one-layer Llama that mergekit and nbmerge both read), to keep
    the test to seconds."""
    from nbmerge.workbench.models.lm_variants import build_variants

    variants = build_variants(progress=False)
    root = tmp_path_factory.mktemp("smol")
    folders = []
    for label, source in (("base", variants.base), ("sft", variants.sft), ("aligned", variants.aligned)):
        state = {}
        for file in sorted(source.glob("*.safetensors")):
            state.update({k: v for k, v in load_file(file).items() if k.startswith(SMOL_KEEP)})
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:SMOL_TOKENS].clone()
        config = json.loads((source / "config.json").read_text())
        config["num_hidden_layers"], config["vocab_size"] = 1, SMOL_TOKENS
        config.setdefault("architectures", ["LlamaForCausalLM"])  # the export has none; mergekit needs it
        folder = root / label
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file(state, folder / "model.safetensors")
        folders.append(folder)
    assert all(v.dtype == torch.bfloat16 for v in load_file(folders[1] / "model.safetensors").values())
    return folders


@pytest.mark.parametrize("method, parameters, per_model", [
    ("ties", {}, [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.3}]),
    ("task_arithmetic", {"lambda": 0.8}, [{"weight": 0.7}, {"weight": 0.5}]),
])
def test_real_bf16_fine_tunes_merge_as_mergekit_bit_for_bit(smollm2_subset, tmp_path, method, parameters, per_model):
    base, *models = smollm2_subset
    recipe = recipe_for(method, base, models, parameters, per_model, dtype="bfloat16")
    assert_bitwise(run_ours(recipe), run_mergekit(recipe, tmp_path / "mk"))


def test_real_bf16_slerp_with_filter_gradients_is_mergekits_bit_for_bit(smollm2_subset, tmp_path):
    base, sft, aligned = smollm2_subset
    recipe = {"merge_method": "slerp", "base_model": str(sft), "dtype": "bfloat16", "parameters": {"t": SCHEDULE},
              "models": [{"model": str(sft)}, {"model": str(aligned)}]}
    assert_bitwise(run_ours(recipe), run_mergekit(recipe, tmp_path / "mk"))
