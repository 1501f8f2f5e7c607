"""Grad-CAM: the feature map found without architecture names, maps that differ between two
classes on the same image, and the refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from tests.support.images import noisy_picture
from training.explain import ExplainUnsupported, UnknownClass, explain_image, target_layer
from training.model import build_model
from training.presets import EvalPreset
from training.registry import LoadedModel


def _loaded(model: nn.Module, classes: list[str], crop: int = 64) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("v1", model.eval(), EvalPreset.for_size(crop), classes, {})


def test_target_layer_is_the_last_feature_map() -> None:
    resnet = torchvision.models.resnet18(num_classes=3)
    assert target_layer(resnet, 64) is resnet.layer4
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=3)
    assert target_layer(mobilenet, 64) is mobilenet.features
    lite0 = build_model("efficientnet_lite0", num_classes=3, pretrained=False)
    layer = target_layer(lite0, 64)
    assert isinstance(layer, nn.BatchNorm2d) and layer.num_features == 1280  # after the head conv


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_maps_differ_between_two_classes(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3, pretrained=False)
    loaded = _loaded(model, ["cat", "dog", "Golden Retriever"])
    image = noisy_picture((200, 40, 40), seed=1, size=96)
    a = explain_image(loaded, image, "cat")
    b = explain_image(loaded, image, "Golden Retriever")
    assert (a.label, b.label) == ("cat", "Golden Retriever")
    assert a.cam.shape == (64, 64) and a.cam.dtype == np.float32
    assert a.cam.min() >= 0 and a.cam.max() <= 1
    assert float(np.abs(a.cam - b.cam).mean()) > 0.01
    png = Image.open(io.BytesIO(a.png))
    assert png.format == "PNG" and png.size == (64, 64)
    top = explain_image(loaded, image)
    assert top.label == top.top_label
    assert all(p.grad is None for p in model.parameters())  # nothing left on the model


def test_refusals() -> None:
    loaded = _loaded(torchvision.models.resnet18(num_classes=2), ["a", "b"])
    image = Image.new("RGB", (80, 80), (10, 20, 30))
    with pytest.raises(UnknownClass, match=r"no class 'c'.*'a', 'b'"):
        explain_image(loaded, image, "c")
    flat = _loaded(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2)), ["a", "b"])
    with pytest.raises(ExplainUnsupported, match="no spatial feature map"):
        explain_image(flat, image)
