"""Derived data in `<home>/cache/`: resized copies of originals and backbone features.

Both are keyed by content hash and always safe to delete.

- Resized copies (`cache/resized/<short side>/<sha>.jpg`): training decodes a few-hundred-pixel
  JPEG every epoch instead of a 12-megapixel original. Made once per (image, size); originals
  whose short side is already within 1.5x of the target are used as they are.
- Features (`cache/features/<key>/<sha>.safetensors`): in `feature-extract` without augmentation
  the frozen backbone (eval mode, BatchNorm statistics frozen) is a pure function of
  (image, backbone + weights, eval preset), so its output is computed once and reused across
  epochs and across retrains; a retrain on newly labelled images runs the backbone on the new
  images only. `key` hashes the backbone name, its weights origin and the preset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from training.dataset import Item, write_file_atomic
from training.imageio import decode_image
from training.presets import EvalPreset

log = logging.getLogger(__name__)

RESIZE_SLACK = 1.5
JPEG_QUALITY = 95


def resized_path(cache: Path, item: Item, short_side: int) -> Path:
    return cache / "resized" / str(short_side) / f"{item.sha256}.jpg"


def ensure_resized(items: Sequence[Item], cache: Path, short_side: int) -> dict[str, Path]:
    """sha256 -> the file training should read: a cached resized copy or the original."""
    out: dict[str, Path] = {}
    made = 0
    for item in items:
        target = resized_path(cache, item, short_side)
        if target.exists():
            out[item.sha256] = target
            continue
        with Image.open(item.path) as header:  # reads the header only: most need no copy
            if min(header.size) <= short_side * RESIZE_SLACK:
                out[item.sha256] = item.path
                continue
        image = decode_image(item.path.read_bytes(), draft_size=short_side)
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(target, buf.getvalue())
        out[item.sha256] = target
        made += 1
    if made:
        log.info("made %d resized copies (short side %d) in %s", made, short_side, cache)
    return out


def feature_key(backbone: str, weights_origin: str, preset: EvalPreset) -> str:
    blob = json.dumps({"backbone": backbone, "weights": weights_origin,
                       "preset": preset.to_dict()}, sort_keys=True)
    return f"{backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class FeatureCache:
    """One safetensors file per image: {"features": (D,) float32}."""

    def __init__(self, cache: Path, key: str):
        self.root = cache / "features" / key
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def missing(self, shas: Sequence[str]) -> list[str]:
        return [s for s in shas if not self.path(s).exists()]

    def put(self, sha256: str, features: torch.Tensor) -> None:
        from safetensors.torch import save

        write_file_atomic(self.path(sha256),
                          save({"features": features.detach().cpu().float().contiguous()}))

    def get_many(self, shas: Sequence[str]) -> torch.Tensor:
        """-> (N, D) float32, in the order of `shas`."""
        from safetensors.torch import load_file

        return torch.stack([load_file(str(self.path(s)))["features"] for s in shas])


@torch.no_grad()
def compute_features(extractor: nn.Module, files: Sequence[tuple[str, Path]],
                     preset: EvalPreset, cache: FeatureCache, device: torch.device,
                     batch_size: int = 32, channels_last: bool = False,
                     num_workers: int = 0) -> int:
    """Run the frozen backbone over (sha256, path) pairs and store each (D,) float32 feature
    vector. `num_workers`: DataLoader processes decoding the images (on a GPU the decoding,
    not the backbone, is the slow part). -> how many were computed."""
    from training.engine import ImageFileDataset

    if not files:
        return 0
    extractor.eval()
    ds = ImageFileDataset([(str(p), i) for i, (_, p) in enumerate(files)], preset,
                          preset.resize)
    done = 0
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for x, idx in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = extractor(x).flatten(1)
        for f, i in zip(feats, idx.tolist(), strict=True):
            cache.put(files[i][0], f)
        done += len(idx)
    log.debug("computed %d feature vectors in %s (pid %d)", done, cache.root, os.getpid())
    return done
