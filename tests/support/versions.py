"""Model versions published on a test volume as training would publish them, without training:
a real network (the tests' backbone, random head) with the classes asked for."""

from __future__ import annotations

import shutil
import time

from tests.support.service import BACKBONE
from training.model import build_model
from training.presets import EvalPreset
from training.registry import WEIGHTS, Registry


def publish_version(registry: Registry, classes: list[str], crop: int = 64) -> str:
    """A small trained-looking version (random head) with `classes`; CURRENT untouched.
    -> its name."""
    model = build_model(BACKBONE, num_classes=len(classes), pretrained=False)
    version, staging = registry.allocate()
    manifest = {"backbone": BACKBONE, "classes": classes,
                "preprocessing": EvalPreset.for_size(crop).to_dict(), "parent": registry.current(),
                "created_at": time.time(), "metrics": None,
                "promotion": {"promoted": True, "reason": "test"}}
    registry.publish(version, staging, model.state_dict(), manifest)
    return version


def publish_broken_copy(registry: Registry, of: str = "v0") -> str:
    """A copy of version `of` published under the next number, then one bit of its weights
    flipped on disk (still a valid safetensors file with finite numbers): the checksum refuses
    it at load. -> its name."""
    version, staging = registry.allocate()
    staging.rmdir()
    shutil.copytree(registry.version_dir(of), staging)
    staging.rename(registry.root / version)
    weights = registry.root / version / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return version
