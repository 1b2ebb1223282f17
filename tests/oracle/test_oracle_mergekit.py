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


@pytest.mark.parametrize("normalize, merge_func, scaling, rescale", [(True, "mean", 1.0, False),
                                                                    (False, "sum", 1.5, False),
                                                                    (True, "mean", 1.0, True)])
def test_ties_tensor_scope_is_mergekits_ties(llama_set, tmp_path, normalize, merge_func, scaling, rescale):
    theirs = run_mergekit({"merge_method": "ties", "base_model": str(llama_set.base_dir),
                           "parameters": {"normalize": normalize, "lambda": scaling, "rescale": rescale},
                           "models": weighted_models(llama_set.model_dirs, density=0.4)}, tmp_path / "mk")
    ours = nbmerge.merge("ties", llama_set.model_dirs, base=llama_set.base_dir, density=0.4, trim_scope="tensor",
                         sign="sum", merge_func=merge_func, scaling=scaling, weights=list(WEIGHTS),
                         rescale=rescale, progress=False).state_dict
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


def test_arcee_fusion_is_mergekits_through_its_recipe(llama_set, tmp_path):
    """In float32 (mergekit computes in the recipe's dtype, nbmerge always in float32: a 16-bit recipe is compared
    with both in float32, as the recipe corpus does)."""
    from nbmerge.recipes import parse_recipe

    recipe = {"merge_method": "arcee_fusion", "base_model": str(llama_set.base_dir), "dtype": "float32",
              "models": [{"model": str(llama_set.base_dir)}, {"model": str(llama_set.model_dirs[1])}]}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    call = parse_recipe(json.dumps(recipe))
    assert call.method == "arcee_fusion" and call.params == {}
    ours = nbmerge.merge(call.method, list(call.models.values()), base=call.base, progress=False,
                         **call.options).state_dict
    assert_matches(ours, theirs)
    name = "model.layers.0.mlp.up_proj.weight"  # the fusion takes a minority of the model's changes
    base, model = llama_set.base[name], llama_set.models[1][name]
    taken = ours[name] != base
    assert 0 < int(taken.sum()) < 0.3 * base.numel() and torch.equal(ours[name][taken], model[taken])


@pytest.mark.parametrize("method, parameters", [("ram", {}), ("ramplus_tl", {"r": 0.3, "alpha": 0.5})])
def test_ram_is_mergekits_on_sparse_task_vectors_through_its_recipe(sparse_llama_set, tmp_path, method, parameters):
    from nbmerge.recipes import parse_recipe

    model_set = sparse_llama_set
    recipe = {"merge_method": method, "base_model": str(model_set.base_dir), "dtype": "float32",
              "parameters": parameters, "models": [{"model": str(path)} for path in model_set.model_dirs]}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    call = parse_recipe(json.dumps(recipe))
    assert call.method == method
    ours = nbmerge.merge(call.method, list(call.models.values()), base=call.base, progress=False, **call.params,
                         **call.options).state_dict
    assert_matches(ours, theirs, atol=1e-5)


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


def merge_recipe(recipe: dict, **options) -> dict[str, torch.Tensor]:
    """nbmerge's merge of a mergekit recipe, through the parser the magics and the CLI use."""
    from nbmerge.recipes import parse_recipe

    call = parse_recipe(json.dumps(recipe))
    return nbmerge.merge(call.method, list(call.models.values()), base=call.base, progress=False,
                         **{**call.options, **options}, **call.params).state_dict


def per_model_recipe(method: str, model_set, parameters: dict, per_model: list[dict], **top) -> dict:
    return {"merge_method": method, "base_model": str(model_set.base_dir), "dtype": "float32",
            "parameters": parameters, **top,
            "models": [{"model": str(path), "parameters": own} for path, own in zip(model_set.model_dirs, per_model)]}


@pytest.mark.parametrize("method, parameters", [
    ("breadcrumbs", {}),
    ("breadcrumbs", {"normalize": True, "rescale": True, "lambda": 0.8}),
    ("breadcrumbs_ties", {}),
    ("breadcrumbs_ties", {"normalize": True, "rescale": True}),
])
def test_breadcrumbs_is_mergekits(sparse_llama_set, tmp_path, method, parameters):
    """Per-model densities and outlier fractions, on sparse task vectors (zeros tie at the lower band edge, but a
    zero contributes nothing whether kept or not). Equal to mergekit on every tensor without non-zero ties at a
    band edge; where bfloat16 repeats a value there, mergekit's sort keeps an arbitrary subset of the equal
    entries and nbmerge keeps them all (with rescale the L1 factor then differs over the whole tensor)."""
    model_set = sparse_llama_set
    densities, gammas = (0.5, 0.7, 0.9), (0.01, 0.05, 0.0)
    own = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(WEIGHTS, densities, gammas)]
    recipe = per_model_recipe(method, model_set, parameters, own)
    theirs = run_mergekit(recipe, tmp_path / "mk")
    ours = merge_recipe(recipe)
    assert set(ours) == set(theirs)
    untied = [k for k in theirs if not band_edge_tied(model_set, k, densities, gammas)]
    assert len(untied) >= len(theirs) // 3
    assert_matches({k: ours[k] for k in untied}, {k: theirs[k] for k in untied}, atol=1e-5)


def band_edge_tied(model_set, name: str, densities, gammas) -> bool:
    """Whether some model's kept band of |τ| (ascending ranks [n_bot, n_bot + k)) has a non-zero edge value that
    also occurs just outside the band, so that which of the equal entries are kept is a tie-break."""
    base = model_set.base[name].float()
    for model, density, gamma in zip(model_set.models, densities, gammas):
        ascending = (model[name].float() - base).abs().flatten().sort().values
        n = ascending.numel()
        keep, top = int(density * n), int(gamma * n)
        bottom = max(0, n - keep - top)
        if 0 < bottom and ascending[bottom] != 0 and ascending[bottom - 1] == ascending[bottom]:
            return True
        if bottom + keep < n and ascending[bottom + keep - 1] == ascending[bottom + keep]:
            return True
    return False


def test_breadcrumbs_keeps_the_band_between_the_outliers_and_the_smallest(llama_set):
    """An independent look at one tensor and one model: exactly the k entries of ascending rank [N − k − γN, N − γN)
    keep their task-vector value."""
    name = "model.layers.1.mlp.down_proj.weight"
    base, model = llama_set.base[name], llama_set.models[0][name]
    ours = nbmerge.merge("breadcrumbs", llama_set.model_dirs[:1], base=llama_set.base_dir, density=0.3, gamma=0.1,
                         progress=False).state_dict[name]
    task_vector = (model - base).reshape(-1)
    n = task_vector.numel()
    ranks = task_vector.abs().argsort().argsort()
    kept = (ranks >= n - int(0.3 * n) - int(0.1 * n)) & (ranks < n - int(0.1 * n))
    expected = base.reshape(-1) + task_vector * kept
    assert torch.allclose(ours.reshape(-1), expected, atol=1e-6)
    assert int(kept.sum()) == int(0.3 * n)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_is_mergekits(sparse_llama_set, tmp_path, select_topk):
    model_set = sparse_llama_set
    recipe = per_model_recipe("sce", model_set, {"select_topk": select_topk}, [{}, {}, {}])
    theirs = run_mergekit(recipe, tmp_path / "mk")
    ours = merge_recipe(recipe)
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    if model_set.base[next(iter(theirs))].dtype == torch.float32 or select_topk == 1.0:
        assert worst <= 1e-5
    else:  # variance ties at the top-k threshold: bfloat16 task vectors repeat values
        differing = sum(int(((ours[k] - theirs[k]).abs() > 1e-5).sum()) for k in ours)
        assert differing <= 1e-3 * sum(v.numel() for v in ours.values())


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("parameters", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False,
                                                                          "nuslerp_row_wise": True}])
def test_nuslerp_is_mergekits(llama_set, tmp_path, with_base, parameters):
    recipe = {"merge_method": "nuslerp", "dtype": "float32", "parameters": parameters,
              "models": [{"model": str(path), "parameters": {"weight": w}}
                         for path, w in zip(llama_set.model_dirs[:2], (0.3, 0.9))]}
    if with_base:
        recipe["base_model"] = str(llama_set.base_dir)
    assert_matches(merge_recipe(recipe), run_mergekit(recipe, tmp_path / "mk"), atol=1e-5)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_is_mergekits(llama_set, tmp_path, with_base):
    recipe = {"merge_method": "multislerp", "dtype": "float32",
              "models": [{"model": str(path), "parameters": {"weight": w}}
                         for path, w in zip(llama_set.model_dirs, WEIGHTS)]}
    if with_base:
        recipe["base_model"] = str(llama_set.base_dir)
    assert_matches(merge_recipe(recipe), run_mergekit(recipe, tmp_path / "mk"), atol=1e-5)


@pytest.mark.parametrize("with_base", [True, False])
def test_karcher_is_mergekits(llama_set, tmp_path, with_base):
    recipe = {"merge_method": "karcher", "dtype": "float32", "parameters": {"max_iter": 20, "tol": "1e-6"},
              "models": [{"model": str(path)} for path in llama_set.model_dirs]}
    if with_base:
        recipe["base_model"] = str(llama_set.base_dir)
    assert_matches(merge_recipe(recipe), run_mergekit(recipe, tmp_path / "mk"), atol=1e-5)


def test_karcher_of_two_directions_is_their_midpoint_on_the_sphere(llama_set):
    """Independent: two tensors of norms a, b at angle φ average to the unit bisector times (a + b) / 2."""
    name = "model.layers.0.self_attn.q_proj.weight"
    first, second = llama_set.models[0][name], llama_set.models[1][name]
    ours = nbmerge.merge("karcher", llama_set.model_dirs[:2], progress=False, max_iter=50, tol=1e-7).state_dict[name]
    bisector = first / first.norm() + second / second.norm()
    expected = bisector / bisector.norm() * (first.norm() + second.norm()) / 2
    assert torch.allclose(ours, expected, atol=1e-5)


def test_della_without_drops_is_mergekits(llama_set, tmp_path):
    """density 1 keeps every entry (mergekit's default): della is then TIES's sign election and mean, exactly."""
    for method in ("della", "della_linear"):
        recipe = per_model_recipe(method, llama_set, {"lambda": 0.9}, [{"weight": w} for w in WEIGHTS])
        assert_matches(merge_recipe(recipe), run_mergekit(recipe, tmp_path / method), atol=1e-5)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keeps_entries_with_mergekits_rank_probabilities(llama_set, tmp_path, method):
    """With drops the masks are random (nbmerge's seeded draws, mergekit's torch.bernoulli): per magnitude-rank
    decile of each row, the fraction of entries nbmerge keeps matches mergekit's within binomial noise, and both
    match (d − ε) + 2ε (r − 1)/(C − 1)."""
    density, epsilon = 0.5, 0.3
    recipe = per_model_recipe(method, llama_set, {"rescale": False, "normalize": False},
                              [{"weight": 1.0, "density": density, "epsilon": epsilon}], )
    recipe["models"] = recipe["models"][:1]
    theirs = run_mergekit(recipe, tmp_path / "mk")
    ours = merge_recipe(recipe)
    name = "model.layers.1.mlp.up_proj.weight"
    task_vector = llama_set.models[0][name] - llama_set.base[name]
    columns = task_vector.shape[1]
    rank_fraction = task_vector.abs().argsort(1).argsort(1).float() / (columns - 1)
    expected_keep = density - epsilon + 2 * epsilon * rank_fraction
    for merged in (ours, theirs):
        kept = (merged[name] - llama_set.base[name]).abs() > 0
        for decile in range(10):
            band = (rank_fraction >= decile / 10) & (rank_fraction < (decile + 1) / 10)
            observed, predicted = kept[band].float().mean().item(), expected_keep[band].mean().item()
            spread = (predicted * (1 - predicted) / int(band.sum())) ** 0.5
            assert abs(observed - predicted) < 5 * spread + 1e-3, (decile, observed, predicted)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties", "dare_linear", "linear"])
def test_gradients_and_filters_of_per_model_parameters_are_mergekits(llama_set, tmp_path, method):
    """Weights and densities given per model as anchors over depth and as filter lists (mergekit's first matching
    filter wins; an unfiltered entry matches every tensor), a top-level value as every model's default, and a
    filtered scaling (lambda)."""
    per_model = [
        {"weight": [0.2, 0.9], "density": [{"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.6}]},
        {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": [0.1, 0.5, 0.2]}], "density": 0.8},
        {},
    ]
    parameters = {"weight": 0.4, "density": [0.5, 0.9]}
    if method not in ("linear",):
        parameters["lambda"] = [{"filter": "up_proj", "value": 1.3}, {"value": 0.9}]
    if method in ("task_arithmetic", "linear"):
        per_model = [{k: v for k, v in own.items() if k != "density"} for own in per_model]
        parameters.pop("density")
    if method == "dare_linear":  # no drops: the masks are random otherwise
        per_model = [{k: v for k, v in own.items() if k != "density"} for own in per_model]
        parameters["density"] = 1.0
    recipe = per_model_recipe(method, llama_set, parameters, per_model)
    theirs = run_mergekit(recipe, tmp_path / "mk")
    ours = merge_recipe(recipe)
    assert_matches(ours, theirs, atol=1e-5)
    # the gradient did something: layer 0 and layer 1 used different weights
    plain = dict(recipe, models=[{"model": m["model"], "parameters": {"weight": 0.4}} for m in recipe["models"]])
    assert not torch.allclose(merge_recipe(plain)["model.layers.0.mlp.up_proj.weight"],
                              ours["model.layers.0.mlp.up_proj.weight"])


def frankenmerge(model_set) -> dict:
    """Three passthrough slices of two models, one model's layers read twice, o_proj zeroed in the repeat."""
    first, second = (str(path) for path in model_set.model_dirs[:2])
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": first, "layer_range": [0, 2]}]},
        {"sources": [{"model": second, "layer_range": [1, 3],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]},
        {"sources": [{"model": first, "layer_range": [1, 3]}]}]}


def test_passthrough_slices_stack_layers_as_mergekit_through_the_cli(llama_set, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from nbmerge.cli import main

    recipe = frankenmerge(llama_set)
    theirs = run_mergekit(recipe, tmp_path / "mk")
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", "--recipe", str(tmp_path / "recipe.yml"), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    ours = load_folder(tmp_path / "ours")
    assert_matches(ours, theirs, atol=0.0)
    # an independent look: output layer 3 is the second model's layer 2, its o_proj scaled to zero
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], llama_set.models[1]["model.layers.2.mlp.up_proj.weight"])
    assert not ours["model.layers.3.self_attn.o_proj.weight"].any()
    assert torch.equal(ours["model.layers.5.self_attn.o_proj.weight"], llama_set.models[0]["model.layers.2.self_attn.o_proj.weight"])
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 == json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # a loadable transformers model
    assert len(model.model.layers) == 6
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_slerp_per_slice_with_different_ranges_is_mergekits(llama_set, tmp_path):
    """Each slice merges its own sources (the base among them, at its own range); gradients run over each slice's
    layers; the embeddings come from the first slice's merge and the head from the last's."""
    base, model = str(llama_set.base_dir), str(llama_set.model_dirs[2])
    recipe = {"merge_method": "slerp", "base_model": base, "dtype": "float32", "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": model, "layer_range": [1, 3]}],
         "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}},
        {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": model, "layer_range": [0, 1]}],
         "parameters": {"t": 0.7}}]}
    theirs = run_mergekit(recipe, tmp_path / "mk")
    from nbmerge.recipes import parse_recipe, run_recipe

    ours = run_recipe(parse_recipe(json.dumps(recipe)), progress=False).state_dict
    assert_matches(ours, theirs, atol=1e-5)


# -- chat templates: nbmerge's built-in ones render as mergekit's of the same name ----------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "  Hello there \n"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "Translate"}, {"role": "user_context", "content": " chat "},
     {"role": "assistant", "content": "Unterhaltung"}],
    [{"role": "system", "content": "one"}, {"role": "system", "content": " two "},
     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "assistant", "content": "unprompted"}, {"role": "user", "content": "ok"}],
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2},
                                                                        unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _render(tokenizer, template: str, conversation, prompt: bool):
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception is part of what it renders
        return f"raised: {exc}"


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "mistral"])
def test_built_in_chat_templates_render_as_mergekits(name, chat_tokenizer):
    import importlib.resources

    from mergekit._data import chat_templates

    from nbmerge.io.chat_templates import BUILT_IN

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            assert _render(chat_tokenizer, BUILT_IN[name], conversation, prompt) == \
                _render(chat_tokenizer, theirs, conversation, prompt), (conversation, prompt)
