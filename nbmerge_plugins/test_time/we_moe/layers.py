"""Weight-ensembling MoE layers (Tang et al. 2024, arXiv 2402.00433): a transformer's MLP blocks upcycled into
input-routed mixtures of the pretrained MLP and the fine-tuned models' task vectors.

For every linear of an upcycled MLP, with pretrained weight W_0, bias b_0 and the task vectors
τ_e = (W_e − W_0, b_e − b_0) of E fine-tuned models, sample b computes

    y_b = x_b W_0ᵀ + b_0 + Σ_e r_{b,e} (x_b τW_eᵀ + τb_e)          (= x_b (W_0 + Σ_e r_{b,e} τW_e)ᵀ + ...)

where r_b = the mean over b's (non-padding) tokens t of router(h_{b,t}), h = the MLP's input, and
router(h) = fc2(ReLU(fc1(h))) (H→H→E, weights N(0, 0.01²), fc1 bias 0, fc2 bias = init_lambda, no softmax).
With ``batch_reduce`` the batch shares r = mean_b r_b. Every other tensor is task arithmetic:
θ = θ_0 + init_lambda · Σ_e τ_e. Only the routers are trainable; everything else is frozen.

Per-sample routing builds each sample's weight W_b = W_0 + Σ_e r_{b,e} τW_e once per call (one [B, E] × [E, O·I]
product) and applies it with one batched matmul over the sample's tokens, as the reference code does: cheaper
than E + 1 matmuls over every token whenever a sample has more tokens than there are experts. With
``batch_reduce`` the one shared weight W_0 + Σ_e r_e τW_e is built once per call. The routing mode is the
model's, the same in adaptation and in use (``set_batch_reduce``).

Convolutional networks (MobileNet/EfficientNet MBConv blocks) are upcycled the same way, every convolution
routed: a convolution is linear in its weight, so y_b = conv(x_b, W_0) + b_0 + Σ_e r_{b,e} (conv(x_b, τW_e) + τb_e),
and the E expert convolutions run as one convolution whose output channels are the E task vectors of each
channel side by side (channel o·E + e), which keeps grouped (depthwise) convolutions' groups intact. Each MBConv
block's convolutions (expand, depthwise, project) share one router on the block's input; every convolution
outside the blocks (the stem, the head) gets its own router on its input. A conv router's tokens are the pixels.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from nbmerge.errors import ModelInputError, ParameterError

ROUTER_STD = 0.01


class RoutingSlot:
    """The routing weights of one layer's current forward call, shared by its router and its expert linears.

    ``weights``: [batch, experts], or [experts] when the batch shares them. ``token_mask``: [batch, tokens] of the
    current call (1 = a real token), set by the model-level hook; None averages over every token.
    """

    def __init__(self):
        self.weights: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None


class Router(nn.Module):
    """r = fc_k(ReLU(... ReLU(fc_1(h)))), k = hidden_layers (H→H ... →E); 0 hidden layers: a learned constant.

    Weights N(0, 0.01²), hidden biases 0, the last bias init_lambda (so at initialisation r ≈ init_lambda), no
    softmax. ``route`` averages r over each sample's tokens (over the batch too with ``batch_reduce``).
    """

    def __init__(self, hidden_size: int, num_experts: int, hidden_layers: int, init_lambda: float,
                 generator: torch.Generator, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.constant = nn.Parameter(torch.full((num_experts,), float(init_lambda), dtype=dtype))
            return
        widths = [hidden_size] * hidden_layers + [num_experts]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * ROUTER_STD)
                linear.bias.fill_(init_lambda if i == hidden_layers - 1 else 0.0)
            layers += [linear, nn.ReLU()] if i < hidden_layers - 1 else [linear]
        self.layers = nn.Sequential(*layers)

    def route(self, hidden: torch.Tensor, token_mask: torch.Tensor | None, batch_reduce: bool) -> torch.Tensor:
        """Routing weights for hidden [B, T, H]: [B, E], or [E] with batch_reduce."""
        if self.hidden_layers == 0:
            return self.constant
        per_token = self.layers(hidden)                                   # [B, T, E]
        if token_mask is not None and token_mask.shape == hidden.shape[:2]:
            mask = token_mask.to(per_token.dtype).unsqueeze(-1)
            per_sample = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            per_sample = per_token.flatten(1, -2).mean(1)
        return per_sample.mean(0) if batch_reduce else per_sample


class WeightEnsemblingLinear(nn.Module):
    """A frozen linear y = x (W_0 + Σ_e r_e τW_e)ᵀ + b_0 + Σ_e r_e τb_e with r from the layer's RoutingSlot.

    Buffers (frozen, saved in the state dict): ``base_weight`` [O, I], ``base_bias`` [O] (absent when the linear
    has none), ``task_weights`` [O, E, I] and ``task_biases`` [O, E] (the layout convolutions need too; the
    per-sample path reads the experts as one [E, O·I] matrix, a copy per call that costs a tenth of its matmuls).
    """

    def __init__(self, base_weight: torch.Tensor, base_bias: torch.Tensor | None, task_weights: torch.Tensor,
                 task_biases: torch.Tensor | None, slot: RoutingSlot):
        super().__init__()
        self.out_features, self.num_experts, self.in_features = task_weights.shape
        self.register_buffer("base_weight", base_weight)
        self.register_buffer("base_bias", base_bias)
        self.register_buffer("task_weights", task_weights)
        self.register_buffer("task_biases", task_biases)
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.slot.weights
        if routing is None:
            raise RuntimeError("WeightEnsemblingLinear called outside its upcycled MLP block (no routing weights)")
        routing = routing.to(x.dtype)
        if routing.dim() == 1:
            return self._shared(x, routing)
        return self._per_sample(x, routing)

    def _shared(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight + torch.einsum("oei,e->oi", self.task_weights, routing)
        bias = None
        if self.base_bias is not None:
            bias = self.base_bias + self.task_biases @ routing
        return F.linear(x, weight, bias)

    def _per_sample(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Each sample's own weight W_b = W_0 + Σ_e r_be τW_e [B, O, I] built once (one [B, E] × [E, O·I]
        product, as the reference implementation does), then one batched matmul: B·E·O·I + B·N·I·O
        multiply-adds, against (E + 1)·B·N·I·O for E + 1 separate expert matmuls over N tokens."""
        batch, experts = routing.shape
        if x.shape[0] != batch:
            raise RuntimeError(f"routing weights for {batch} samples, input batch of {x.shape[0]}")
        expert_major = self.task_weights.transpose(0, 1).reshape(experts, -1)           # [E, O·I]
        weights = torch.addmm(self.base_weight.reshape(1, -1), routing, expert_major)     # [B, O·I]
        weights = weights.view(batch, self.out_features, self.in_features)
        tokens = x.reshape(batch, -1, self.in_features)                                 # [B, N, I]
        out = torch.bmm(tokens, weights.transpose(1, 2))                                # [B, N, O]
        if self.base_bias is not None:
            out = out + (self.base_bias + routing @ self.task_biases.T).unsqueeze(1)
        return out.view(*x.shape[:-1], self.out_features)


class WeightEnsemblingConv(nn.Module):
    """A frozen 2-D convolution y = conv(x, W_0 + Σ_e r_e τW_e) + b_0 + Σ_e r_e τb_e, r from the RoutingSlot.

    Buffers: ``base_weight`` [O, I/g, kh, kw], ``base_bias`` [O] or None, ``task_weights`` [O, E, I/g, kh, kw] and
    ``task_biases`` [O, E]; stride, padding, dilation and groups are the original convolution's.
    """

    def __init__(self, conv: nn.Conv2d, base_weight: torch.Tensor, base_bias: torch.Tensor | None,
                 task_weights: torch.Tensor, task_biases: torch.Tensor | None, slot: RoutingSlot):
        super().__init__()
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ModelInputError(f"we_moe: convolutions with padding={conv.padding!r} / padding_mode="
                                  f"{conv.padding_mode!r} are not supported (explicit zero padding only)")
        self.out_features, self.num_experts = task_weights.shape[:2]
        self.in_features = conv.in_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("base_weight", base_weight)
        self.register_buffer("base_bias", base_bias)
        self.register_buffer("task_weights", task_weights)
        self.register_buffer("task_biases", task_biases)
        self.slot = slot

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.slot.weights
        if routing is None:
            raise RuntimeError("WeightEnsemblingConv called outside its upcycled block (no routing weights)")
        routing = routing.to(x.dtype)
        if routing.dim() == 1:
            weight = self.base_weight + torch.einsum("oe...,e->o...", self.task_weights, routing)
            bias = None if self.base_bias is None else self.base_bias + self.task_biases @ routing
            return self._conv(x, weight, bias)
        batch = routing.shape[0]
        if x.shape[0] != batch:
            raise RuntimeError(f"routing weights for {batch} samples, input batch of {x.shape[0]}")
        out = self._conv(x, self.base_weight, self.base_bias)
        experts = self._conv(x, self.task_weights.flatten(0, 1), None)             # [B, O·E, H', W']
        experts = experts.view(batch, self.out_features, self.num_experts, *experts.shape[2:])
        expert_sum = torch.einsum("boe...,be->bo...", experts, routing)
        if self.task_biases is not None:
            expert_sum = expert_sum + (routing @ self.task_biases.T)[:, :, None, None]
        return out + expert_sum


class RoutedBlock(nn.Module):
    """Wraps the module whose input is the MLP's input: routes on that input, then runs the wrapped module.

    ``channels_first``: the input is a feature map [B, C, H, W], whose pixels are the router's tokens."""

    def __init__(self, inner: nn.Module, router: Router, slot: RoutingSlot, batch_reduce: bool,
                 channels_first: bool = False):
        super().__init__()
        self.inner = inner
        self.router = router
        self.slot = slot
        self.batch_reduce = batch_reduce
        self.channels_first = channels_first

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        tokens = hidden_states.flatten(2).transpose(1, 2) if self.channels_first else hidden_states
        self.slot.weights = self.router.route(tokens, self.slot.token_mask, self.batch_reduce)
        return self.inner(hidden_states, *args, **kwargs)


class TokenMaskCapture:
    """A forward pre-hook on the upcycled model: hands the call's ``attention_mask`` to every layer's slot.

    An object rather than a closure so that ``copy.deepcopy`` of the model re-points it at the copy's slots.
    """

    def __init__(self, model: nn.Module, slots: list[RoutingSlot]):
        self.slots = slots
        self.signature = inspect.signature(model.forward)

    def __call__(self, module, args, kwargs):
        try:
            mask = self.signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for slot in self.slots:
            slot.token_mask = mask
        return None


# -- finding MLP blocks ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MLPBlock:
    """One transformer layer's MLP: ``entry`` is the module whose input is the MLP input; ``linears`` its
    linears (module paths), the first of which reads that input. In a convolutional block (``channels_first``)
    they are its 1 × 1 convolutions, per-pixel linear maps, and ``entry`` is the block itself."""

    family: str
    entry: str
    linears: tuple[str, ...]
    channels_first: bool = False


FAMILIES = {
    # BertLayer (and RoBERTa, MiniLM ...): intermediate.dense (H→I) then output.dense (I→H, + residual + norm)
    "bert": (("intermediate", "output", "attention"), "intermediate", ("intermediate.dense", "output.dense")),
    # CLIPEncoderLayer: mlp.fc1, mlp.fc2
    "clip": (("mlp", "layer_norm1"), "mlp", ("mlp.fc1", "mlp.fc2")),
    # LlamaDecoderLayer (Mistral, Qwen2 ...): mlp.gate_proj, mlp.up_proj, mlp.down_proj
    "llama": (("mlp", "self_attn"), "mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


# MobileNet/EfficientNet inverted bottleneck (MBConv): expand_conv (1×1, absent at expand ratio 1), depthwise_conv,
# project_conv (1×1); the block's input is the expand's
CONV_FAMILIES = {"mbconv": (("depthwise_conv", "project_conv"), ("expand_conv", "depthwise_conv", "project_conv"))}


def find_mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    """Every transformer layer's MLP block in module order; in a convolutional network every MBConv block's
    convolutions, then each other convolution as a block of its own. An error when the model has none we know."""
    blocks = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for family, (children, entry, linears) in FAMILIES.items():
            if all(hasattr(module, child) for child in children) and \
                    all(isinstance(_get(module, linear), nn.Linear) for linear in linears):
                blocks.append(MLPBlock(family, prefix + entry, tuple(prefix + linear for linear in linears)))
                break
        for family, (children, convolutions) in CONV_FAMILIES.items():
            present = [name for name in convolutions if isinstance(_get(module, name), nn.Conv2d)]
            if path and all(hasattr(module, child) for child in children) and present:
                blocks.append(MLPBlock(family, path, tuple(prefix + name for name in present), channels_first=True))
    if any(block.channels_first for block in blocks):
        routed = {linear for block in blocks for linear in block.linears}
        blocks += [MLPBlock("conv", path, (path,), channels_first=True) for path, module in model.named_modules()
                   if isinstance(module, nn.Conv2d) and path not in routed]
    if not blocks:
        raise ModelInputError(
            f"{type(model).__name__}: no MLP block of a supported family (BERT-style intermediate.dense + "
            f"output.dense, CLIP mlp.fc1 + mlp.fc2, LLaMA-style mlp.gate_proj/up_proj/down_proj, MBConv "
            f"expand_conv/depthwise_conv/project_conv) to upcycle")
    return blocks


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(model: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, value)


# -- upcycling ------------------------------------------------------------------------------------------------

def upcycle(base: nn.Module, experts: Mapping[str, Mapping[str, torch.Tensor] | nn.Module], *,
            init_lambda: float = 0.3, router_hidden_layers: int = 2, batch_reduce: bool = False,
            seed: int = 0) -> nn.Module:
    """The base model with every MLP block upcycled into a weight-ensembling MoE over ``experts``.

    base: the pretrained model (left untouched; the result is a copy). experts: fine-tuned models of the same
    architecture, {name: module or state dict}; their order is the experts' order. Non-MLP tensors become
    θ_0 + init_lambda · Σ_e τ_e. Routers are initialised from ``seed``. Only router parameters require grad.
    """
    if not experts:
        raise ParameterError("we_moe: needs at least one fine-tuned model")
    base_state = {name: tensor.detach() for name, tensor in base.state_dict().items()}
    expert_states = {name: _state_of(name, model, base_state) for name, model in experts.items()}
    model = copy.deepcopy(base).eval().requires_grad_(False)
    blocks = find_mlp_blocks(model)
    upcycled = {f"{linear}.{kind}" for block in blocks for linear in block.linears for kind in ("weight", "bias")}
    _task_arithmetic_into(model, base_state, expert_states, init_lambda, skip=upcycled)
    generator = torch.Generator().manual_seed(seed)
    slots = []
    for block in blocks:
        slot = RoutingSlot()
        for linear_path in block.linears:
            _set(model, linear_path, _expert_linear(model, linear_path, base_state, expert_states, slot))
        first = _get(model, block.linears[0])
        router = Router(first.in_features, len(expert_states), router_hidden_layers, init_lambda, generator,
                        dtype=first.base_weight.dtype if first.base_weight.is_floating_point() else torch.float32)
        _set(model, block.entry, RoutedBlock(model.get_submodule(block.entry), router, slot, batch_reduce,
                                             block.channels_first))
        slots.append(slot)
    model.register_forward_pre_hook(TokenMaskCapture(model, slots), with_kwargs=True)
    return model


def _state_of(name: str, model, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    missing = sorted(set(base_state) - set(state))
    extra = sorted(set(state) - set(base_state))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has tensors the base lacks: {extra[:3]}"
        raise ModelInputError(f"we_moe: fine-tuned model {name!r} {what} (it must have the base's architecture)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(base_state[key].shape):
            raise ModelInputError(f"we_moe: tensor {key!r} of model {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the base's is {tuple(base_state[key].shape)}")
    return {key: tensor.detach() for key, tensor in state.items()}


def _task_arithmetic_into(model: nn.Module, base_state, expert_states, init_lambda: float, skip: set[str]) -> None:
    """θ = θ_0 + λ Σ_e τ_e for every floating tensor outside the MLP linears (computed in float32 or wider)."""
    merged = {}
    for key, base_tensor in base_state.items():
        if key in skip:
            continue
        if not base_tensor.is_floating_point():
            for name, state in expert_states.items():
                if not torch.equal(state[key], base_tensor):
                    raise ModelInputError(f"we_moe: non-floating tensor {key!r} of model {name!r} differs from "
                                          f"the base's; it cannot be merged")
            continue
        wide = base_tensor.to(torch.promote_types(base_tensor.dtype, torch.float32))
        total = sum((state[key].to(wide.dtype) - wide for state in expert_states.values()), torch.zeros_like(wide))
        merged[key] = (wide + init_lambda * total).to(base_tensor.dtype)
    model.load_state_dict(merged, strict=False)


def _expert_linear(model: nn.Module, path: str, base_state, expert_states,
                   slot: RoutingSlot) -> WeightEnsemblingLinear | WeightEnsemblingConv:
    """The upcycled linear or convolution at ``path``: its experts stacked along dimension 1."""
    base_weight = base_state[f"{path}.weight"]
    task_weights = torch.stack([state[f"{path}.weight"] - base_weight for state in expert_states.values()], 1)
    base_bias = base_state.get(f"{path}.bias")
    task_biases = None
    if base_bias is not None:
        task_biases = torch.stack([state[f"{path}.bias"] - base_bias for state in expert_states.values()], 1)
        base_bias = base_bias.clone()
    task_biases = None if task_biases is None else task_biases.contiguous()
    original = model.get_submodule(path)
    if isinstance(original, nn.Conv2d):
        return WeightEnsemblingConv(original, base_weight.clone(), base_bias, task_weights.contiguous(), task_biases,
                                    slot)
    return WeightEnsemblingLinear(base_weight.clone(), base_bias, task_weights.contiguous(), task_biases, slot)


# -- inspecting an upcycled model -----------------------------------------------------------------------------

def routed_blocks(model: nn.Module) -> dict[str, RoutedBlock]:
    """The upcycled blocks of a model by module path (empty for a model that was not upcycled)."""
    return {path: module for path, module in model.named_modules() if isinstance(module, RoutedBlock)}


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router parameter of an upcycled model, by its state-dict name."""
    blocks = routed_blocks(model)
    if not blocks:
        raise ParameterError(f"{type(model).__name__} is not a weight-ensembling MoE model (no routers); "
                             f"build one with nbmerge_plugins.test_time.we_moe.layers.upcycle")
    return {f"{path}.router.{name}": parameter for path, block in blocks.items()
            for name, parameter in block.router.named_parameters()}


def set_batch_reduce(model: nn.Module, batch_reduce: bool) -> None:
    """Route per sample (False) or with one routing vector shared by the batch (True)."""
    for block in routed_blocks(model).values():
        block.batch_reduce = batch_reduce


def routing_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The routing weights each block used in the model's last forward call (detached), by block path."""
    return {path: block.slot.weights.detach() for path, block in routed_blocks(model).items()
            if block.slot.weights is not None}
