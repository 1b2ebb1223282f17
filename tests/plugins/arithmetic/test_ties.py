"""TIES against a brute-force float64 reference (trim, elect, disjoint merge), in tensor and model scope."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases import BIAS, EMBED, UP, Q, assert_matches, merge, randn, ties_inputs, ties_reference

import nbmerge


def test_ties_tensor_scope_keeps_the_top_density_fraction_of_each_tensor():
    base = {UP.format(0): randn(6, 5, seed=0), UP.format(1): randn(4, 5, seed=1) * 3}
    models = [{name: tensor + randn(*tensor.shape, seed=10 * i + j) for j, (name, tensor) in enumerate(base.items())}
              for i in (1, 2, 3)]
    merged = merge("ties", models, base=base, density=0.3, trim_scope="tensor")
    expected = ties_reference(base, models, density=0.3, trim_scope="tensor")
    for name in base:
        assert_matches(merged[name], expected[name], name=name)


def test_ties_hand_example_of_trim_elect_and_mean():
    # density 0.5 of 4 changed positions: each task vector keeps its 2 largest |τ|
    base, models = ties_inputs([[4.0, -1.0, 3.0, 0.5],
                                [-2.0, 0.25, 1.0, 3.0]])
    merged = merge("ties", models, base=base, density=0.5, trim_scope="tensor")
    # trimmed: [4, 0, 3, 0] and [-2, 0, 0, 3]; γ = [+, +, +, +] (empty column: no agreeing entry)
    assert_matches(merged[UP.format(0)], 0.5 + np.array([4.0, 0.0, 3.0, 3.0]))


@pytest.mark.parametrize("trim_scope, density_over, kept", [
    ("tensor", "all", 4),       # k = int(0.4 · 10 positions), as mergekit counts
    ("model", "all", 5),        # k = int(0.4 · 110 positions) ≥ the 5 changed, as FusionBench counts
    ("tensor", "changed", 2),   # k = int(0.4 · 5 changed positions)
    ("model", "changed", 2),    # the frozen tensor's 100 positions do not dilute the density
])
def test_ties_density_counts_every_position_or_only_the_changed_ones(trim_scope, density_over, kept):
    name, frozen = UP.format(0), EMBED
    base = {frozen: randn(100, seed=3), name: torch.zeros(10)}
    task_vector = torch.tensor([0.0, 5.0, 0.0, -4.0, 0.0, 3.0, 0.0, 2.0, 0.0, -1.0])
    model = {frozen: base[frozen].clone(), name: base[name] + task_vector}
    options = {} if density_over == "all" else {"density_over": density_over}  # "all" is the default
    merged = merge("ties", [model], base=base, density=0.4, trim_scope=trim_scope, **options)
    by_magnitude = [1, 3, 5, 7, 9]  # positions of 5, −4, 3, 2, −1
    expected = np.zeros(10)
    expected[by_magnitude[:kept]] = task_vector.numpy()[by_magnitude[:kept]]
    assert_matches(merged[name], expected)
    assert torch.equal(merged[frozen], base[frozen])


@pytest.mark.parametrize("sign, expected", [("sum", [-5.0, 5.0]), ("count", [1.0, -1.0])])
def test_ties_sign_election_by_mass_or_by_count(sign, expected):
    # column 0: two small positive updates against one large negative one; column 1 mirrored
    base, models = ties_inputs([[1.0, -1.0], [1.0, -1.0], [-5.0, 5.0]])
    merged = merge("ties", models, base=base, density=1.0, sign=sign, trim_scope="tensor")
    assert_matches(merged[UP.format(0)], 0.5 + np.array(expected))


@pytest.mark.parametrize("merge_func, expected", [("mean", [2.0, -3.0]), ("sum", [4.0, -6.0]), ("max", [3.0, -4.0])])
def test_ties_merge_func(merge_func, expected):
    # column 0: γ = + (mass 2), agreeing 1 and 3; column 1: γ = − (mass −5), agreeing −4 and −2
    base, models = ties_inputs([[1.0, -4.0], [3.0, 1.0], [-2.0, -2.0]])
    merged = merge("ties", models, base=base, density=1.0, merge_func=merge_func, trim_scope="tensor")
    assert_matches(merged[UP.format(0)], 0.5 + np.array(expected))


def test_ties_scaling_multiplies_the_merged_task_vector():
    base, models = ties_inputs([[1.0, -4.0], [3.0, 1.0], [-2.0, -2.0]])
    merged = merge("ties", models, base=base, density=1.0, scaling=0.5, trim_scope="tensor")
    assert_matches(merged[UP.format(0)], 0.5 + 0.5 * np.array([2.0, -3.0]))


def test_ties_exact_sign_ties_elect_plus_in_tensor_scope():
    # by mass: +2 and −2 cancel exactly; by count: one + and one − (the mass would say −)
    base, models = ties_inputs([[2.0, 1.0], [-2.0, -3.0]])
    by_sum = merge("ties", models, base=base, density=1.0, sign="sum", trim_scope="tensor")
    assert_matches(by_sum[UP.format(0)], 0.5 + np.array([2.0, -3.0]))
    by_count = merge("ties", models, base=base, density=1.0, sign="count", trim_scope="tensor")
    assert_matches(by_count[UP.format(0)], 0.5 + np.array([2.0, 1.0]))


def test_ties_weights_multiply_task_vectors_before_the_election():
    base, models = ties_inputs([[2.0], [-1.0]])
    merged = merge("ties", models, base=base, density=1.0, weights=[1.0, 3.0], trim_scope="tensor")
    # w·τ = [2, −3]: γ = −; weighted disjoint mean Σ w τ̂ [agree] / Σ w [agree] = −3 / 3
    assert_matches(merged[UP.format(0)], np.array([0.5 - 1.0]))
    unweighted = merge("ties", models, base=base, density=1.0, trim_scope="tensor")
    assert_matches(unweighted[UP.format(0)], np.array([0.5 + 2.0]))


def two_scale_ties_inputs():
    """Two tensors on different scales, so that one global threshold and per-tensor thresholds keep different sets."""
    large, small = UP.format(0), UP.format(1)
    base = {large: randn(3, 4, seed=0), small: randn(3, 4, seed=1)}
    models = []
    for i in (1, 2):
        models.append({large: base[large] + randn(3, 4, seed=10 + i) * 2.0,
                       small: base[small] + randn(3, 4, seed=20 + i) * 0.3})
    return base, models


def test_ties_model_scope_uses_one_global_threshold():
    base, models = two_scale_ties_inputs()
    global_result = merge("ties", models, base=base, density=0.4, trim_scope="model")
    expected_global = ties_reference(base, models, density=0.4, trim_scope="model")
    expected_per_tensor = ties_reference(base, models, density=0.4, trim_scope="tensor")
    for name in base:
        assert_matches(global_result[name], expected_global[name], name=name)
    # the example is built so that the two scopes really differ
    assert not all(np.allclose(expected_global[n], expected_per_tensor[n]) for n in base)
    per_tensor = merge("ties", models, base=base, density=0.4, trim_scope="tensor")
    for name in base:
        assert_matches(per_tensor[name], expected_per_tensor[name], name=name)


def many_valued_ties_inputs():
    """Three task vectors over three tensors of different sizes and scales, ~90k entries each, a fifth unchanged."""
    shapes = {UP.format(0): (300, 257), Q.format(0): (64, 64), BIAS.format(0): (257,)}
    base = {name: randn(*shape, seed=1) for name, shape in shapes.items()}
    models = []
    for i in range(3):
        model = {}
        for j, (name, shape) in enumerate(shapes.items()):
            delta = randn(*shape, seed=100 + 10 * i + j) * (0.5 + j)
            delta.view(-1)[::5] = 0.0
            model[name] = base[name] + delta
        models.append(model)
    return base, models


@pytest.mark.parametrize("budget", [1 << 22, 97])
def test_ties_model_scope_threshold_is_exact_on_many_values(monkeypatch, budget):
    """The sampled bracket (also thinned down to a tiny sample budget) gives the exact global threshold, without
    the radix fallback."""
    from nbmerge_plugins import _selection

    def no_fallback(*args):
        raise AssertionError("the sampled bracket missed the threshold")

    monkeypatch.setattr(_selection, "MODEL_SAMPLE_BUDGET", budget)
    monkeypatch.setattr(_selection, "radix_global_thresholds", no_fallback)
    base, models = many_valued_ties_inputs()
    merged = merge("ties", models, base=base, density=0.3, trim_scope="model")
    expected = ties_reference(base, models, density=0.3, trim_scope="model")
    for name in base:
        assert_matches(merged[name], expected[name], name=name)


def test_ties_model_scope_falls_back_to_radix_selection_when_the_bracket_misses(monkeypatch):
    from nbmerge_plugins import _selection

    monkeypatch.setattr(_selection, "bracket", lambda sample, kept_fraction: (1e6, 2e6))   # holds no entry at all
    base, models = many_valued_ties_inputs()
    merged = merge("ties", models, base=base, density=0.3, trim_scope="model")
    expected = ties_reference(base, models, density=0.3, trim_scope="model")
    for name in base:
        assert_matches(merged[name], expected[name], name=name)


@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_ties_density_per_model(trim_scope):
    base, models = many_valued_ties_inputs()
    densities = [0.05, 0.3, 0.8]
    merged = merge("ties", models, base=base, density=densities, trim_scope=trim_scope, weights=[1.0, 0.5, 2.0])
    expected = ties_reference(base, models, density=densities, trim_scope=trim_scope, weights=[1.0, 0.5, 2.0])
    for name in base:
        assert_matches(merged[name], expected[name], name=name)
    with pytest.raises(nbmerge.ParameterError, match="'density' has 2 values for 3 models"):
        merge("ties", models, base=base, density=[0.1, 0.2])
    with pytest.raises(nbmerge.ParameterError, match=r"'density' must be in \(0, 1\], got 1.5"):
        merge("ties", models, base=base, density=[0.1, 0.2, 1.5])


def test_ties_model_scope_is_the_default():
    base, models = two_scale_ties_inputs()
    default = merge("ties", models, base=base, density=0.4)
    expected_global = ties_reference(base, models, density=0.4, trim_scope="model")
    for name in base:
        assert_matches(default[name], expected_global[name], name=name)


@pytest.mark.parametrize("majority", [-1.0, 1.0])
def test_ties_model_scope_exact_tie_takes_the_global_majority_sign(majority):
    agreeing, tied = UP.format(0), UP.format(1)
    base = {agreeing: torch.zeros(4), tied: torch.zeros(2)}
    models = [{agreeing: torch.full((4,), majority), tied: torch.tensor([2.0, 1.0])},
              {agreeing: torch.full((4,), majority), tied: torch.tensor([-2.0, 1.0])}]
    # elected signs over the model: four times `majority`, once +, once a tie (2 − 2)
    model_scope = merge("ties", models, base=base, density=1.0, trim_scope="model")
    assert_matches(model_scope[tied], np.array([2.0 * majority, 1.0]))
    assert_matches(model_scope[agreeing], np.full(4, majority))
    tensor_scope = merge("ties", models, base=base, density=1.0, trim_scope="tensor")
    assert_matches(tensor_scope[tied], np.array([2.0, 1.0]))


def test_ties_model_scope_on_a_llama_with_frozen_embeddings_matches_brute_force(llama_set):
    base = llama_set.base
    models = [dict(m) for m in llama_set.models]
    for model in models:  # embeddings left untrained: with density_over="changed" they do not count
        model["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    merged = merge("ties", models, base=base, density=0.2, sign="sum", merge_func="mean", trim_scope="model",
                   scaling=1.0, density_over="changed")
    expected = ties_reference(base, models, density=0.2, trim_scope="model", density_over="changed")
    assert set(merged) == set(base)
    for name in expected:
        assert_matches(merged[name], expected[name], atol=1e-6, rtol=0, name=name)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # about 20% of the trained entries of each task vector survive
    trained = sum(t.numel() for n, t in base.items() if n != "model.embed_tokens.weight")
    keep = int(0.2 * trained)
    changed = sum(int((merged[n] != base[n]).sum()) for n in base)
    assert keep <= changed <= 3 * keep  # the union of the three kept sets


@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_ties_merges_large_tensors_block_by_block_exactly(llama_set, monkeypatch, trim_scope):
    """Large tensors are merged in blocks of positions; block boundaries must not change any value."""
    from nbmerge_plugins import _task_vectors

    whole = nbmerge.merge("ties", llama_set.models, base=llama_set.base, trim_scope=trim_scope, density=0.3,
                          device="cpu", progress=False).state_dict
    monkeypatch.setattr(_task_vectors, "BLOCK", 37)  # many blocks per tensor, boundaries mid-row
    blocked = nbmerge.merge("ties", llama_set.models, base=llama_set.base, trim_scope=trim_scope, density=0.3,
                            device="cpu", progress=False).state_dict
    for name, value in whole.items():
        assert torch.equal(blocked[name], value), name


# -- TIES per-tensor thresholds on tensors large enough to be sampled ---------------------------------------------
def _large_ties_job(seed: int = 3, n_models: int = 3, numel: int = 3 * 2**20 + 17):
    from nbmerge.method.declaration import TensorJob

    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator)
    models = []
    for i in range(n_models):
        delta = torch.randn(numel, generator=generator) * 0.01
        delta[: numel // 10] = 0.0  # frozen positions (unchanged by every model) do not count towards k
        delta[numel // 2: numel // 2 + 1000] = 0.0125  # exact duplicates straddling likely thresholds
        models.append(base + delta)
    return TensorJob(name="w", models=models, base=base, params={"weights": [1.0, 2.0, 0.5][:n_models]},
                     layer=None, num_layers=0)


def _topk_thresholds(job, density, over_changed=False):
    vectors = torch.stack([(m - job.base) * w for m, w in zip(job.models, job.params["weights"])])
    keep = int(density * (int((vectors != 0).any(0).sum()) if over_changed else vectors.shape[1]))
    return [float(row.abs().topk(keep).values[-1]) for row in vectors]


@pytest.mark.parametrize("over_changed", [False, True], ids=["all", "changed"])
@pytest.mark.parametrize("density", [0.003, 0.2, 0.5, 0.95, 1.0])
def test_ties_tensor_thresholds_equal_topk_on_large_tensors(density, over_changed):
    from nbmerge_plugins._selection import tensor_thresholds

    job = _large_ties_job()
    assert tensor_thresholds(job, density, over_changed) == _topk_thresholds(job, density, over_changed)


def test_ties_tensor_thresholds_stay_exact_when_the_sampled_bracket_misses(monkeypatch):
    from nbmerge_plugins import _selection

    job = _large_ties_job(seed=5)
    monkeypatch.setattr(_selection, "bracket", lambda sample, fraction: (0.0, 1e-9))  # a bracket far too low
    assert _selection.tensor_thresholds(job, 0.2) == _topk_thresholds(job, 0.2)
