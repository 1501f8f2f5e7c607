"""The Ray Train job end to end on a real local Ray cluster (one per module: startup costs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.imagegen import labelled_set
from training.config import GateConfig, TrainConfig
from training.dataset import DatasetStore, DatasetTooSmall
from training.engine import ImageFileDataset
from training.job import gate, job_view, run_job
from training.jobs import JobRunning, JobStore
from training.loop import CHECKPOINT_FILE
from training.model import build_model
from training.registry import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _fill(home: Path, per_label: int = 16, labels: tuple[str, ...] = ("red", "blue")) -> None:
    store = DatasetStore(home)
    for label, data in labelled_set(list(labels), per_label):
        store.ingest(data, label)


def _cfg(**kw: object) -> TrainConfig:
    base = {"backbone": "efficientnet_lite0", "epochs": 2, "workers": 2, "batch_size": 8,
            "image_size": 64, "lr": 0.05, "threads": 1}
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_dataset_too_small_fails_before_any_worker(tmp_path: Path) -> None:
    _fill(tmp_path, per_label=5, labels=("red",))
    with pytest.raises(DatasetTooSmall, match="at least 2 labels"):
        run_job(tmp_path, _cfg())  # no ray.init needed: it never gets that far
    assert JobStore(tmp_path).list() == []
    assert not (tmp_path / "runs").exists()


def test_two_worker_job_publishes_a_version_that_rebuilds_from_its_manifest(
        tmp_path: Path, ray_cluster: None) -> None:
    _fill(tmp_path)
    record = run_job(tmp_path, _cfg(epochs=3))
    assert record["status"] == "succeeded", record
    assert record["version"] == "v1" and record["promoted"] is True
    assert [m["epoch"] for m in record["metrics"]] == [1, 2, 3]
    registry = Registry(tmp_path)
    assert registry.versions() == ["v0", "v1"] and registry.current() == "v1"
    manifest = registry.manifest("v1")
    for key in ("backbone", "weights_origin", "classes", "preprocessing", "training_config",
                "strategy", "data_fingerprint", "metrics", "promotion", "parent", "created_at",
                "software"):
        assert key in manifest, key
    assert manifest["classes"] == ["blue", "red"] and manifest["parent"] == "v0"
    assert manifest["metrics"]["confusion_matrix"] and manifest["metrics"]["per_class_accuracy"]
    vdir = registry.version_dir("v1")
    assert (vdir / "curves.png").stat().st_size > 1000
    assert (vdir / "confusion.png").stat().st_size > 1000

    # The published model predicts exactly what its best checkpoint predicts.
    best_epoch = manifest["metrics"]["best_epoch"]
    states = [torch.load(p, weights_only=True)
              for p in (tmp_path / "runs" / record["job_id"]).glob(f"*/{CHECKPOINT_FILE}")]
    state = next(s for s in states if s["epoch"] == best_epoch)
    reference = build_model("efficientnet_lite0", 2, pretrained=False)
    reference.load_state_dict(state["model"])
    reference.eval()
    loaded = registry.load("v1", engine="eager")
    items = DatasetStore(tmp_path).items()[:6]
    ds = ImageFileDataset([(str(i.path), 0) for i in items], loaded.preset)
    x = torch.stack([ds[k][0] for k in range(len(ds))])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x))
        # The engine chosen at publish time (ONNX Runtime when it measured faster) agrees.
        served = registry.load("v1")
        assert manifest["inference"]["engine"] in ("eager", "onnxruntime")
        torch.testing.assert_close(served.model(x), reference(x), atol=1e-3, rtol=1e-3)

    # A candidate worse than the current model is published but not promoted.
    worse = run_job(tmp_path, _cfg(epochs=1, lr=1e-7, workers=1,
                                   gate=GateConfig(max_regression=0.0)))
    assert worse["status"] == "succeeded" and worse["version"] == "v2"
    assert worse["promoted"] is False, worse["reason"]
    assert "worse than the current model" in worse["reason"]
    assert worse["val_accuracy"] < worse["current_val_accuracy"]
    assert registry.current() == "v1"
    assert registry.manifest("v2")["promotion"]["promoted"] is False


def test_killed_worker_resumes_from_its_last_checkpoint(tmp_path: Path,
                                                        ray_cluster: None) -> None:
    _fill(tmp_path, per_label=12)
    jobs = JobStore(tmp_path)
    started: list[str] = []
    result: dict = {}
    cfg = _cfg(epochs=10, batch_size=2, max_failures=2)
    thread = threading.Thread(target=lambda: result.update(
        run_job(tmp_path, cfg, on_started=started.append)))
    thread.start()
    killed_pid = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        if started:
            view = job_view(jobs, started[0])
            progress = (tmp_path / "jobs" / f"{started[0]}.progress.json")
            checkpoints = list((tmp_path / "runs" / started[0]).glob("checkpoint_*"))
            # Kill only once checkpoints are committed: a kill before the first one rightly
            # restarts at epoch 0.
            if len(view["metrics"]) >= 3 and len(checkpoints) >= 2 and progress.exists():
                import json

                killed_pid = json.loads(progress.read_text())["pid"]
                assert 0 < view["progress"]["fraction"] < 1
                os.kill(killed_pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    assert killed_pid is not None, "the job never reached epoch 3"
    thread.join(timeout=300)
    assert result["status"] == "succeeded", result
    assert result["resumed_from_epoch"] is not None and result["resumed_from_epoch"] >= 1
    assert [m["epoch"] for m in result["metrics"]] == list(range(1, 11))


def test_a_second_job_on_the_same_volume_is_refused(tmp_path: Path) -> None:
    _fill(tmp_path)
    lock = JobStore(tmp_path).acquire()
    try:
        with pytest.raises(JobRunning):
            run_job(tmp_path, _cfg())
    finally:
        lock.release()


def test_gate_decisions() -> None:
    strict = GateConfig(min_val_accuracy=0.5, max_regression=0.0)
    assert gate(0.4, None, False, strict)[0] is False
    assert gate(0.6, 0.9, False, strict)[0] is True  # other classes: minimum only
    assert gate(0.8, 0.9, True, strict)[0] is False
    assert gate(0.9, 0.9, True, strict)[0] is True
    assert gate(0.85, 0.9, True, GateConfig(max_regression=0.1))[0] is True


def test_feature_cache_runs_the_backbone_only_on_new_images(tmp_path: Path,
                                                            ray_cluster: None) -> None:
    _fill(tmp_path, per_label=10)
    cfg = _cfg(epochs=3, augment=False, workers=2, lr=0.1)
    first = run_job(tmp_path, cfg)
    assert first["status"] == "succeeded", first
    feature_dirs = list((tmp_path / "cache" / "features").iterdir())
    assert len(feature_dirs) == 1
    cached = {p.name: p.stat().st_mtime_ns for p in feature_dirs[0].iterdir()}
    assert len(cached) == 20
    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 2, seed=5):
        store.ingest(data, label)
    second = run_job(tmp_path, cfg)
    assert second["status"] == "succeeded", second
    after = {p.name: p.stat().st_mtime_ns for p in feature_dirs[0].iterdir()}
    assert len(after) == 24
    assert all(after[name] == mtime for name, mtime in cached.items())  # none recomputed
    assert first["metrics"][-1]["val_accuracy"] >= 0.5
