"""EfficientNet-Lite0 with the packaged ImageNet weights: every tensor loaded by name, a layer stack the name
filters find, and real ImageNet predictions."""

from __future__ import annotations

import numpy as np
import torch

from nbmerge.method.tensor_names import count_layers, layer_index
from nbmerge.workbench.models.cache import package_folder
from nbmerge.workbench.models.efficientnet import checkpoint_path, pretrained


def test_every_backbone_tensor_of_the_checkpoint_is_loaded():
    model = pretrained()
    checkpoint = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    backbone = {name: tensor for name, tensor in checkpoint.items() if not name.startswith("_fc.")}
    state = model.state_dict()
    assert len(state) == len(backbone) == 294
    for name, tensor in backbone.items():
        assert torch.equal(state[".".join(part.lstrip("_") for part in name.split("."))], tensor), name


def test_tensor_names_place_the_blocks_in_a_layer_stack():
    names = list(pretrained().state_dict())
    assert count_layers(names) == 16
    assert layer_index("blocks.7.expand_conv.weight") == 7 and layer_index("conv_head.weight") is None


def test_imagenet_predictions_of_a_real_photo():
    """scikit-learn's photo of a Chinese temple: palace (698) or church (497) among the top five."""
    from PIL import Image

    photo = Image.open(package_folder("scikit-learn", "sklearn") / "datasets" / "images" / "china.jpg")
    image = torch.from_numpy(np.asarray(photo.convert("RGB").resize((224, 224))).copy()).permute(2, 0, 1) / 255
    checkpoint = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits = pretrained()(image[None].float()) @ checkpoint["_fc.weight"].T + checkpoint["_fc.bias"]
    assert {698, 497} & set(logits.topk(5).indices[0].tolist())
