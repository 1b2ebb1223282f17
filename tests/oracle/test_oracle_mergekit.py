"""Oracle tests: nbmerge against mergekit 0.1.5 on the same Llama checkpoints (sharded safetensors folders).

Where the semantics coincide the results match to float32 tolerance; where they differ (DARE's rescaling and
random stream) the test pins the documented difference.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_folder
from mergekit.config import MergeConfiguration  # the oracle extra: `make test` installs it
from mergekit.merge import MergeOptions, run_merge

import nbmerge

OPTIONS = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
WEIGHTS = (0.3, 0.5, 0.2)
ATOL = 2e-6


def run_mergekit(config: dict, out) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(config), str(out), options=OPTIONS)
    return load_folder(out)


def weighted_models(model_dirs, **per_model) -> list[dict]:
    return [{"model": str(path), "parameters": {"weight": w, **per_model}} for path, w in zip(model_dirs, WEIGHTS)]


def assert_matches(ours: dict, theirs: dict, atol=ATOL):
    assert set(ours) == set(theirs)
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= atol, f"largest difference {worst:.3g}"


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_weighted_average(llama_set, tmp_path, normalize):
    theirs = run_mergekit({"merge_method": "linear", "parameters": {"normalize": normalize},
                           "models": weighted_models(llama_set.model_dirs)}, tmp_path / "mk")
    ours = nbmerge.merge("weighted_average", llama_set.model_dirs, weights=list(WEIGHTS), normalize=normalize,
                         progress=False).state_dict
    assert_matches(ours, theirs)


def test_task_arithmetic(llama_set, tmp_path):
    theirs = run_mergekit({"merge_method": "task_arithmetic", "base_model": str(llama_set.base_dir),
                           "parameters": {"lambda": 0.7}, "models": weighted_models(llama_set.model_dirs)},
                          tmp_path / "mk")
    ours = nbmerge.merge("task_arithmetic", llama_set.model_dirs, base=llama_set.base_dir, scaling=0.7,
                         weights=list(WEIGHTS), progress=False).state_dict
    assert_matches(ours, theirs)


@pytest.mark.parametrize("normalize, merge_func, scaling", [(True, "mean", 1.0), (False, "sum", 1.5)])
def test_ties_tensor_scope_is_mergekits_ties(llama_set, tmp_path, normalize, merge_func, scaling):
    theirs = run_mergekit({"merge_method": "ties", "base_model": str(llama_set.base_dir),
                           "parameters": {"normalize": normalize, "lambda": scaling},
                           "models": weighted_models(llama_set.model_dirs, density=0.4)}, tmp_path / "mk")
    ours = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, density=0.4, trim_scope="tensor",
                         sign="sum", merge_func=merge_func, scaling=scaling, weights=list(WEIGHTS),
                         progress=False).state_dict
    assert_matches(ours, theirs)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_ties_on_sparse_task_vectors_counts_density_as_mergekit(sparse_llama_set, tmp_path, density):
    """~60% of positions changed per model, frozen tensors, a half-changed head, in float32 and bfloat16: mergekit
    keeps int(density · numel) entries of each tensor's task vector (0.8 keeps unchanged positions too), and so
    does nbmerge's default; counting only the changed positions is the opt-in ``density_over="changed"``.

    Where several entries tie with the threshold (bfloat16 task vectors repeat values), mergekit's topk keeps an
    arbitrary k of them and nbmerge keeps them all: the results may differ there and nowhere else."""
    model_set = sparse_llama_set
    theirs = run_mergekit({"merge_method": "ties", "base_model": str(model_set.base_dir), "dtype": "float32",
                           "models": weighted_models(model_set.model_dirs, density=density)}, tmp_path / "mk")
    ours = nbmerge.merge("ties", model_set.model_dirs, base=model_set.base_dir, density=density,
                         trim_scope="tensor", weights=list(WEIGHTS), out_dtype="float32", progress=False).state_dict
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        differing = (ours[name] - expected).abs() > ATOL
        assert not (differing & ~tied_with_threshold(model_set, name, density)).any(), name
    over_changed = nbmerge.merge("ties", model_set.model_dirs, base=model_set.base_dir, density=density,
                                 trim_scope="tensor", weights=list(WEIGHTS), out_dtype="float32",
                                 density_over="changed", progress=False).state_dict
    assert any(not torch.allclose(over_changed[k], theirs[k], atol=ATOL) for k in theirs)


def tied_with_threshold(model_set, name: str, density: float) -> torch.Tensor:
    """Positions where some |w_i τ_i| equals its tensor's k-th largest value, k = int(density · numel), when more
    than k entries reach that value (so that which of them are kept is a tie-break)."""
    base = model_set.base[name].float()
    tied = torch.zeros(base.shape, dtype=torch.bool)
    k = int(density * base.numel())
    for weight, model in zip(WEIGHTS, model_set.models):
        magnitude = (weight * (model[name].float() - base)).abs()
        threshold = magnitude.flatten().sort(descending=True).values[k - 1]
        if int((magnitude >= threshold).sum()) > k:
            tied |= magnitude == threshold
    return tied


def test_ties_with_a_density_per_model_is_mergekits(llama_set, tmp_path):
    densities = (0.2, 0.5, 0.9)
    models = [{"model": str(path), "parameters": {"weight": w, "density": d}}
              for path, w, d in zip(llama_set.model_dirs, WEIGHTS, densities)]
    recipe = {"merge_method": "ties", "base_model": str(llama_set.base_dir), "models": models}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    ours = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, density=list(densities),
                         trim_scope="tensor", weights=list(WEIGHTS), progress=False).state_dict
    assert_matches(ours, theirs)
    from nbmerge.recipes import parse_recipe  # the same recipe through the parser the magics and the CLI use

    call = parse_recipe(json.dumps(recipe))
    assert call.method == "ties" and call.params["density"] == list(densities)
    via_recipe = nbmerge.merge(call.method, list(call.models.values()), base=call.base, progress=False,
                               **call.params).state_dict
    assert_matches(via_recipe, theirs)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_is_mergekits_through_its_recipe(llama_set, tmp_path, filter_wise):
    from nbmerge.recipes import parse_recipe

    recipe = {"merge_method": "model_stock", "base_model": str(llama_set.base_dir), "dtype": "float32",
              "parameters": {"filter_wise": filter_wise}, "models": [{"model": str(p)} for p in llama_set.model_dirs]}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    call = parse_recipe(json.dumps(recipe))
    ours = nbmerge.merge(call.method, list(call.models.values()), base=call.base, out_dtype="float32",
                         progress=False, **call.params).state_dict
    assert call.method == "model_stock" and call.params == {"filter_wise": filter_wise}
    assert_matches(ours, theirs, atol=1e-5)


def test_nearswap_is_mergekits_through_its_recipe(llama_set, tmp_path):
    from nbmerge.recipes import parse_recipe

    recipe = {"merge_method": "nearswap", "base_model": str(llama_set.base_dir), "dtype": "float32",
              "parameters": {"t": 0.01}, "models": [{"model": str(llama_set.model_dirs[0])}]}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    call = parse_recipe(json.dumps(recipe))
    ours = nbmerge.merge(call.method, list(call.models.values()), base=call.base, out_dtype="float32",
                         progress=False, **call.params).state_dict
    assert_matches(ours, theirs)
    # an independent look at one tensor: entries within t of the base take the model's value
    name = "model.layers.0.mlp.up_proj.weight"
    base, model = llama_set.base[name], llama_set.models[0][name]
    near = (base - model).abs() <= 0.01
    assert near.any() and (~near).any()
    assert torch.allclose(ours[name][near], model[near], atol=ATOL)


def test_dare_without_drops_matches_dare_linear_and_dare_ties(llama_set, tmp_path):
    for mergekit_name, combine in (("dare_linear", "linear"), ("dare_ties", "ties")):
        theirs = run_mergekit({"merge_method": mergekit_name, "base_model": str(llama_set.base_dir),
                               "models": weighted_models(llama_set.model_dirs, density=1.0)},
                              tmp_path / mergekit_name)
        ours = nbmerge.merge("dare", llama_set.model_dirs, base=llama_set.base_dir, drop_rate=0.0, combine=combine,
                             scaling=1.0, weights=list(WEIGHTS), progress=False).state_dict
        assert_matches(ours, theirs)


def test_dare_rescaling_difference_is_pinned(llama_set, tmp_path):
    """mergekit rescales survivors by ‖τ‖₁/‖m⊙τ‖₁; nbmerge's default is the paper's 1/(1−p), "l1" is mergekit's."""
    name = "model.layers.1.mlp.up_proj.weight"
    base, model = llama_set.base[name], llama_set.models[0][name]
    task_vector = model - base
    theirs = run_mergekit({"merge_method": "dare_linear", "base_model": str(llama_set.base_dir),
                           "models": [{"model": str(llama_set.model_dirs[0]),
                                       "parameters": {"weight": 1.0, "density": 0.5}}]}, tmp_path / "mk")
    ours_paper = nbmerge.merge("dare", [llama_set.model_dirs[0]], base=llama_set.base_dir, drop_rate=0.5,
                               scaling=1.0, progress=False).state_dict
    ours_l1 = nbmerge.merge("dare", [llama_set.model_dirs[0]], base=llama_set.base_dir, drop_rate=0.5,
                            rescale="l1", scaling=1.0, progress=False).state_dict
    their_delta = theirs[name] - base
    kept = their_delta != 0
    assert 0.45 < kept.float().mean() < 0.55
    their_scale = task_vector.abs().sum() / task_vector[kept].abs().sum()
    assert torch.allclose(their_delta[kept], task_vector[kept] * their_scale, rtol=1e-4, atol=1e-7)
    assert abs(their_scale.item() - 2.0) > 1e-4  # not the paper's 1/(1-p): the difference is real
    for ours, scale_of in ((ours_paper, lambda kept_mask: 2.0),
                           (ours_l1, lambda kept_mask: task_vector.abs().sum() / task_vector[kept_mask].abs().sum())):
        our_delta = ours[name] - base
        our_kept = our_delta != 0
        assert torch.allclose(our_delta[our_kept], task_vector[our_kept] * scale_of(our_kept), rtol=1e-4, atol=1e-7)
    # both L1 variants keep each task vector's L1 norm
    assert torch.isclose((ours_l1[name] - base).abs().sum(), task_vector.abs().sum(), rtol=1e-4)
    assert torch.isclose(their_delta.abs().sum(), task_vector.abs().sum(), rtol=1e-4)


SCHEDULE = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
            {"value": 0.25}]


@pytest.mark.parametrize("t", [0.35, [0.2, 0.9], SCHEDULE], ids=["number", "anchors", "filters"])
def test_slerp_with_layer_schedules(llama_set, tmp_path, t):
    base, model = str(llama_set.base_dir), str(llama_set.model_dirs[1])
    theirs = run_mergekit({"merge_method": "slerp", "base_model": base, "parameters": {"t": t},
                           "models": [{"model": base}, {"model": model}]}, tmp_path / "mk")
    ours = nbmerge.merge("slerp", [model], base=base, t=t, progress=False).state_dict
    assert_matches(ours, theirs, atol=1e-5)


def test_slerp_between_two_fine_tunes(llama_set, tmp_path):
    first, second = (str(p) for p in llama_set.model_dirs[:2])
    theirs = run_mergekit({"merge_method": "slerp", "base_model": first, "parameters": {"t": 0.6},
                           "models": [{"model": first}, {"model": second}]}, tmp_path / "mk")
    ours = nbmerge.merge("slerp", [first, second], t=0.6, progress=False).state_dict
    assert_matches(ours, theirs, atol=1e-5)
