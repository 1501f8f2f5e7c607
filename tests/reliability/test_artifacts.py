"""Hostile files on the volume, checked in-process (no Ray needed): weights and checkpoints
that are malicious pickles are refused and nothing they carry runs; a truncated image never
enters the dataset by import; a full disk is reported as VolumeFull with nothing partial.

Run: `timeout 300 .venv/bin/python -m pytest tests/reliability/test_artifacts.py -s`
"""

from __future__ import annotations

import ast
import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.support import hostile
from tests.support.dataset import check_dataset_integrity
from tests.support.hostile import PickleMarker
from tests.support.images import labelled_set
from training.dataset import DatasetStore, VolumeFull, load_cifar_batch
from training.registry import InvalidVersion, Registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_every_torch_load_in_the_code_is_weights_only() -> None:
    calls = []
    for path in [*REPO.glob("training/*.py"), *REPO.glob("service/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert calls, "no torch.load found: the check is looking in the wrong place"
    assert all(ok for _, ok in calls), calls


def test_malicious_torch_checkpoint_is_refused_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1, "evil": PickleMarker(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_as_safetensors_is_refused_by_the_registry(tmp_path: Path,
                                                                     writer: str) -> None:
    marker = tmp_path / "pwned"
    registry = Registry(tmp_path / "home")
    version, staging = registry.allocate()
    payload = {"weight": PickleMarker(marker)}
    if writer == "pickle":
        (staging / "model.safetensors").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, staging / "model.safetensors")
    (staging / "manifest.json").write_text(
        '{"backbone": "resnet18", "classes": ["a", "b"], "preprocessing": {}}')
    os.rename(staging, registry.root / version)
    with pytest.raises(InvalidVersion):
        registry.load(version)
    assert not marker.exists()


def test_malicious_cifar_batch_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": PickleMarker(marker), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError):
        load_cifar_batch(path)
    assert not marker.exists()


def test_import_skips_truncated_images(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    for fmt in ("PNG", "JPEG", "WEBP"):
        (tree / "cat" / f"cut.{fmt.lower()}").write_bytes(hostile.truncated(fmt))
    (tree / "cat" / "good.png").write_bytes(hostile.encoded("PNG", (32, 32)))
    from training.dataset import iter_imagefolder

    store = DatasetStore(tmp_path / "home")
    report = store.ingest_many(iter_imagefolder(tree), source="import")
    assert report.added == 1 and len(report.skipped) == 3, report
    assert len(check_dataset_integrity(tmp_path / "home")) == 1


@pytest.mark.parametrize("fail_at", ["image", "ledger"])
def test_enospc_is_volume_full_with_nothing_partial(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    fail_at: str) -> None:
    """The one injected fault: ENOSPC from fsync (where a full disk reports a write that did
    not fit), for the image file or for the ledger line. The real full disk, a tmpfs, is in
    test_faults; this one also reaches the ledger, which a real full disk rarely does."""
    home = tmp_path / "home"
    store = DatasetStore(home)
    (_, first), (_, second) = labelled_set(["red"], 2)
    store.ingest(first, "red")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if (fail_at == "image" and name.endswith(".tmp")) or \
                (fail_at == "ledger" and name.endswith("ledger.jsonl")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(VolumeFull):
        store.ingest(second, "red")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(check_dataset_integrity(home)) == 1
    assert store.ingest(second, "red").status == "added"  # once there is room again
    assert len(check_dataset_integrity(home)) == 2
    shutil.rmtree(home)
