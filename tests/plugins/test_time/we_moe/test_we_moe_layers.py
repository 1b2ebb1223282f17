"""Upcycling into weight-ensembling MoE layers, checked against plain models whose weights are built by hand."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import FAMILIES, model_set, seeded_fine_tunes
from torch.nn import functional as F

import nbmerge
from nbmerge.errors import ModelInputError
from nbmerge_plugins.test_time.we_moe.layers import (
    Router,
    RoutingSlot,
    WeightEnsemblingLinear,
    find_mlp_blocks,
    router_parameters,
    routing_weights,
    set_batch_reduce,
    upcycle,
)

torch.set_num_threads(1)


MLP_KEYS = {"bert": ("intermediate.dense", "output.dense"), "clip": ("mlp.fc1", "mlp.fc2"),
            "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
# the MLP linears' tensors, written out per family (attention.output.dense is NOT part of BERT's MLP)
MLP_TENSOR = {"bert": r"layer\.\d+\.(intermediate|output)\.dense\.", "clip": r"layers\.\d+\.mlp\.fc[12]\.",
              "llama": r"layers\.\d+\.mlp\.(gate|up|down)_proj\."}


def fix_routing(moe, routing: torch.Tensor) -> None:
    """Make every router output exactly ``routing`` (last layer weight 0, bias = routing)."""
    with torch.no_grad():
        for name, parameter in router_parameters(moe).items():
            last = name.rsplit(".", 2)[-2] == str(len(_router_of(moe, name).layers) - 1)
            if last and name.endswith("weight"):
                parameter.zero_()
            if last and name.endswith("bias"):
                parameter.copy_(routing)


def _router_of(moe, parameter_name: str) -> Router:
    return moe.get_submodule(parameter_name.split(".router.")[0] + ".router")


def hand_built(family: str, base, fine_tuned, init_lambda: float, routing: torch.Tensor):
    """A plain model: MLP linears W_0 + Σ r_e τ_e, every other tensor θ_0 + λ Σ τ_e."""
    base_state = base.state_dict()
    states = [m.state_dict() for m in fine_tuned.values()]
    merged = {}
    for key, value in base_state.items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        weights = routing.tolist() if re.search(MLP_TENSOR[family], key) else [init_lambda] * len(states)
        merged[key] = value + sum(w * (s[key] - value) for w, s in zip(weights, states))
    model = copy.deepcopy(base)
    model.load_state_dict(merged)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixed_routing_equals_hand_built_weights(family):
    base, fine_tuned = model_set(family)
    moe = upcycle(base, fine_tuned, init_lambda=0.3)
    routing = torch.tensor([0.7, -0.2, 0.45])
    fix_routing(moe, routing)
    inputs = FAMILIES[family][1]()
    expected = hand_built(family, base, fine_tuned, 0.3, routing)(**inputs).last_hidden_state
    for batch_reduce in (False, True):
        set_batch_reduce(moe, batch_reduce)
        with torch.no_grad():
            got = moe(**inputs).last_hidden_state
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_initial_routing_is_task_arithmetic(family):
    """Router weights zero -> r = init_lambda exactly -> the model is nbmerge's task arithmetic with λ = init."""
    base, fine_tuned = model_set(family)
    moe = upcycle(base, fine_tuned, init_lambda=0.25)
    with torch.no_grad():
        for name, parameter in router_parameters(moe).items():
            if name.endswith("weight"):
                parameter.zero_()
    merged = nbmerge.merge("task_arithmetic", list(fine_tuned.values()), base=base, scaling=0.25, progress=False)
    reference = copy.deepcopy(base)
    reference.load_state_dict(merged.state_dict)
    inputs = FAMILIES[family][1]()
    with torch.no_grad():
        torch.testing.assert_close(moe(**inputs).last_hidden_state, reference(**inputs).last_hidden_state,
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)], ids=["out>in", "in>out"])
@pytest.mark.parametrize("bias", [True, False])
def test_per_sample_linear_matches_a_weight_built_per_sample(shape, bias):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(0)
    experts = 4
    base_weight = torch.randn(out_features, in_features, generator=generator)
    base_bias = torch.randn(out_features, generator=generator) if bias else None
    task_weights = torch.randn(out_features, experts, in_features, generator=generator)
    task_biases = torch.randn(out_features, experts, generator=generator) if bias else None
    slot = RoutingSlot()
    layer = WeightEnsemblingLinear(base_weight, base_bias, task_weights, task_biases, slot)
    x = torch.randn(3, 6, in_features, generator=generator)
    routing = torch.randn(3, experts, generator=generator)
    slot.weights = routing
    got = layer(x)
    for b in range(3):
        weight = base_weight + sum(routing[b, e] * task_weights[:, e] for e in range(experts))
        sample_bias = None if not bias else base_bias + sum(routing[b, e] * task_biases[:, e] for e in range(experts))
        torch.testing.assert_close(got[b], F.linear(x[b], weight, sample_bias), atol=1e-5, rtol=1e-5)
    # the shared (batch_reduce) path with the batch-mean routing equals the per-sample path given that mean
    slot.weights = routing.mean(0)
    shared = layer(x)
    slot.weights = routing.mean(0).expand(3, experts)
    torch.testing.assert_close(shared, layer(x), atol=1e-5, rtol=1e-5)


def test_per_sample_gradients_reach_the_routing_weights_like_the_materialised_form():
    generator = torch.Generator().manual_seed(0)
    base_weight, task_weights = torch.randn(7, 5, generator=generator), torch.randn(7, 3, 5, generator=generator)
    x = torch.randn(2, 4, 5, generator=generator)
    routing = torch.randn(2, 3, generator=generator, requires_grad=True)
    slot = RoutingSlot()
    layer = WeightEnsemblingLinear(base_weight, None, task_weights, None, slot)
    slot.weights = routing
    layer(x).square().sum().backward()
    fast = routing.grad.clone()
    routing.grad = None
    weights = base_weight + torch.einsum("be,oei->boi", routing, task_weights)
    torch.einsum("bti,boi->bto", x, weights).square().sum().backward()
    torch.testing.assert_close(fast, routing.grad, atol=1e-4, rtol=1e-5)


def test_padding_does_not_change_a_samples_routing_or_output():
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned)
    with torch.no_grad():
        for name, parameter in router_parameters(moe).items():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        batched = moe(input_ids=ids, attention_mask=mask).last_hidden_state
        batched_routing = routing_weights(moe)
        alone = moe(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).last_hidden_state
        alone_routing = routing_weights(moe)
    for path in batched_routing:
        torch.testing.assert_close(batched_routing[path][0], alone_routing[path][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched[0, :5], alone[0], atol=1e-5, rtol=1e-4)


def test_routers_are_the_only_trainable_parameters_and_inputs_are_untouched():
    base, fine_tuned = model_set("bert")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expert_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in fine_tuned.items()}
    moe = upcycle(base, fine_tuned)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable == set(router_parameters(moe))
    assert len(trainable) == 2 * 4                   # 2 layers x (fc1, fc2) x (weight, bias)
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])
    for name, model in fine_tuned.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, expert_before[name][key])
    assert [p.requires_grad for p in base.parameters()] == [True] * len(list(base.parameters()))


@pytest.mark.parametrize("hidden_layers,expected_shapes", [
    (0, [(3,)]), (1, [(3, 16), (3,)]), (2, [(16, 16), (16,), (3, 16), (3,)])])
def test_router_architecture_and_initialisation(hidden_layers, expected_shapes):
    base, fine_tuned = model_set("bert")
    moe = upcycle(base, fine_tuned, init_lambda=0.4, router_hidden_layers=hidden_layers, seed=7)
    router = moe.encoder.layer[1].intermediate.router
    parameters = list(router.parameters())
    assert [tuple(p.shape) for p in parameters] == expected_shapes
    assert torch.equal(parameters[-1], torch.full((3,), 0.4))                  # last bias (or constant) = λ
    if hidden_layers == 2:
        assert torch.equal(parameters[1], torch.zeros(16))                     # fc1 bias 0
    weights = torch.cat([p.flatten() for n, p in router_parameters(moe).items() if n.endswith("weight")]) \
        if hidden_layers else None
    if weights is not None:
        assert abs(weights.std().item() - 0.01) < 0.002 and abs(weights.mean().item()) < 0.002
    again = upcycle(base, fine_tuned, init_lambda=0.4, router_hidden_layers=hidden_layers, seed=7)
    other = upcycle(base, fine_tuned, init_lambda=0.4, router_hidden_layers=hidden_layers, seed=8)
    same = [torch.equal(a, b) for a, b in zip(router_parameters(moe).values(), router_parameters(again).values())]
    assert all(same)
    if hidden_layers:
        assert not all(torch.equal(a, b) for a, b in zip(router_parameters(moe).values(),
                                                          router_parameters(other).values()))


def test_blocks_found_per_family():
    for family, keys in MLP_KEYS.items():
        base, _ = model_set(family, experts=1)
        blocks = find_mlp_blocks(base)
        assert len(blocks) == 2 and {b.family for b in blocks} == {family}
        assert len(blocks[0].linears) == len(keys)
        assert all(linear.endswith(key) for linear, key in zip(blocks[0].linears, keys))


def test_unsupported_model_and_mismatched_expert_are_clear_errors():
    with pytest.raises(ModelInputError, match="no MLP block of a supported family"):
        upcycle(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"a": torch.nn.Sequential(torch.nn.Linear(4, 4))})
    base, fine_tuned = model_set("bert", experts=2)
    broken = fine_tuned["task1"].state_dict()
    broken["encoder.layer.0.output.dense.weight"] = torch.zeros(16, 41)
    with pytest.raises(ModelInputError, match=r"'encoder.layer.0.output.dense.weight' of model 'task1'"):
        upcycle(base, {"task0": fine_tuned["task0"], "task1": broken})


# -- convolutional networks: every convolution routed, MBConv blocks sharing one router ---------------------------
class TinyConvNet(torch.nn.Module):
    """A stem and three MBConv blocks (expand ratio 1, then 3) with random weights and BatchNorm statistics."""

    def __init__(self):
        from nbmerge.workbench.models.efficientnet import MBConv

        super().__init__()
        self.conv_stem = torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn0 = torch.nn.BatchNorm2d(8)
        self.blocks = torch.nn.ModuleList([MBConv(8, 8, 1, 3, 1), MBConv(8, 12, 3, 3, 2), MBConv(12, 12, 3, 5, 1)])
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)

    def forward(self, images):
        x = torch.nn.functional.relu6(self.bn0(self.conv_stem(images)))
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))


def conv_model_set(experts: int = 3):
    torch.manual_seed(0)
    base = TinyConvNet().eval()
    return base, seeded_fine_tunes(base, experts, first_seed=200)


def test_mbconv_blocks_route_their_convolutions_and_the_stem_its_own():
    base, _ = conv_model_set(1)
    blocks = find_mlp_blocks(base)
    assert [(b.family, b.entry, b.linears) for b in blocks] == [
        ("mbconv", "blocks.0", ("blocks.0.depthwise_conv", "blocks.0.project_conv")),
        ("mbconv", "blocks.1", ("blocks.1.expand_conv", "blocks.1.depthwise_conv", "blocks.1.project_conv")),
        ("mbconv", "blocks.2", ("blocks.2.expand_conv", "blocks.2.depthwise_conv", "blocks.2.project_conv")),
        ("conv", "conv_stem", ("conv_stem",))]


def test_fixed_routing_of_a_conv_net_equals_hand_built_weights():
    """Every convolution (stem, expand, depthwise, project) W_0 + Σ r_e τ_e, BatchNorm θ_0 + λ Σ τ_e."""
    base, fine_tuned = conv_model_set()
    moe = upcycle(base, fine_tuned, init_lambda=0.3)
    routing = torch.tensor([0.6, -0.1, 0.35])
    fix_routing(moe, routing)
    states = [m.state_dict() for m in fine_tuned.values()]
    merged = {}
    for key, value in base.state_dict().items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        routed = re.search(r"conv", key)
        weights = routing.tolist() if routed else [0.3] * len(states)
        merged[key] = value + sum(w * (s[key] - value) for w, s in zip(weights, states))
    expected_model = copy.deepcopy(base)
    expected_model.load_state_dict(merged)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = expected_model(images)
        for batch_reduce in (False, True):
            set_batch_reduce(moe, batch_reduce)
            torch.testing.assert_close(moe(images), expected, atol=2e-5, rtol=1e-4)
