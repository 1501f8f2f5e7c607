"""Preprocessing presets: one class per phase, as in torchvision's classification references.

`EvalPreset` is the single source of inference preprocessing: training validates with it and the
service classifies with it, rebuilt from the version's `manifest.json` (`EvalPreset.from_dict`).
Both presets take a PIL image in RGB and return a `(3, crop, crop)` float32 tensor normalised
with the preset's mean and std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalPreset:
    """Resize the short side to `resize`, centre-crop `crop`, normalise.

    The defaults are torchvision's ImageNet evaluation preprocessing (256 -> 224).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    _transform: T.Compose | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop {self.crop} must be positive and at most resize {self.resize}")
        transform = T.Compose(
            [
                T.PILToTensor(),
                T.Resize(self.resize, interpolation=_interpolation(self.interpolation),
                         antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )
        object.__setattr__(self, "_transform", transform)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) float32, normalised."""
        assert self._transform is not None
        return self._transform(image)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_transform", None)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalPreset:
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    @classmethod
    def for_size(cls, crop: int) -> EvalPreset:
        """The ImageNet ratio (crop = 0.875 x resize) at another crop size."""
        return cls(resize=round(crop / 0.875), crop=crop)


@dataclass(frozen=True)
class TrainPreset:
    """The transfer-learning tutorial's augmentation: random resized crop + horizontal flip."""

    crop: int = 224
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    _transform: T.Compose | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps: list = [T.PILToTensor(), T.RandomResizedCrop(self.crop, antialias=True)]
        if self.hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(self.hflip_prob))
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]
        object.__setattr__(self, "_transform", T.Compose(steps))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        assert self._transform is not None
        return self._transform(image)

    @classmethod
    def matching(cls, preset: EvalPreset) -> TrainPreset:
        return cls(crop=preset.crop, mean=preset.mean, std=preset.std)


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        allowed = [m.value for m in T.InterpolationMode]
        raise ValueError(f"unknown interpolation {name!r}; expected one of {allowed}") from None
