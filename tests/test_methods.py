"""The built-in merge methods, checked number by number against independent computations of METHODS.md.

Every test merges small in-memory state dicts through the public ``nbmerge.merge`` and compares the result with
the formula written out here (float64 NumPy or explicit torch arithmetic), never with the plugins' own helpers.
Tensor names follow Llama: ``model.layers.<i>.`` tensors are in the layer stack (layer-aware options apply);
``model.embed_tokens.weight``, ``model.norm.weight`` and ``lm_head.weight`` are outside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import nbmerge
from nbmerge import ModelInputError, ParameterError

UP = "model.layers.{}.mlp.up_proj.weight"
Q = "model.layers.{}.self_attn.q_proj.weight"
BIAS = "model.layers.{}.mlp.up_proj.bias"
LAYER_NORM = "model.layers.{}.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


# -- building inputs -----------------------------------------------------------------------------------------------
def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def decoder_state(num_layers: int = 2, hidden: int = 4, vocab: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny decoder: embeddings, per layer an attention and an MLP projection, a bias, a norm; final norm, head."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator)

    state = {EMBED: draw(vocab, hidden)}
    for i in range(num_layers):
        state[Q.format(i)] = draw(hidden, hidden)
        state[UP.format(i)] = draw(2 * hidden, hidden)
        state[BIAS.format(i)] = draw(2 * hidden)
        state[LAYER_NORM.format(i)] = draw(hidden)
    state[FINAL_NORM] = draw(hidden)
    state[HEAD] = draw(vocab, hidden)
    return state


def fine_tuned(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """``state`` with every floating tensor moved by seeded noise: a stand-in fine-tune."""
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + scale * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point()
            else tensor.clone() for name, tensor in state.items()}


def merge(method: str, models, base=None, **params) -> dict[str, torch.Tensor]:
    return nbmerge.merge(method, models, base=base, device="cpu", progress=False, **params).state_dict


# -- comparing -----------------------------------------------------------------------------------------------------
def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


def assert_matches(actual: torch.Tensor, expected: np.ndarray, atol: float = 1e-6, rtol: float = 1e-6, name=""):
    assert tuple(actual.shape) == tuple(expected.shape), name
    np.testing.assert_allclose(f64(actual), expected, rtol=rtol, atol=atol, err_msg=name)


# -- independent computations (METHODS.md written out) --------------------------------------------------------------
def weighted_sum_reference(tensors: list[torch.Tensor], weights: list[float]) -> np.ndarray:
    return sum(w * f64(t) for w, t in zip(weights, tensors))


def lerp_reference(first: torch.Tensor, second: torch.Tensor, t: float) -> np.ndarray:
    return (1.0 - t) * f64(first) + t * f64(second)


def slerp_reference(first: torch.Tensor, second: torch.Tensor, t: float, eps: float = 1e-8) -> np.ndarray:
    """SLERP of the flattened tensors; weights from the normalised vectors applied to the unnormalised ones."""
    v0, v1 = f64(first).ravel(), f64(second).ravel()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float(u0 @ u1)
    if abs(dot) > 0.9995:
        result = (1.0 - t) * v0 + t * v1
    else:
        angle = math.acos(max(-1.0, min(1.0, dot)))
        result = (math.sin((1.0 - t) * angle) * v0 + math.sin(t * angle) * v1) / math.sin(angle)
    return result.reshape(tuple(first.shape))


def depth_schedule(anchors: list[float], layer: int | None, num_layers: int) -> float:
    """Anchors spread evenly over [0, 1]; layer i of L sits at i / (L − 1); outside the stack: the first anchor."""
    if layer is None:
        return anchors[0]
    return float(np.interp(layer / (num_layers - 1), np.linspace(0.0, 1.0, len(anchors)), anchors))


def ties_reference(base: dict, models: list[dict], *, density: float, sign: str = "sum", merge_func: str = "mean",
                   scaling: float = 1.0, weights: list[float] | None = None,
                   trim_scope: str = "tensor") -> dict[str, np.ndarray]:
    """TIES by brute force in float64.

    Trim: per task vector keep the entries whose |w_i τ_i| is at least the k-th largest, k = int(density · number
    of positions some model changed), counted per tensor ("tensor") or over all tensors concatenated ("model").
    Elect γ per position by summed mass or summed signs; γ = 0 takes + (tensor scope) or the sign of the
    model-wide sum of elected signs (model scope). Disjoint merge over the agreeing non-zero entries.
    """
    names = [name for name, tensor in base.items() if tensor.is_floating_point()]
    w = np.array(weights if weights is not None else [1.0] * len(models), dtype=np.float64)
    shapes = {name: tuple(base[name].shape) for name in names}
    # task vectors are the float32 differences of the user's tensors, one flattened row per model
    rows = {name: np.stack([f64(m[name] - base[name]).ravel() for m in models]) * w[:, None] for name in names}

    def keep_masks(vectors: np.ndarray) -> np.ndarray:
        changed = int(np.any(vectors != 0, axis=0).sum())
        k = int(density * changed)
        masks = np.zeros(vectors.shape, dtype=bool)
        if k == 0:
            return masks
        for i, row in enumerate(vectors):
            kth_largest = np.sort(np.abs(row))[::-1][k - 1]
            masks[i] = np.abs(row) >= kth_largest
        return masks

    if trim_scope == "model":
        everything = np.concatenate([rows[name] for name in names], axis=1)
        masks_flat = keep_masks(everything)
        splits = np.cumsum([rows[name].shape[1] for name in names])[:-1]
        masks = dict(zip(names, np.split(masks_flat, splits, axis=1)))
    else:
        masks = {name: keep_masks(rows[name]) for name in names}
    trimmed = {name: rows[name] * masks[name] for name in names}

    elected = {}
    for name in names:
        votes = trimmed[name].sum(0) if sign == "sum" else np.sign(trimmed[name]).sum(0)
        elected[name] = np.sign(votes)
    if trim_scope == "model":
        tie_sign = 1.0 if sum(elected[name].sum() for name in names) >= 0 else -1.0
    else:
        tie_sign = 1.0
    result = {}
    for name in names:
        gamma = np.where(elected[name] == 0, tie_sign, elected[name])
        entries = trimmed[name]
        agrees = (np.sign(entries) == gamma) & (entries != 0)
        if merge_func == "sum":
            merged = (entries * agrees).sum(0)
        elif merge_func == "max":
            merged = gamma * (np.abs(entries) * agrees).max(0)
        else:
            divisor = (w[:, None] * agrees).sum(0)
            merged = (entries * agrees).sum(0) / np.where(divisor == 0, 1.0, divisor)
        result[name] = (f64(base[name]).ravel() + scaling * merged).reshape(shapes[name])
    return result


# =================================================================================================================
# weighted_average and simple_average
# =================================================================================================================
def test_weighted_average_normalises_the_weights():
    models = [randn(3, 5, seed=s) for s in (1, 2, 3)]
    merged = merge("weighted_average", [{"w": m} for m in models], weights=[1.0, 2.0, 5.0])
    assert_matches(merged["w"], weighted_sum_reference(models, [1 / 8, 2 / 8, 5 / 8]))


def test_weighted_average_without_normalize_uses_the_raw_weights():
    models = [randn(3, 5, seed=s) for s in (1, 2, 3)]
    merged = merge("weighted_average", [{"w": m} for m in models], weights=[0.5, -0.25, 2.0], normalize=False)
    assert_matches(merged["w"], weighted_sum_reference(models, [0.5, -0.25, 2.0]))


def test_weighted_average_weights_summing_to_zero_cannot_be_normalised():
    a, b = randn(4, seed=1), randn(4, seed=2)
    with pytest.raises(ParameterError, match="normali"):
        merge("weighted_average", [{"w": a}, {"w": b}], weights=[1.0, -1.0])
    # without normalisation the same weights are a plain difference
    merged = merge("weighted_average", [{"w": a}, {"w": b}], weights=[1.0, -1.0], normalize=False)
    assert_matches(merged["w"], f64(a) - f64(b))


def test_weighted_average_backbone_only_takes_tensors_outside_the_layers_from_the_base():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2)]
    merged = merge("weighted_average", models, base=base, weights=[3.0, 1.0], backbone_only=True)
    for name in base:
        if name.startswith("model.layers."):
            # the base takes no part in the average of the layers
            assert_matches(merged[name], weighted_sum_reference([m[name] for m in models], [0.75, 0.25]), name=name)
        else:
            assert torch.equal(merged[name], base[name]), name


def test_weighted_average_backbone_only_without_base_copies_the_first_model():
    first = decoder_state(seed=0)
    second = fine_tuned(first, seed=1)
    merged = merge("weighted_average", [first, second], backbone_only=True)
    for name in (EMBED, FINAL_NORM, HEAD):
        assert torch.equal(merged[name], first[name]), name
    assert_matches(merged[UP.format(1)], 0.5 * f64(first[UP.format(1)]) + 0.5 * f64(second[UP.format(1)]))


def test_weighted_average_backbone_only_allows_different_vocabularies():
    base = decoder_state(vocab=6, seed=0)
    models = []
    for seed in (1, 2):
        model = fine_tuned(base, seed=seed)
        model[EMBED] = randn(9, 4, seed=10 + seed)  # vocabulary extended to 9 tokens
        model[HEAD] = randn(9, 4, seed=20 + seed)
        models.append(model)
    merged = merge("weighted_average", models, base=base, backbone_only=True)
    assert merged[EMBED].shape == (6, 4) and torch.equal(merged[EMBED], base[EMBED])
    assert torch.equal(merged[HEAD], base[HEAD])
    assert_matches(merged[Q.format(0)], weighted_sum_reference([m[Q.format(0)] for m in models], [0.5, 0.5]))
    # averaging everything is impossible with two vocabularies, and the error names the tensor
    with pytest.raises(ModelInputError, match="embed_tokens"):
        merge("weighted_average", [models[0], base])


def test_simple_average_is_the_uniform_mean():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    merged = merge("simple_average", models)
    assert set(merged) == set(base)
    for name in base:
        assert_matches(merged[name], sum(f64(m[name]) for m in models) / 3, name=name)


def test_simple_average_takes_no_base():
    with pytest.raises(ParameterError, match="base"):
        merge("simple_average", [{"w": randn(2, seed=1)}, {"w": randn(2, seed=2)}], base={"w": randn(2, seed=3)})


# =================================================================================================================
# linear
# =================================================================================================================
def test_linear_between_two_models():
    a, b = randn(4, 3, seed=1), randn(4, 3, seed=2)
    assert torch.equal(merge("linear", [{"w": a}, {"w": b}], t=0.0)["w"], a)
    assert torch.equal(merge("linear", [{"w": a}, {"w": b}], t=1.0)["w"], b)
    assert_matches(merge("linear", [{"w": a}, {"w": b}], t=0.3)["w"], lerp_reference(a, b, 0.3))


def test_linear_from_the_base_to_one_model():
    base, model = randn(4, 3, seed=1), randn(4, 3, seed=2)
    assert torch.equal(merge("linear", [{"w": model}], base={"w": base}, t=0.0)["w"], base)
    assert torch.equal(merge("linear", [{"w": model}], base={"w": base}, t=1.0)["w"], model)
    assert_matches(merge("linear", [{"w": model}], base={"w": base}, t=0.25)["w"], lerp_reference(base, model, 0.25))


def test_linear_t_schedule_is_piecewise_linear_over_layer_depth():
    num_layers, anchors = 5, [0.2, 1.0, 0.5]
    first = decoder_state(num_layers=num_layers, seed=0)
    second = decoder_state(num_layers=num_layers, seed=1)
    merged = merge("linear", [first, second], t=anchors)
    # layer i of 5 sits at i/4: positions 0, .25, .5, .75, 1 -> t = 0.2, 0.6, 1.0, 0.75, 0.5
    expected_t = [0.2, 0.6, 1.0, 0.75, 0.5]
    for i in range(num_layers):
        assert depth_schedule(anchors, i, num_layers) == pytest.approx(expected_t[i])
        for name in (Q.format(i), UP.format(i), LAYER_NORM.format(i)):
            assert_matches(merged[name], lerp_reference(first[name], second[name], expected_t[i]), name=name)
    for name in (EMBED, FINAL_NORM, HEAD):  # outside the layer stack: the first anchor
        assert_matches(merged[name], lerp_reference(first[name], second[name], anchors[0]), name=name)


# =================================================================================================================
# task_arithmetic
# =================================================================================================================
def test_task_arithmetic_default_scaling_is_0_3():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2)]
    merged = merge("task_arithmetic", models, base=base)
    for name in base:
        expected = f64(base[name]) + 0.3 * sum(f64(m[name]) - f64(base[name]) for m in models)
        assert_matches(merged[name], expected, name=name)


def test_task_arithmetic_scaling_and_weights():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    weights = [1.0, -0.5, 2.0]
    merged = merge("task_arithmetic", models, base=base, scaling=0.7, weights=weights)
    for name in base:
        task_sum = sum(w * (f64(m[name]) - f64(base[name])) for w, m in zip(weights, models))
        assert_matches(merged[name], f64(base[name]) + 0.7 * task_sum, name=name)


# =================================================================================================================
# ties
# =================================================================================================================
def ties_inputs(task_vectors: list[list[float]], name: str = UP.format(0), base_value: float = 0.5):
    """A base filled with ``base_value`` and one model per row of ``task_vectors`` (one 1-D tensor each)."""
    base = {name: torch.full((len(task_vectors[0]),), base_value)}
    models = [{name: base[name] + torch.tensor(row)} for row in task_vectors]
    return base, models


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


@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_ties_positions_no_model_changed_do_not_count_toward_density(trim_scope):
    name, frozen = UP.format(0), EMBED
    base = {frozen: randn(100, seed=3), name: torch.zeros(10)}
    task_vector = torch.tensor([0.0, 5.0, 0.0, -4.0, 0.0, 3.0, 0.0, 2.0, 0.0, -1.0])
    model = {frozen: base[frozen].clone(), name: base[name] + task_vector}
    merged = merge("ties", [model], base=base, density=0.4, trim_scope=trim_scope)
    # 5 changed positions -> k = int(0.4 · 5) = 2 (counting every position would keep 4, or all 5 in model scope)
    assert_matches(merged[name], np.array([0.0, 5.0, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
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
    from nbmerge_plugins import ties

    def no_fallback(*args):
        raise AssertionError("the sampled bracket missed the threshold")

    monkeypatch.setattr(ties, "MODEL_SAMPLE_BUDGET", budget)
    monkeypatch.setattr(ties, "_radix_global_thresholds", no_fallback)
    base, models = many_valued_ties_inputs()
    merged = merge("ties", models, base=base, density=0.3, trim_scope="model")
    expected = ties_reference(base, models, density=0.3, trim_scope="model")
    for name in base:
        assert_matches(merged[name], expected[name], name=name)


def test_ties_model_scope_falls_back_to_radix_selection_when_the_bracket_misses(monkeypatch):
    from nbmerge_plugins import ties

    monkeypatch.setattr(ties, "_bracket", lambda sample, kept_fraction: (1e6, 2e6))   # holds no entry at all
    base, models = many_valued_ties_inputs()
    merged = merge("ties", models, base=base, density=0.3, trim_scope="model")
    expected = ties_reference(base, models, density=0.3, trim_scope="model")
    for name in base:
        assert_matches(merged[name], expected[name], name=name)


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
    for model in models:  # embeddings left untrained: they must not count toward the density
        model["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    merged = merge("ties", models, base=base, density=0.2, sign="sum", merge_func="mean", trim_scope="model",
                   scaling=1.0)
    expected = ties_reference(base, models, density=0.2, trim_scope="model")
    assert set(merged) == set(base)
    for name in expected:
        assert_matches(merged[name], expected[name], atol=1e-6, rtol=0, name=name)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # about 20% of the trained entries of each task vector survive
    trained = sum(t.numel() for n, t in base.items() if n != "model.embed_tokens.weight")
    keep = int(0.2 * trained)
    changed = sum(int((merged[n] != base[n]).sum()) for n in base)
    assert keep <= changed <= 3 * keep  # the union of the three kept sets


# =================================================================================================================
# dare
# =================================================================================================================
def dare_inputs(shape=(8, 16), n_models: int = 2):
    """A base and models whose task vectors are non-zero everywhere (|τ| in [0.5, 1.5])."""
    base = {UP.format(0): randn(*shape, seed=0), Q.format(0): randn(*shape, seed=1),
            UP.format(1): randn(*shape, seed=2), Q.format(1): randn(*shape, seed=3)}
    models = []
    for i in range(n_models):
        model = {}
        for j, (name, tensor) in enumerate(base.items()):
            magnitude = 0.5 + torch.rand(shape, generator=torch.Generator().manual_seed(100 * i + j))
            signs = torch.where(randn(*shape, seed=1000 + 200 * i + j) >= 0, 1.0, -1.0)
            model[name] = tensor + magnitude * signs
        models.append(model)
    return base, models


def test_dare_with_drop_rate_0_is_task_arithmetic():
    base, models = dare_inputs()
    merged = merge("dare", models, base=base, drop_rate=0.0, scaling=0.4, weights=[1.0, 0.5])
    for name in base:
        task_sum = (f64(models[0][name]) - f64(base[name])) + 0.5 * (f64(models[1][name]) - f64(base[name]))
        assert_matches(merged[name], f64(base[name]) + 0.4 * task_sum, name=name)


def test_dare_is_reproducible_from_its_seed_and_seeds_differ():
    base, models = dare_inputs()
    first = merge("dare", models, base=base, drop_rate=0.5, seed=7)
    again = merge("dare", models, base=base, drop_rate=0.5, seed=7)
    other = merge("dare", models, base=base, drop_rate=0.5, seed=8)
    for name in base:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other[name]), name


def test_dare_masks_do_not_depend_on_tensor_order_or_on_the_other_tensors():
    base, models = dare_inputs()
    reference = merge("dare", models, base=base, drop_rate=0.5, seed=3)
    reversed_order = merge("dare", [dict(reversed(list(m.items()))) for m in models],
                           base=dict(reversed(list(base.items()))), drop_rate=0.5, seed=3)
    subset_names = [Q.format(1), UP.format(1)]
    subset = merge("dare", [{n: m[n] for n in subset_names} for m in models], base={n: base[n] for n in subset_names},
                   drop_rate=0.5, seed=3)
    for name in base:
        assert torch.equal(reversed_order[name], reference[name]), name
    for name in subset_names:
        assert torch.equal(subset[name], reference[name]), name


def test_dare_draws_a_separate_mask_for_every_tensor_and_model():
    # identical task vectors everywhere: only the masks can tell the tensors and the models apart
    names = [UP.format(0), UP.format(1)]
    base = {name: torch.zeros(30, 40) for name in names}
    models = [{name: torch.ones(30, 40) for name in names} for _ in range(2)]
    revealed = merge("dare", models, base=base, drop_rate=0.5, rescale=False, scaling=1.0, seed=1)
    first, second = (revealed[name] for name in names)
    assert not torch.equal(first, second)  # two tensors of one shape get different masks
    # two models with the same task vector: Σ m_i ∈ {0, 1, 2}; identical masks would never give 1
    assert int((first == 1).sum()) > 0.3 * first.numel()


def survivors(merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Where the merged tensor moved away from the base (every τ entry of these inputs is non-zero)."""
    return merged != base


def test_dare_survivors_are_rescaled_by_one_over_one_minus_p():
    name = UP.format(0)
    base = {name: randn(100, 100, seed=0)}
    task_vector = (0.5 + torch.rand(100, 100, generator=torch.Generator().manual_seed(1))) * torch.where(
        randn(100, 100, seed=2) >= 0, 1.0, -1.0)
    model = {name: base[name] + task_vector}
    p, scaling = 0.99, 0.5
    merged = merge("dare", [model], base=base, drop_rate=p, scaling=scaling)[name]
    kept = survivors(merged, base[name])
    # 10 000 Bernoulli(0.01) draws: 100 expected, standard deviation ~10
    assert 50 <= int(kept.sum()) <= 150
    true_tau = f64(model[name]) - f64(base[name])
    expected = f64(base[name]) + scaling * true_tau / (1.0 - p)
    np.testing.assert_allclose(f64(merged)[kept.numpy()], expected[kept.numpy()], rtol=1e-5, atol=1e-4)
    assert torch.equal(merged[~kept], base[name][~kept])


def test_dare_drops_a_fraction_p_of_the_entries():
    name = UP.format(0)
    base = {name: torch.zeros(400, 500)}
    model = {name: torch.ones(400, 500)}
    p = 0.3
    merged = merge("dare", [model], base=base, drop_rate=p, scaling=1.0, seed=11)[name]
    n = merged.numel()
    dropped = int((merged == 0).sum())
    tolerance = 5 * math.sqrt(n * p * (1 - p))  # five binomial standard deviations
    assert abs(dropped - n * p) <= tolerance
    assert_matches(merged[merged != 0], np.full(n - dropped, 1.0 / (1.0 - p)))


def test_dare_rescale_l1_keeps_each_task_vectors_l1_norm():
    base, models = dare_inputs(shape=(20, 30), n_models=1)
    merged = merge("dare", models, base=base, drop_rate=0.6, rescale="l1", scaling=1.0, seed=5)
    for name in base:
        task_vector = f64(models[0][name]) - f64(base[name])
        merged_delta = f64(merged[name]) - f64(base[name])
        kept = survivors(merged[name], base[name]).numpy()
        assert 0 < kept.sum() < kept.size
        np.testing.assert_allclose(np.abs(merged_delta).sum(), np.abs(task_vector).sum(), rtol=1e-5)
        # one common factor ‖τ‖₁ / ‖m ⊙ τ‖₁ on the survivors (not 1 / (1 − p))
        factor = np.abs(task_vector).sum() / np.abs(task_vector[kept]).sum()
        np.testing.assert_allclose(merged_delta[kept], factor * task_vector[kept], rtol=1e-5, atol=1e-5)


def test_dare_without_rescale_keeps_survivors_as_they_are():
    base, models = dare_inputs(n_models=1)
    merged = merge("dare", models, base=base, drop_rate=0.5, rescale=False, scaling=0.8, seed=2)
    for name in base:
        kept = survivors(merged[name], base[name])
        assert 0 < int(kept.sum()) < kept.numel()
        expected = f64(base[name]) + 0.8 * (f64(models[0][name]) - f64(base[name]))
        np.testing.assert_allclose(f64(merged[name])[kept.numpy()], expected[kept.numpy()], rtol=1e-6, atol=1e-6)


def test_dare_ties_combination_without_drops():
    # column 0: γ = + (mass 2) sums 1 + 3; column 1: γ = − sums −4 − 2; column 2: exact tie elects +
    base, models = ties_inputs([[1.0, -4.0, 2.0], [3.0, 1.0, -2.0], [-2.0, -2.0, 0.0]])
    merged = merge("dare", models, base=base, drop_rate=0.0, combine="ties", scaling=0.5)
    assert_matches(merged[UP.format(0)], 0.5 + 0.5 * np.array([4.0, -6.0, 2.0]))


def test_dare_ties_combination_of_the_random_sparse_task_vectors():
    base, models = dare_inputs()
    p, scaling, seed = 0.5, 0.7, 4
    merged = merge("dare", models, base=base, drop_rate=p, combine="ties", scaling=scaling, seed=seed)
    # The masks depend only on (seed, tensor name, model index): read model i's mask off a linear DARE in which
    # every other model equals the base.
    masks = []
    for i in range(len(models)):
        alone = [models[j] if j == i else base for j in range(len(models))]
        revealed = merge("dare", alone, base=base, drop_rate=p, rescale=False, scaling=1.0, seed=seed)
        masks.append({name: survivors(revealed[name], base[name]).numpy() for name in base})
    for name in base:
        sparse = np.stack([masks[i][name] * (f64(m[name]) - f64(base[name])) / (1 - p) for i, m in enumerate(models)])
        gamma = np.sign(sparse.sum(0))
        gamma[gamma == 0] = 1.0
        combined = (sparse * (np.sign(sparse) == gamma)).sum(0)
        assert_matches(merged[name], f64(base[name]) + scaling * combined, atol=1e-5, name=name)


# =================================================================================================================
# slerp
# =================================================================================================================
def test_slerp_generic_angle_matches_the_formula():
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    cosine = float(f64(a).ravel() @ f64(b).ravel()) / (np.linalg.norm(f64(a)) * np.linalg.norm(f64(b)))
    assert abs(cosine) < 0.9  # a genuine angle, far from the lerp fallback
    merged = merge("slerp", [{"w": a}, {"w": b}], t=0.3)["w"]
    expected = slerp_reference(a, b, 0.3)
    assert_matches(merged, expected, atol=1e-5, rtol=1e-5)
    assert not np.allclose(expected, lerp_reference(a, b, 0.3), atol=1e-3)


def test_slerp_of_zero_vectors_is_finite():
    zero, b = torch.zeros(3, 4), randn(3, 4, seed=2)
    both_zero = merge("slerp", [{"w": zero}, {"w": zero.clone()}], t=0.5)["w"]
    assert torch.equal(both_zero, torch.zeros(3, 4))
    # a zero vector is left unnormalised: dot = 0, Θ = π/2, so θ = sin(tπ/2) · v1
    one_zero = merge("slerp", [{"w": zero}, {"w": b}], t=0.5)["w"]
    assert torch.isfinite(one_zero).all()
    assert_matches(one_zero, slerp_reference(zero, b, 0.5), atol=1e-6)
    assert_matches(one_zero, math.sin(0.25 * math.pi) * f64(b), atol=1e-6)


@pytest.mark.parametrize("factor", [2.5, -1.5], ids=["parallel", "anti-parallel"])
def test_slerp_of_parallel_vectors_falls_back_to_lerp(factor):
    a = randn(3, 4, seed=1)
    b = a * factor
    merged = merge("slerp", [{"w": a}, {"w": b}], t=0.3)["w"]
    assert torch.isfinite(merged).all()
    assert_matches(merged, lerp_reference(a, b, 0.3), atol=1e-6)


def test_slerp_endpoints():
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    assert torch.equal(merge("slerp", [{"w": a}, {"w": b}], t=0.0)["w"], a)
    assert torch.equal(merge("slerp", [{"w": a}, {"w": b}], t=1.0)["w"], b)
    # with a base, the base is the t = 0 endpoint
    assert torch.equal(merge("slerp", [{"w": b}], base={"w": a}, t=0.0)["w"], a)
    assert_matches(merge("slerp", [{"w": b}], base={"w": a}, t=0.7)["w"], slerp_reference(a, b, 0.7), atol=1e-5)


def test_slerp_per_filter_schedule():
    first, second = decoder_state(seed=0), decoder_state(seed=1)
    merged = merge("slerp", [first, second], t=[{"filter": "self_attn", "value": 0.0}, {"value": 1.0}])
    for name in first:
        expected = first[name] if "self_attn" in name else second[name]
        assert torch.equal(merged[name], expected), name


def test_slerp_depth_schedule():
    num_layers, anchors = 3, [0.0, 0.8]
    first, second = decoder_state(num_layers, seed=0), decoder_state(num_layers, seed=1)
    merged = merge("slerp", [first, second], t=anchors)
    for name in first:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = depth_schedule(anchors, layer, num_layers)
        assert_matches(merged[name], slerp_reference(first[name], second[name], t), atol=1e-5, name=name)


# =================================================================================================================
# expo
# =================================================================================================================
def expo_reference(base: dict, models: list[dict], name: str, factor: float) -> np.ndarray:
    """θ_r + a (θ_r − θ_0) with θ_r the average of the models."""
    reference = sum(f64(m[name]) for m in models) / len(models)
    return reference + factor * (reference - f64(base[name]))


def test_expo_extrapolates_a_layer_linear_weight():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3)
    name = UP.format(1)
    assert_matches(merged[name], f64(model[name]) + 0.3 * (f64(model[name]) - f64(base[name])), name=name)
    default = merge("expo", [model], base=base)
    assert_matches(default[name], expo_reference(base, [model], name, 0.1), name=name)


def test_expo_defaults_leave_biases_norms_embeddings_and_head_at_the_fine_tune():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.5)
    for name in (BIAS.format(0), LAYER_NORM.format(1), EMBED, FINAL_NORM, HEAD):
        assert torch.equal(merged[name], model[name]), name
    for name in (Q.format(0), UP.format(0)):
        assert_matches(merged[name], expo_reference(base, [model], name, 0.5), name=name)


def test_expo_attention_scaling_applies_to_attention_projections():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.4, attention_scaling=0.25)
    for i in range(2):
        assert_matches(merged[Q.format(i)], expo_reference(base, [model], Q.format(i), 0.4 * 0.25))
        assert_matches(merged[UP.format(i)], expo_reference(base, [model], UP.format(i), 0.4))


@pytest.mark.parametrize("fix_first, fix_last, extrapolated", [
    (1, 1, {1, 2, 3}),
    ("half", 0, {2, 3, 4}),  # half of 5 layers = 2
    (0, "half", {0, 1, 2}),
    (2, "half", {2}),
])
def test_expo_fixed_first_and_last_layers(fix_first, fix_last, extrapolated):
    base = decoder_state(num_layers=5, seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3, fix_first_n_layers=fix_first, fix_last_n_layers=fix_last)
    for i in range(5):
        name = UP.format(i)
        if i in extrapolated:
            assert_matches(merged[name], expo_reference(base, [model], name, 0.3), name=name)
        else:
            assert torch.equal(merged[name], model[name]), name


def test_expo_off_the_backbone_extrapolates_the_head():
    base = decoder_state(seed=0)
    model = fine_tuned(base, seed=1)
    merged = merge("expo", [model], base=base, alpha=0.3, only_on_backbone=False)
    assert_matches(merged[HEAD], expo_reference(base, [model], HEAD, 0.3))
    # the embeddings have their own switch, and the final norm is not a linear weight
    assert torch.equal(merged[EMBED], model[EMBED])
    assert torch.equal(merged[FINAL_NORM], model[FINAL_NORM])
    with_embedding = merge("expo", [model], base=base, alpha=0.3, on_embedding=True)
    assert_matches(with_embedding[EMBED], expo_reference(base, [model], EMBED, 0.3))


def test_expo_magnitude_sparsity_zeroes_the_smallest_deltas_of_each_row():
    name = UP.format(0)
    base = {name: randn(4, 6, seed=0)}
    model = {name: base[name] + randn(4, 6, seed=1)}
    merged = merge("expo", [model], base=base, alpha=0.5, magnitude_sparsity_ratio=0.5)[name]
    delta = f64(model[name]) - f64(base[name])
    for row in range(4):
        smallest = np.argsort(np.abs(delta[row]))[:3]  # int(6 · 0.5) = 3 per row
        delta[row, smallest] = 0.0
    assert_matches(merged, f64(model[name]) + 0.5 * delta)


def test_expo_with_several_models_extrapolates_their_average():
    base = decoder_state(seed=0)
    models = [fine_tuned(base, seed=s) for s in (1, 2, 3)]
    merged = merge("expo", models, base=base, alpha=0.2)
    for name in base:
        factor = 0.2 if name in {Q.format(i) for i in range(2)} | {UP.format(i) for i in range(2)} else 0.0
        assert_matches(merged[name], expo_reference(base, models, name, factor), name=name)


# =================================================================================================================
# parameter validation: before any tensor is read, naming the parameter
# =================================================================================================================
class Unreadable(Mapping):
    """A model that fails the test as soon as anything looks inside it."""

    def __getitem__(self, key):
        raise AssertionError("a model was read before the parameters were validated")

    def __iter__(self):
        raise AssertionError("a model was read before the parameters were validated")

    def __len__(self):
        raise AssertionError("a model was read before the parameters were validated")


@pytest.mark.parametrize("method, n_models, params, message", [
    ("ties", 2, {"density": 1.5}, "density"),
    ("ties", 2, {"density": 0.0}, "density"),
    ("dare", 2, {"drop_rate": 1.0}, "drop_rate"),
    ("dare", 2, {"drop_rate": -0.1}, "drop_rate"),
    ("ties", 2, {"densty": 0.5}, "did you mean 'density'"),
    ("ties", 2, {"sign": "mass"}, "sign"),
    ("ties", 2, {"merge_func": "median"}, "merge_func"),
    ("ties", 2, {"trim_scope": "layer"}, "trim_scope"),
    ("dare", 2, {"rescale": "l2"}, "rescale"),
    ("task_arithmetic", 2, {"weights": [1.0, 2.0, 3.0]}, "weights"),
    ("ties", 3, {"weights": [1.0, 2.0]}, "weights"),
    ("expo", 1, {"fix_first_n_layers": "third"}, "fix_first_n_layers"),
    ("expo", 1, {"magnitude_sparsity_ratio": 1.0}, "magnitude_sparsity_ratio"),
    ("linear", 2, {"t": 1.5}, "'t'"),
])
def test_invalid_parameters_are_rejected_before_reading_tensors(method, n_models, params, message):
    with pytest.raises(ParameterError, match=message):
        merge(method, [Unreadable() for _ in range(n_models)], base=Unreadable(), **params)


def test_wrong_number_of_weights_for_weighted_average():
    with pytest.raises(ParameterError, match="'weights' has 3 values for 2 models"):
        merge("weighted_average", [Unreadable(), Unreadable()], weights=[1.0, 2.0, 3.0])


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(ParameterError, match="did you mean 'slerp'"):
        merge("slerpp", [Unreadable(), Unreadable()])
    with pytest.raises(ParameterError, match="did you mean 'task_arithmetic'"):
        merge("task_arithmetc", [Unreadable()], base=Unreadable())


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_interpolations_take_exactly_two_endpoints(method):
    with pytest.raises(ParameterError, match=method):
        merge(method, [Unreadable(), Unreadable(), Unreadable()])
    with pytest.raises(ParameterError, match=method):
        merge(method, [Unreadable(), Unreadable()], base=Unreadable())


def test_methods_that_need_a_base_say_so():
    for method in ("task_arithmetic", "ties", "dare", "expo"):
        with pytest.raises(ParameterError, match="base"):
            merge(method, [Unreadable(), Unreadable()])


# =================================================================================================================
# dtypes, integer buffers, inputs left untouched
# =================================================================================================================
def test_float64_inputs_are_computed_and_stored_in_float64():
    name = UP.format(0)
    base = {name: torch.ones(3, 4, dtype=torch.float64)}
    models = [{name: base[name] + 1e-12 * randn(3, 4, seed=s, dtype=torch.float64)} for s in (1, 2)]
    merged = merge("task_arithmetic", models, base=base, scaling=0.3)[name]
    assert merged.dtype == torch.float64
    expected = base[name].numpy() + 0.3 * sum(m[name].numpy() - base[name].numpy() for m in models)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-15)
    assert not torch.equal(merged, base[name])  # float32 arithmetic would have lost the 1e-12 updates


@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_float64_ties_keeps_exactly_the_top_density_entries(trim_scope):
    name = UP.format(0)
    base = {name: torch.zeros(50, 40, dtype=torch.float64)}
    models = [{name: randn(50, 40, seed=s, dtype=torch.float64)} for s in (1, 2)]
    # one model: its k = int(0.3 · 2000) = 600 largest |τ| survive, no more and no fewer
    alone = merge("ties", models[:1], base=base, density=0.3, trim_scope=trim_scope)[name]
    assert int((alone != 0).sum()) == 600
    merged = merge("ties", models, base=base, density=0.3, sign="sum", trim_scope=trim_scope)[name]
    assert merged.dtype == torch.float64
    expected = ties_reference(base, models, density=0.3, trim_scope=trim_scope)[name]
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-12)


def test_bf16_inputs_are_stored_as_bf16_and_computed_in_float32():
    # values with few significant bits, so that the float32 sum is exact and rounds to bf16 once
    shape = (40, 50)
    models = []
    for s in (1, 2, 3):
        magnitude = 0.5 + 1.5 * torch.rand(shape, generator=torch.Generator().manual_seed(s))
        models.append((magnitude * torch.where(randn(*shape, seed=10 + s) >= 0, 1.0, -1.0)).to(torch.bfloat16))
    weights = [0.5, 0.25, 0.25]
    merged = merge("weighted_average", [{"w": m} for m in models], weights=weights)["w"]
    assert merged.dtype == torch.bfloat16
    in_float32 = models[0].float() * 0.5 + models[1].float() * 0.25 + models[2].float() * 0.25
    assert torch.equal(merged, in_float32.to(torch.bfloat16))
    # bf16 arithmetic rounds after every step and gives other values: the test tells the two apart
    in_bf16 = models[0] * 0.5 + models[1] * 0.25 + models[2] * 0.25
    assert not torch.equal(in_bf16, in_float32.to(torch.bfloat16))


def with_buffer(state: dict, value: int) -> dict:
    state = dict(state)
    state["model.layers.0.bn.num_batches_tracked"] = torch.tensor(value, dtype=torch.int64)
    state["model.position_ids"] = torch.arange(6, dtype=torch.int64)
    return state


def test_integer_tensors_are_copied_not_averaged():
    base = with_buffer(decoder_state(seed=0), 7)
    models = [with_buffer(fine_tuned(decoder_state(seed=0), seed=s), 7) for s in (1, 2)]
    for method, kwargs in (("simple_average", {}), ("task_arithmetic", {"base": base}),
                           ("ties", {"base": base, "density": 0.5})):
        merged = merge(method, models, **kwargs)
        assert merged["model.layers.0.bn.num_batches_tracked"].dtype == torch.int64
        assert int(merged["model.layers.0.bn.num_batches_tracked"]) == 7
        assert torch.equal(merged["model.position_ids"], torch.arange(6))


def test_differing_integer_tensors_are_an_error_naming_the_tensor():
    base = with_buffer(decoder_state(seed=0), 7)
    models = [with_buffer(fine_tuned(decoder_state(seed=0), seed=1), 7),
              with_buffer(fine_tuned(decoder_state(seed=0), seed=2), 9)]
    with pytest.raises(ModelInputError, match="num_batches_tracked"):
        merge("simple_average", models)
    with pytest.raises(ModelInputError, match="num_batches_tracked"):
        merge("task_arithmetic", [models[0]], base=with_buffer(base, 8))


@pytest.mark.parametrize("method, uses_base, params", [
    ("weighted_average", True, {"backbone_only": True}),
    ("simple_average", False, {}),
    ("linear", False, {"t": 0.0}),
    ("linear", True, {"t": 1.0}),
    ("task_arithmetic", True, {}),
    ("ties", True, {"trim_scope": "tensor"}),
    ("ties", True, {"trim_scope": "model"}),
    ("dare", True, {"combine": "linear"}),
    ("dare", True, {"combine": "ties", "rescale": "l1"}),
    ("slerp", False, {"t": 0.0}),
    ("expo", True, {}),
])
def test_inputs_are_never_modified(method, uses_base, params):
    base = with_buffer(decoder_state(seed=0), 3)
    models = [with_buffer(fine_tuned(decoder_state(seed=0), seed=s), 3) for s in (1, 2)]
    if method == "linear" and uses_base:
        models = models[:1]
    base_copy = {n: t.clone() for n, t in base.items()}
    model_copies = [{n: t.clone() for n, t in m.items()} for m in models]
    merged = merge(method, models, base=base if uses_base else None, **params)
    for name, tensor in merged.items():  # the output shares no memory with the inputs
        tensor.add_(1)
    for name in base:
        assert torch.equal(base[name], base_copy[name]), name
        for model, copy in zip(models, model_copies):
            assert torch.equal(model[name], copy[name]), name


@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_ties_merges_large_tensors_block_by_block_exactly(llama_set, monkeypatch, trim_scope):
    """Large tensors are merged in blocks of positions; block boundaries must not change any value."""
    import nbmerge_plugins.ties as ties_plugin

    whole = nbmerge.merge("ties", llama_set.models, base=llama_set.base, trim_scope=trim_scope, density=0.3,
                          device="cpu", progress=False).state_dict
    monkeypatch.setattr(ties_plugin, "BLOCK", 37)  # many blocks per tensor, boundaries mid-row
    blocked = nbmerge.merge("ties", llama_set.models, base=llama_set.base, trim_scope=trim_scope, density=0.3,
                            device="cpu", progress=False).state_dict
    for name, value in whole.items():
        assert torch.equal(blocked[name], value), name


# -- TIES per-tensor thresholds on tensors large enough to be sampled ---------------------------------------------
def _large_ties_job(seed: int = 3, n_models: int = 3, numel: int = 3 * 2**20 + 17):
    from nbmerge.method import TensorJob

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


def _topk_thresholds(job, density):
    vectors = torch.stack([(m - job.base) * w for m, w in zip(job.models, job.params["weights"])])
    keep = int(density * int((vectors != 0).any(0).sum()))
    return [float(row.abs().topk(keep).values[-1]) for row in vectors]


@pytest.mark.parametrize("density", [0.003, 0.2, 0.5, 0.95, 1.0])
def test_ties_tensor_thresholds_equal_topk_on_large_tensors(density):
    from nbmerge_plugins.ties import tensor_thresholds

    job = _large_ties_job()
    assert tensor_thresholds(job, density) == _topk_thresholds(job, density)


def test_ties_tensor_thresholds_stay_exact_when_the_sampled_bracket_misses(monkeypatch):
    import nbmerge_plugins.ties as ties

    job = _large_ties_job(seed=5)
    monkeypatch.setattr(ties, "_bracket", lambda sample, fraction: (0.0, 1e-9))  # a bracket far too low
    assert ties.tensor_thresholds(job, 0.2) == _topk_thresholds(job, 0.2)
