"""Backbones, strategies and transfer: what the engine promises about parameters and accuracy."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.config import TrainConfig
from training.engine import (
    build_optimizer,
    build_scheduler,
    fit_plain,
    prepare_model,
    train_one_epoch,
)
from training.model import (
    AUTO,
    STRATEGIES,
    apply_strategy,
    build_model,
    check_backbone,
    head_name,
    resolve_backbone,
    stages,
)
from training.presets import EvalPreset


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _random_batches(n: int = 2, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 0, 1]))
            for _ in range(n)]


def test_unknown_backbone_and_strategy_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'.*resnet18"):
        check_backbone("resnet9000")
    with pytest.raises(ValueError, match=r"unknown strategy 'yolo'.*feature-extract"):
        apply_strategy(build_model("efficientnet_lite0", 2, pretrained=False), "yolo")
    with pytest.raises(ValueError):
        TrainConfig(strategy="yolo")  # type: ignore[arg-type]


def test_strategies_and_backbone_names_have_one_definition() -> None:
    """The config validates with the model module's own sets: nothing to keep in step."""
    assert typing.get_args(TrainConfig.model_fields["strategy"].annotation) == STRATEGIES
    assert TrainConfig().backbone == AUTO
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'.*resnet18"):
        TrainConfig(backbone="resnet9000")


def test_auto_falls_back_to_efficientnet_lite0_offline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    choice = resolve_backbone("auto", cache_dir=tmp_path)
    # This machine has no model hub; a machine that has resnet18's weights gets resnet18.
    assert choice.name in ("resnet18", "efficientnet_lite0")
    assert choice.reason.startswith("auto")
    assert resolve_backbone("efficientnet_lite0").name == "efficientnet_lite0"


def test_feature_extract_trains_only_the_head_and_keeps_bn_statistics() -> None:
    cfg = TrainConfig(strategy="feature-extract", lr=0.1)
    model, backbone, head = prepare_model(cfg, "efficientnet_lite0", 2)
    assert backbone == []
    before = _snapshot(model)
    opt = build_optimizer(backbone, head, cfg)
    train_one_epoch(model, _random_batches(), torch.nn.CrossEntropyLoss(), opt,
                    build_scheduler(opt, 0, 2), torch.device("cpu"))
    after = model.state_dict()
    hname = head_name(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Every backbone tensor, BatchNorm running statistics included, is untouched.
    assert changed == {f"{hname}.weight", f"{hname}.bias"}


def test_partial_unfreezes_exactly_the_last_k_stages() -> None:
    model = build_model("resnet18", 3, pretrained=False)
    backbone, head = apply_strategy(model, "partial", unfreeze_stages=2)
    names = [n for n, _ in stages(model)]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}
    assert len(backbone) == sum(1 for n, _ in model.named_parameters()
                                if n.startswith(("layer3", "layer4")))
    with pytest.raises(ValueError, match=r"out of range.*6 stages"):
        apply_strategy(model, "partial", unfreeze_stages=7)
    before = _snapshot(model)
    cfg = TrainConfig(strategy="partial", unfreeze_stages=2, lr=0.1, backbone_lr=0.1)
    opt = build_optimizer(backbone, head, cfg)
    train_one_epoch(model, _random_batches(size=32), torch.nn.CrossEntropyLoss(), opt, None,
                    torch.device("cpu"))
    after = model.state_dict()
    changed_stages = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed_stages == {"layer3", "layer4", "fc"}


def _digits_loaders(size: int, per_class: int) -> tuple[list, list]:
    """scikit-learn's digits (real handwriting, shipped in the package) as RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    preset = EvalPreset.for_size(size)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    train, val, taken = [], [], [0] * 10
    for i in order:
        y = int(digits.target[i])
        img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
        sample = (preset(img), y)
        if taken[y] < per_class:
            taken[y] += 1
            train.append(sample)
        elif len(val) < 300:
            val.append(sample)
    return train, val


@pytest.mark.slow
def test_transfer_beats_random_initialisation_on_digits() -> None:
    train, val = _digits_loaders(size=96, per_class=10)
    cfg = TrainConfig(strategy="feature-extract", epochs=8, lr=0.05, batch_size=20,
                      warmup_epochs=0, label_smoothing=0.0)
    results = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        model, backbone, head = prepare_model(cfg, "efficientnet_lite0", 10,
                                              pretrained=pretrained)
        fit = fit_plain(model, backbone, head,
                        DataLoader(train, batch_size=cfg.batch_size, shuffle=True),
                        DataLoader(val, batch_size=100), cfg, 10, torch.device("cpu"))
        results[pretrained] = fit.best_val_accuracy
    assert results[True] >= 0.6, results
    assert results[True] - results[False] >= 0.3, results
