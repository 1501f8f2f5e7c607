"""Explanations: a Grad-CAM heat map of why a version gave an image a label.

Grad-CAM (Selvaraju et al., 2017): take the last spatial feature map A (C, h, w) of the network
and the gradient of the label's logit y with respect to it; weight each channel by its mean
gradient, a_c = mean(dy/dA_c), and keep the positive part of sum_c a_c A_c. Upsampled to the
model's input, it shows where the evidence for that label lies.

Which feature map (`target_layer`): the last module, in execution order, whose output is a
4-D (N, C, h, w) tensor with h * w > 1 and that runs once per forward pass (a module reused at
every stage, such as one shared activation, has no single output), found by one dry forward
pass with hooks on every module. That is the last convolution with what follows it before
pooling (ResNet's `layer4`, torchvision EfficientNet's / MobileNet's `features`,
efficientnet_lite0's head convolution and its norm), with no architecture-specific names. A
network with no such map (a vision transformer) is refused with `ExplainUnsupported`.

Always on the eager model (`Registry.load(..., engine="eager")`): ONNX Runtime gives no
gradients. The image goes through the safe decoder and the version's `EvalPreset`; the overlay
is drawn on that same view (short side resized, centre-cropped), so it shows what the model saw.
`Explainer` holds at most `max_models` versions and runs one explanation at a time (the hooks
live on the shared model while it runs).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, decode_image
from training.presets import EvalPreset
from training.registry import LoadedModel, Registry

OVERLAY_ALPHA = 0.5


class ExplainUnsupported(DomainError, ValueError):
    code = "explain_unsupported"
    status = 409


class UnknownClass(DomainError, ValueError):
    """A label the version does not have among its classes."""

    code = "unknown_class"
    status = 400


@dataclass(frozen=True)
class Explanation:
    """`cam`: (crop, crop) float32 in [0, 1]; `png`: the heat map over the model's view of the
    image (RGB PNG, crop x crop); `label`/`score`: the explained label and its softmax
    probability; `top_label`: the model's own answer."""

    version: str
    label: str
    score: float
    top_label: str
    cam: np.ndarray
    png: bytes


def target_layer(model: nn.Module, crop: int) -> nn.Module:
    """The module whose output Grad-CAM uses (module docstring). Raises ExplainUnsupported."""
    last: list[nn.Module] = []
    calls: dict[int, int] = {}

    def hook(module: nn.Module, _: object, output: object) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4 and \
                output.shape[2] * output.shape[3] > 1:
            last.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, crop, crop))
    finally:
        for h in handles:
            h.remove()
    last = [m for m in last if calls[id(m)] == 1]  # a shared module (one activation
    # called at every stage) has no single output to take the gradient of
    if not last:
        raise ExplainUnsupported(f"{type(model).__name__} has no spatial feature map to "
                                 "explain with Grad-CAM")
    return last[-1]


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, class_index: int
             ) -> tuple[np.ndarray, torch.Tensor]:
    """x: (1, 3, H, W) float32, normalised -> (cam (H, W) float32 in [0, 1], logits (C,))."""
    store: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, __: object, output: torch.Tensor) -> None:
        store["activation"] = output
        output.register_hook(lambda g: store.__setitem__("gradient", g))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # gradients flow even where weights are frozen
            logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, class_index].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    activation, gradient = store["activation"].detach(), store["gradient"].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.numpy().astype(np.float32), logits.detach()[0]


def model_view(image: Image.Image, preset: EvalPreset) -> Image.Image:
    """What the model sees, before normalisation: short side resized, centre-cropped."""
    mode = T.InterpolationMode(preset.interpolation)
    view = T.Compose([T.Resize(preset.resize, interpolation=mode, antialias=True),
                      T.CenterCrop(preset.crop)])
    out: Image.Image = view(image)
    return out


def overlay_png(view: Image.Image, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """The heat map (matplotlib's `jet`) blended over `view` -> PNG bytes."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)
    base = np.asarray(view.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * base + alpha * heat.astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def explain_image(loaded: LoadedModel, image: Image.Image, label: str | None = None
                  ) -> Explanation:
    """Grad-CAM of `label` (default: the top label) for an RGB image on an eager model."""
    model = loaded.model
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ExplainUnsupported(f"{loaded.version} is not loaded as an eager PyTorch model")
    x = loaded.preset(image).unsqueeze(0)
    layer = target_layer(model, loaded.preset.crop)
    if label is None:
        with torch.inference_mode():
            index = int(model(x)[0].argmax())
    else:
        try:
            index = loaded.classes.index(label)
        except ValueError:
            shown = ", ".join(repr(c) for c in loaded.classes[:10])
            more = ", ..." if len(loaded.classes) > 10 else ""
            raise UnknownClass(f"{loaded.version} has no class {label[:64]!r}; its classes: "
                               f"{shown}{more}") from None
    cam, logits = grad_cam(model, layer, x, index)
    probs = torch.softmax(logits.float(), dim=0)
    return Explanation(loaded.version, loaded.classes[index], float(probs[index]),
                       loaded.classes[int(probs.argmax())], cam,
                       overlay_png(model_view(image, loaded.preset), cam))


class Explainer:
    """Grad-CAM for a volume's versions: eager models loaded on first use and kept (at most
    `max_models`, least recently used out); one explanation at a time."""

    def __init__(self, home: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_models: int = 2):
        self.registry = Registry(home)
        self.max_pixels, self.max_models = max_pixels, max(1, max_models)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def model(self, version: str) -> LoadedModel:
        """Hold the lock."""
        self.registry.version_dir(version)  # 404 for a version removed meanwhile
        if version in self._models:
            self._models.move_to_end(version)
            return self._models[version]
        loaded = self.registry.load(version, engine="eager")
        self._models[version] = loaded
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return loaded

    def explain(self, data: bytes, label: str | None = None, version: str | None = None
                ) -> Explanation:
        """Untrusted bytes -> Explanation by `version` (default: CURRENT). Raises ImageError
        subclasses, VersionNotFound, InvalidVersion, UnknownClass, ExplainUnsupported, and
        NoCurrentVersion when none is named and none is current."""
        from training.registry import NoCurrentVersion

        if version is None:
            version = self.registry.current()
            if version is None:
                raise NoCurrentVersion("no version is current; name one with ?version=")
        with self._lock:
            loaded = self.model(version)
            image = decode_image(data, self.max_pixels, draft_size=loaded.preset.resize)
            return explain_image(loaded, image, label)
