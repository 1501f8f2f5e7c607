"""The registry: version 0, atomic publishing, retention."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.registry import InvalidVersion, Registry

PUBLISH_FOREVER = """
import sys, time, torch
from training.registry import Registry
from training.model import build_model
registry = Registry(sys.argv[1])
state = build_model("efficientnet_lite0", 2, pretrained=False).state_dict()
manifest = registry.manifest("v0")
while True:
    version, staging = registry.allocate()
    registry.publish(version, staging, state,
                     {**manifest, "classes": ["a", "b"], "parent": registry.current()})
    registry.set_current(version)
    print(version, flush=True)
"""


def test_version_zero_is_the_pretrained_imagenet_classifier(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.ensure_v0("efficientnet_lite0") == "v0"
    assert registry.ensure_v0("efficientnet_lite0") is None
    assert registry.current() == "v0"
    loaded = registry.load("v0")
    assert len(loaded.classes) == 1000 and loaded.classes[285] == "Egyptian cat"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    eager = registry.load("v0", engine="eager")
    with torch.no_grad():
        assert loaded.model(x).shape == (2, 1000)
        torch.testing.assert_close(loaded.model(x), eager.model(x), atol=1e-3, rtol=1e-3)
    inference = loaded.manifest["inference"]
    # The engine was chosen by measurement when v0 was published, and says why.
    assert inference["engine"] in ("eager", "onnxruntime") and inference["reason"]
    if inference["engine"] == "onnxruntime":
        assert type(loaded.model).__name__ == "OnnxModule"
        assert inference["onnxruntime_images_per_s"] > inference["eager_images_per_s"]
        assert (registry.version_dir("v0") / "model.onnx").exists()


@pytest.mark.slow  # a publisher subprocess killed part-way
def test_publisher_killed_mid_write_leaves_current_complete(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    for delay in (1.5, 2.3, 3.1):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_FOREVER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one publish completed
        time.sleep(delay % 1)  # land the kill somewhere inside a later publish
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        current = registry.current()
        assert current is not None
        loaded = registry.load(current)  # complete and loadable
        assert loaded.classes == ["a", "b"]
        # Every listed version is complete; leftovers are only `.v<N>.partial` folders.
        for v in registry.versions():
            assert (registry.version_dir(v) / "model.safetensors").exists()
        leftovers = [p.name for p in (tmp_path / "models").iterdir()
                     if p.name not in registry.versions()]
        assert set(leftovers) <= {"CURRENT", ".lock", "backbone.json"} | {
            p.name for p in (tmp_path / "models").glob(".v*.partial")}
    removed = registry.remove_stale_partials(older_than_s=0)
    assert not list((tmp_path / "models").glob(".v*.partial"))
    assert all(name.endswith(".partial") for name in removed)


def test_retention_keeps_current_its_parent_and_v0(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    manifest = registry.manifest("v0")
    state = {"w": torch.zeros(1)}
    for parent in ("v0", "v1", "v2", "v3", "v4"):
        version, staging = registry.allocate()
        registry.publish(version, staging, state, {**manifest, "parent": parent})
    registry.set_current("v2")  # a pinned older version; its parent is v1
    removed = registry.prune(keep=2)
    assert sorted(removed) == ["v3"]
    assert registry.versions() == ["v0", "v1", "v2", "v4", "v5"]
    assert registry.current() == "v2"


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    weights = registry.version_dir("v0") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # still a valid safetensors file with finite numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidVersion, match="checksum"):
        registry.load("v0")
