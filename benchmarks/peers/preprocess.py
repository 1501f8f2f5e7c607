"""The peers' decode + preprocessing: the same steps as our service, standalone.

A peer runs in its own virtual environment without visionloop installed, so this module
imports nothing of ours: only Pillow, torch and torchvision (v2 transforms). It reproduces
`training.imageio.decode_image(data, draft_size=256)` for the benchmark's inputs (JPEG draft
decode to a short side >= 256, EXIF orientation, RGB) followed by `training.presets.EvalPreset()`
(resize the short side to 256 with antialiasing, centre-crop 224, scale to [0, 1], normalise
with the ImageNet mean and std). `tests/test_peers_bench.py` checks that the tensor it gives
equals ours on real JPEGs, so a peer's figure is for the same work. It leaves out our
upload checks (format allow-list, pixel limit): the peers' idiomatic handlers have none either.

The TorchServe archive ships this file as an extra file, and the BentoML service imports it from
the folder it is served from.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

RESIZE = 256
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TOP_K = 5

_TRANSFORM = T.Compose([
    T.PILToTensor(),
    T.Resize(RESIZE, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
    T.CenterCrop(CROP),
    T.ToDtype(torch.float32, scale=True),
    T.Normalize(MEAN, STD),
])


def decode(data: bytes | bytearray, draft_size: int = RESIZE) -> Image.Image:
    """Image bytes -> 8-bit RGB PIL image, JPEG decoded in draft mode (as our service does)."""
    img = Image.open(io.BytesIO(bytes(data)))
    return from_opened(img, draft_size)


def from_opened(img: Image.Image, draft_size: int = RESIZE) -> Image.Image:
    """An opened, not yet loaded image -> RGB, with libjpeg's reduced-scale decode for JPEG."""
    if img.format == "JPEG":
        w, h = img.size
        scale = max(1.0, min(w, h) / draft_size)
        img.draft("RGB", (int(w / scale), int(h / scale)))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, 224, 224) float32, normalised (EvalPreset's defaults)."""
    out: torch.Tensor = _TRANSFORM(img)
    return out


def top_k(probs: torch.Tensor, classes: Sequence[str], k: int = TOP_K
          ) -> list[list[dict[str, Any]]]:
    """(N, C) probabilities -> per image the k best as {"label", "score"} (our answer's shape)."""
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"label": classes[int(i)], "score": round(float(s), 6)}
             for s, i in zip(srow, irow, strict=True)]
            for srow, irow in zip(scores, indices, strict=True)]


def load_classes(folder: Path) -> list[str]:
    """classes.json beside the model: the version's class names in index order."""
    names: list[str] = json.loads((folder / "classes.json").read_text())
    return names
