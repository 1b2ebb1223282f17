"""Every method: float64 stays float64, bfloat16 computes in float32, integer buffers are copied, inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases import UP, decoder_state, fine_tuned, merge, randn, ties_reference

from nbmerge import ModelInputError


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
    ("magmax", True, {}),
    ("tall_mask", True, {}),
    ("wudi", True, {"iterations": 3}),
    ("doge_ta", True, {"iterations": 3}),
    ("tsv_m", True, {"weights": [0.5, 2.0]}),
    ("iso_c", True, {}),
    ("iso_cts", True, {}),
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


@pytest.mark.parametrize("method, params", [("magmax", {}), ("tall_mask", {}), ("wudi", {"iterations": 5}),
                                            ("doge_ta", {"iterations": 5})])
def test_bf16_inputs_of_the_data_free_methods_are_merged_in_float32(method, params):
    """FusionBench computes these in the inputs' dtype (several fail on bfloat16 on the CPU); nbmerge computes in
    float32 and rounds the result to bfloat16 once."""
    base = {n: t.to(torch.bfloat16) for n, t in decoder_state(seed=0).items()}
    models = [{n: t.to(torch.bfloat16) for n, t in fine_tuned(decoder_state(seed=0), seed=s).items()} for s in (1, 2)]
    merged = merge(method, models, base=base, **params)
    in_float32 = merge(method, [{n: t.float() for n, t in m.items()} for m in models],
                       base={n: t.float() for n, t in base.items()}, **params)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, in_float32[name].to(torch.bfloat16)), name
