"""One training job end to end on a real local Ray cluster (the `ray_cluster` fixture of
tests/conftest.py, one per module: startup costs), and, without Ray, the three-way split and its
refusals, the promotion gate on the held-out test split, publishing, what crosses into the
workers (`LoopConfig`) and the job store that records it."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from service.controller import new_since_last_job
from tests.support.dataset import check_dataset_integrity
from tests.support.images import COLOURS, encode, labelled_set, noisy_picture
from tests.support.waiting import wait_for
from training.config import GateConfig, TrainConfig
from training.dataset import DatasetStore, DatasetTooSmall, Item, sha256_of, split_of
from training.engine import ImageFileDataset
from training.jobs import JobNotFound, JobRunning, JobStore
from training.loop import CHECKPOINT_FILE, LOOP_CONFIG_KEY
from training.model import (
    LITE0,
    BackboneChoice,
    build_model,
    head_module,
    split_head,
    weights_origin,
)
from training.pipeline import (
    PreparedData,
    VersionScore,
    gate,
    judge,
    loop_config,
    majority_baseline,
    prepare_data,
    publish,
    run_job,
)
from training.presets import EvalPreset
from training.registry import DATA, Registry


def _fill(home: Path, per_label: int = 16, labels: tuple[str, ...] = ("red", "blue")) -> None:
    store = DatasetStore(home)
    for label, data in labelled_set(list(labels), per_label):
        store.ingest(data, label)


def _cfg(**kw: object) -> TrainConfig:
    base = {"backbone": "efficientnet_lite0", "epochs": 2, "workers": 2, "batch_size": 8,
            "image_size": 64, "lr": 0.05, "threads": 1}
    return TrainConfig(**{**base, **kw})


def _in_split(colour: str, split: str, n: int, seed: int = 0) -> list[bytes]:
    """`n` PNGs of `colour` (a COLOURS name) whose content hash puts them in `split`."""
    out: list[bytes] = []
    k = 0
    while len(out) < n:
        data = encode(noisy_picture(COLOURS[colour], seed * 100_000 + k))
        if split_of(sha256_of(data)) == split:
            out.append(data)
        k += 1
    return out


def _store_with(home: Path, spec: dict[tuple[str, str, str], int]) -> DatasetStore:
    """A store holding spec[(label, colour, split)] images of `colour` under `label` that land
    in `split`; a label and a colour that differ make a mislabelled image."""
    store = DatasetStore(home)
    for k, ((label, colour, split), n) in enumerate(spec.items()):
        for data in _in_split(colour, split, n, seed=k):
            store.ingest(data, label)
    return store


def _by_colour(counts: dict[str, tuple[int, int, int]]) -> dict[tuple[str, str, str], int]:
    """label -> (train, val, test) counts of correctly labelled images."""
    return {(label, label, split): n for label, per_split in counts.items()
            for split, n in zip(("train", "val", "test"), per_split, strict=True)}


# -- the split and its refusals (no Ray) ---------------------------------------------------------

def test_prepare_data_splits_three_ways_and_records_the_split(tmp_path: Path) -> None:
    store = _store_with(tmp_path, _by_colour({"red": (4, 1, 4), "blue": (6, 1, 3)}))
    data = prepare_data(store)
    assert data.classes == ["blue", "red"]
    assert (len(data.train), len(data.val), len(data.test)) == (10, 2, 7)
    assert all(split_of(i.sha256) == name for name in ("train", "val", "test")
               for i in getattr(data, name))
    fp = data.fingerprint
    assert fp["label_counts"] == {"blue": 10, "red": 9}
    assert (fp["train_count"], fp["val_count"], fp["test_count"]) == (10, 2, 7)
    assert (fp["val_fraction"], fp["test_fraction"]) == (0.2, 0.2)
    listed = data.data_list()
    assert {sha for sha, _ in listed["test"]} == {i.sha256 for i in data.test}
    assert listed["split"] == {"by": "sha256", "val_fraction": 0.2, "test_fraction": 0.2}
    assert "ledger_offset" not in fp  # the live store has none; a job's snapshot has
    snap = store.snapshot("job-x")
    from_snapshot = prepare_data(snap)
    assert from_snapshot.fingerprint == {**fp, "ledger_offset": 19}
    assert all(i.path.parent == snap.root for i in from_snapshot.test)


@pytest.mark.parametrize("spec, message", [
    (_by_colour({"red": (3, 1, 1), "blue": (3, 1, 0)}),
     r"the test split has 1 image\(s\) \(about 20% of images go there\), of 9 in all; each "
     r"held-out split needs at least 2.* add about 5 more labelled images"),
    (_by_colour({"red": (3, 0, 0), "blue": (3, 0, 0)}),
     r"the validation split has 0 image\(s\) .* and the test split has 0 image\(s\) .* add "
     r"about 10 more labelled images"),
    (_by_colour({"red": (3, 1, 1), "blue": (0, 1, 1)}),
     r"labels \['blue'\] have no image in the training split"),
    (_by_colour({"red": (3, 1, 1), "blue": (1, 0, 0)}),
     r"each label needs at least 2 images; add 1 more of 'blue'"),
    (_by_colour({"red": (3, 1, 1)}), r"at least 2 labels; the dataset has only 'red'"),
])
def test_too_small_datasets_are_refused_saying_what_to_add(
        tmp_path: Path, spec: dict[tuple[str, str, str], int], message: str) -> None:
    store = _store_with(tmp_path, spec)
    with pytest.raises(DatasetTooSmall, match=message) as err:
        prepare_data(store)
    assert err.value.status == 400 and err.value.code == "dataset_too_small"


# -- the gate (no Ray) ---------------------------------------------------------------------------

def _items(**counts: int) -> list[Item]:
    return [Item(f"{k:064x}", label, Path()) for label, n in counts.items() for k in range(n)]


def test_majority_baseline_is_the_test_splits_no_information_rate() -> None:
    assert majority_baseline(_items(a=1, b=3)) == 0.75  # always "b"
    assert majority_baseline(_items(a=2, b=2)) == 0.5
    assert majority_baseline(_items(a=1, b=1, c=1, d=1, e=6)) == 0.6
    assert majority_baseline([]) == 0.0


def test_gate_minimum_means_better_than_the_majority_baseline() -> None:
    """The first job after v0 (nothing comparable) needs more than the default minimum of the
    old gate (0.0): a quarter of the majority-class baseline's errors gone."""
    v0 = VersionScore("v0", None, "it predicts other classes (1000 of them)")
    cfg = GateConfig()
    promote, reason = gate(0.5, 0.5, 8, v0, None, cfg)
    assert promote is False
    assert reason == ("test accuracy 0.5000 on 8 held-out image(s) is below the minimum 0.6250 "
                      "(majority-class baseline 0.5000 plus 25% of its errors); the current "
                      "model v0 is not compared: it predicts other classes (1000 of them); no "
                      "earlier version has these classes")
    assert gate(0.625, 0.5, 8, v0, None, cfg)[0] is True  # exactly the minimum passes
    assert gate(1 / 3 + 0.5 * 2 / 3, 1 / 3, 3, v0, None, GateConfig(min_error_reduction=0.5)
                )[0] is True  # equal in exact arithmetic, not in floats
    assert gate(0.92, 0.9, 50, v0, None, cfg)[0] is False  # imbalanced: 0.925 needed
    assert gate(0.33, 0.1, 50, v0, None, cfg)[0] is True  # ten classes: 0.325 needed
    promote, reason = gate(0.7, 0.5, 8, None, None, GateConfig(min_accuracy=0.8))
    assert promote is False and "below the minimum 0.8000 (the configured floor)" in reason
    # The name the field had before the test split is still accepted.
    assert GateConfig.model_validate({"min_val_accuracy": 0.3}).min_accuracy == 0.3


def test_gate_compares_with_the_current_model_and_names_the_best_version() -> None:
    cfg = GateConfig()
    current = VersionScore("v3", 0.9)
    promote, reason = gate(0.8, 0.5, 10, current, None, cfg)
    assert promote is False
    assert "is worse than the current model v3's 0.9000 on the same test split" in reason
    assert gate(0.9, 0.5, 10, current, None, cfg)[0] is True
    assert gate(0.85, 0.5, 10, current, None, GateConfig(max_regression=0.1))[0] is True
    promote, reason = gate(0.5, 0.5, 10, current, None, cfg)  # both checks fail: both named
    assert promote is False and "below the minimum" in reason and "worse than" in reason

    # After a rollback to v0: promoted over CURRENT, and the better v1 is named.
    v0 = VersionScore("v0", None, "it predicts other classes")
    promote, reason = gate(0.9091, 0.5, 11, v0, VersionScore("v1", 1.0), cfg)
    assert promote is True
    assert ("the best version so far is v1 with 1.0000 on the same test split, better than "
            "this candidate (POST /v1/models/v1/activate serves it)") in reason
    promote, reason = gate(0.95, 0.5, 10, current, VersionScore("v1", 0.92, None, 3), cfg)
    assert promote is True
    assert "the best earlier version, v1, has 0.9200 on the same test split" in reason
    assert ("v1 trained on 3 of these test images (published before the three-way split), so "
            "its score is optimistic") in reason


def _constant_model(num_classes: int, answer: int) -> nn.Module:
    """A real network whose head always answers class `answer`: its accuracy on any split is
    the share of that class, known exactly."""
    torch.manual_seed(0)
    model = build_model(LITE0, num_classes=num_classes, pretrained=False)
    head = head_module(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[answer] = 1.0
    return model.eval()


def _fitted_model(data: PreparedData) -> nn.Module:
    """The pretrained backbone with a least-squares head fitted to the training split's
    features: a real classifier of the colours, made without a training loop."""
    model = build_model(LITE0, num_classes=len(data.classes), pretrained=True).eval()
    extractor, _ = split_head(model)
    ds = ImageFileDataset([(str(i.path), data.class_index[i.label]) for i in data.train],
                          EvalPreset.for_size(64))
    x = torch.stack([ds[k][0] for k in range(len(ds))])
    y = torch.tensor([ds[k][1] for k in range(len(ds))])
    with torch.no_grad():
        features = extractor.eval()(x)
        features = torch.cat([features, torch.ones(len(features), 1)], 1)
        targets = nn.functional.one_hot(y, len(data.classes)).float()
        w = torch.linalg.lstsq(features, targets).solution
        head = head_module(model)
        head.weight.copy_(w[:-1].T)
        head.bias.copy_(w[-1])
    return model


def _publish(registry: Registry, classes: list[str], model: nn.Module,
             data_list: dict[str, Any] | None = None) -> str:
    version, staging = registry.allocate()
    registry.publish(version, staging, model.state_dict(),
                     {"backbone": LITE0, "classes": classes,
                      "preprocessing": EvalPreset.for_size(64).to_dict(),
                      "promotion": {"promoted": False, "reason": "made by the test"}},
                     data_list)
    return version


@pytest.fixture
def rolled_back(tmp_path: Path) -> tuple[Registry, PreparedData]:
    """Test split: 4 red, 3 blue (the majority-class baseline answers red: 4/7). v0 has other
    classes and is CURRENT (a rollback); v1 tells the colours apart (its data list has two of
    today's test images under "train", as a version published before the three-way split);
    v2 always answers red."""
    store = _store_with(tmp_path, _by_colour({"red": (4, 1, 4), "blue": (6, 1, 3)}))
    data = prepare_data(store)
    registry = Registry(tmp_path)
    assert _publish(registry, ["cat", "dog", "fish"], _constant_model(3, 0)) == "v0"
    old_list = {"train": [[i.sha256, i.label] for i in data.train + data.test[:2]],
                "val": [[i.sha256, i.label] for i in data.val]}
    assert _publish(registry, data.classes, _fitted_model(data), old_list) == "v1"
    assert _publish(registry, data.classes, _constant_model(2, 1)) == "v2"
    registry.set_current("v0")
    return registry, data


def test_judge_after_a_rollback_names_the_best_version_on_the_same_test_split(
        rolled_back: tuple[Registry, PreparedData]) -> None:
    registry, data = rolled_back
    always_red = _constant_model(2, 1)
    preset = EvalPreset.for_size(64)
    judged = judge(registry, always_red, preset, data, GateConfig(min_error_reduction=0.0))
    assert judged.test.accuracy == pytest.approx(4 / 7) and judged.test.count == 7
    assert judged.baseline == pytest.approx(4 / 7) and judged.minimum == pytest.approx(4 / 7)
    assert judged.current == VersionScore(
        "v0", None, "it predicts other classes (3 of them; the candidate has 2)")
    assert [(s.version, s.accuracy, s.trained_on_test) for s in judged.scores] == [
        ("v1", 1.0, 2), ("v2", pytest.approx(4 / 7), 0)]
    assert judged.best is not None and judged.best.version == "v1"
    assert judged.promote is True  # CURRENT cannot be compared: the minimum decides
    assert ("the current model v0 is not compared: it predicts other classes (3 of them; the "
            "candidate has 2); the best version so far is v1 with 1.0000 on the same test "
            "split, better than this candidate") in judged.reason
    assert "v1 trained on 2 of these test images" in judged.reason

    # The default minimum refuses a model that ignores the image: 4/7 + a quarter of 3/7.
    judged = judge(registry, always_red, preset, data, GateConfig())
    assert judged.promote is False and judged.minimum == pytest.approx(4 / 7 + 3 / 28)
    assert judged.reason.startswith("test accuracy 0.5714 on 7 held-out image(s) is below the "
                                    "minimum 0.6786 (majority-class baseline 0.5714 plus 25% "
                                    "of its errors)")
    # With v1 CURRENT again it is compared, and v2 is the best of the others.
    registry.set_current("v1")
    judged = judge(registry, always_red, preset, data, GateConfig(min_error_reduction=0.0))
    assert judged.promote is False
    assert "worse than the current model v1's 1.0000 on the same test split" in judged.reason
    assert "the best earlier version, v2, has 0.5714" in judged.reason


def test_publish_records_the_split_that_judged_and_its_numbers(
        tmp_path: Path, rolled_back: tuple[Registry, PreparedData]) -> None:
    registry, data = rolled_back
    jobs = JobStore(tmp_path)
    job_id = jobs.create({"epochs": 1}, "test")["job_id"]
    cfg = _cfg(gate=GateConfig(min_error_reduction=0.0))
    confusion = [[1, 0], [1, 0]]
    state = {"model": _constant_model(2, 1).state_dict(), "epoch": 1, "confusion": confusion,
             "history": [{"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.6,
                          "val_loss": 0.69, "val_accuracy": 0.5}]}
    record = publish(registry, jobs, job_id, cfg, BackboneChoice(LITE0, "test", "test"), data,
                     state, keep_versions=None)
    assert record["status"] == "succeeded" and record["version"] == "v3"
    assert record["promoted"] is True and registry.current() == "v3"
    assert record["val_accuracy"] == 0.5
    assert record["test_accuracy"] == pytest.approx(4 / 7)
    assert record["current_test_accuracy"] is None
    manifest = registry.manifest("v3")
    promotion = manifest["promotion"]
    assert promotion == record["promotion"]
    assert promotion["judged_on"] == "test" and promotion["test_count"] == 7
    assert promotion["test_sha256"] == data.fingerprint["test_sha256"]
    assert promotion["candidate_test_accuracy"] == pytest.approx(4 / 7)
    assert promotion["baseline_accuracy"] == pytest.approx(4 / 7)
    assert promotion["current_version"] == "v0" and promotion["best_version"] == "v1"
    assert promotion["best_test_accuracy"] == 1.0
    assert [c["version"] for c in promotion["compared"]] == ["v1", "v2"]
    assert promotion["gate"] == cfg.gate.model_dump() and promotion["reason"] == record["reason"]
    metrics = manifest["metrics"]
    assert metrics["best_val_accuracy"] == 0.5 and metrics["confusion_matrix"] == confusion
    assert metrics["test"]["count"] == 7
    assert metrics["test"]["confusion_matrix"] == [[0, 3], [0, 4]]
    assert metrics["test"]["per_class_accuracy"] == {"blue": 0.0, "red": 1.0}
    assert manifest["parent"] == "v0"
    listed = json.loads((registry.version_dir("v3") / DATA).read_text())
    assert listed == json.loads(json.dumps(data.data_list()))


# -- real jobs (Ray) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_dataset_too_small_fails_before_any_worker(tmp_path: Path) -> None:
    _fill(tmp_path, per_label=5, labels=("red",))
    with pytest.raises(DatasetTooSmall, match="at least 2 labels"):
        run_job(tmp_path, _cfg())  # no ray.init needed: it never gets that far
    assert JobStore(tmp_path).list() == []
    assert not (tmp_path / "runs").exists()
    assert DatasetStore(tmp_path).snapshot_ids() == []


@pytest.mark.slow
def test_two_worker_job_publishes_a_version_that_rebuilds_from_its_manifest(
        tmp_path: Path, ray_cluster: None) -> None:
    _fill(tmp_path)
    # augmentation asked for: feature-extract's default is now without it (cached features,
    # tests below), and on this tiny set 3 epochs without it stay under the gate's bar
    record = run_job(tmp_path, _cfg(epochs=3, augment=True))
    assert record["status"] == "succeeded", record
    assert record["version"] == "v1" and record["promoted"] is True, record["reason"]
    assert "the current model v0 is not compared" in record["reason"]
    assert "no earlier version has these classes" in record["reason"]
    assert [m["epoch"] for m in record["metrics"]] == [1, 2, 3]
    # where the workers ran is in the record: both ranks, each with its node
    assert [w["rank"] for w in record["workers"]] == [0, 1]
    assert all(w["node_id"] and w["host"] and w["device"] == "cpu" for w in record["workers"])
    assert [a["workers"] for a in record["attempts"]] == [record["workers"]]
    registry = Registry(tmp_path)
    assert registry.versions() == ["v0", "v1"] and registry.current() == "v1"
    manifest = registry.manifest("v1")
    for key in ("backbone", "weights_origin", "classes", "preprocessing", "training_config",
                "strategy", "data_fingerprint", "metrics", "promotion", "parent", "created_at",
                "software"):
        assert key in manifest, key
    assert manifest["classes"] == ["blue", "red"] and manifest["parent"] == "v0"
    assert manifest["metrics"]["confusion_matrix"] and manifest["metrics"]["per_class_accuracy"]
    promotion = manifest["promotion"]
    assert promotion["judged_on"] == "test" and promotion["current_version"] == "v0"
    assert promotion["test_count"] == manifest["data_fingerprint"]["test_count"] >= 2
    assert promotion["candidate_test_accuracy"] >= promotion["minimum_accuracy"] >= 0.625
    # calibration, threshold and drift reference, from the same held-out split
    calibration, threshold = manifest["calibration"], manifest["threshold"]
    assert calibration["fitted_on"] == "test" and calibration["ece_bins"] == 15
    assert calibration["count"] == promotion["test_count"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert 0.0 <= threshold["threshold"] <= 1.0 and "precision" in threshold["rule"]
    assert set(manifest["reference"]["label_shares"]) == {"blue", "red"}
    assert sum(manifest["reference"]["confidence_shares"]) == pytest.approx(1.0)
    listed = json.loads((registry.version_dir("v1") / DATA).read_text())
    splits = {name: {sha for sha, _ in listed[name]} for name in ("train", "val", "test")}
    assert sum(map(len, splits.values())) == 32
    assert all(split_of(sha) == name for name, shas in splits.items() for sha in shas)
    vdir = registry.version_dir("v1")
    assert (vdir / "curves.png").stat().st_size > 1000
    assert (vdir / "confusion.png").stat().st_size > 1000
    assert DatasetStore(tmp_path).snapshot_ids() == []  # removed when the job ended

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
    assert "worse than the current model v1's" in worse["reason"]
    assert worse["test_accuracy"] < worse["current_test_accuracy"]
    assert registry.current() == "v1"
    assert registry.manifest("v2")["promotion"]["promoted"] is False


@pytest.mark.slow
def test_the_gate_judges_on_the_held_out_split_not_on_validation(
        tmp_path: Path, ray_cluster: None) -> None:
    """Every image is labelled by its colour except those of the test split, whose labels are
    swapped: the model learns the colours, scores high on validation (the split that picks the
    best epoch) and low on the held-out test split. The first job after v0 is refused: only
    the held-out score counts, and it is below the default minimum."""
    spec = {("red", "red", "train"): 8, ("blue", "blue", "train"): 8,
            ("red", "red", "val"): 3, ("blue", "blue", "val"): 3,
            ("red", "blue", "test"): 3, ("blue", "red", "test"): 3}
    _store_with(tmp_path, spec)
    record = run_job(tmp_path, _cfg(epochs=3, workers=1, augment=False, lr=0.1))
    assert record["status"] == "succeeded", record
    assert record["val_accuracy"] >= 0.8, record["metrics"]
    assert record["test_accuracy"] <= 0.34, record
    assert record["promoted"] is False and Registry(tmp_path).current() == "v0"
    promotion = record["promotion"]
    assert promotion["judged_on"] == "test" and promotion["test_count"] == 6
    assert promotion["baseline_accuracy"] == 0.5 and promotion["minimum_accuracy"] == 0.625
    assert record["reason"].startswith(
        f"test accuracy {record['test_accuracy']:.4f} on 6 held-out image(s) is below the "
        "minimum 0.6250 (majority-class baseline 0.5000 plus 25% of its errors)")
    assert "the current model v0 is not compared" in record["reason"]
    manifest = Registry(tmp_path).manifest(record["version"])
    assert manifest["metrics"]["best_val_accuracy"] == record["val_accuracy"]
    assert manifest["metrics"]["test"]["accuracy"] == record["test_accuracy"]


@pytest.mark.slow
def test_delete_relabel_and_add_during_a_job_change_the_dataset_not_the_job(
        tmp_path: Path, ray_cluster: None) -> None:
    """While a job trains (augmentation: it reads its files every epoch) one of its training
    images is deleted, one of its test images relabelled and a new image added. The job trains
    and is judged on its snapshot; the dataset has changed; the relabel and the addition are
    new for the next job."""
    _fill(tmp_path, per_label=12)
    store, jobs = DatasetStore(tmp_path), JobStore(tmp_path)
    epochs = 6
    started: list[str] = []
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(run_job(
        tmp_path, _cfg(epochs=epochs, workers=1, batch_size=4, augment=True),
        on_started=started.append)))
    thread.start()
    try:
        job_id = wait_for(lambda: started[0] if started else None, timeout=60,
                          what="the job record")
        wait_for(lambda: jobs.view(job_id)["metrics"], timeout=240, what="a first epoch")
        snapshot = store.open_snapshot(job_id)
        assert snapshot is not None
        by_split = {name: [i for i in snapshot.items() if split_of(i.sha256) == name]
                    for name in ("train", "test")}
        deleted, relabelled = by_split["train"][0], by_split["test"][0]
        new_label = "blue" if relabelled.label == "red" else "red"
        assert store.delete(deleted.sha256)
        original = store.find(relabelled.sha256)
        assert original is not None
        assert store.ingest(original.path.read_bytes(), new_label).status == "relabelled"
        (_, added), = labelled_set(["red"], 1, seed=9)
        assert store.ingest(added, "red").status == "added"
        during = jobs.view(job_id)
        assert during["status"] == "running" and during["progress"]["epoch"] < epochs, during
    finally:
        thread.join(timeout=400)
    record = result
    assert record["status"] == "succeeded", record
    assert [m["epoch"] for m in record["metrics"]] == list(range(1, epochs + 1))
    assert record["ledger_offset"] == snapshot.ledger_offset == 24
    listed = json.loads((Registry(tmp_path).version_dir(record["version"]) / DATA).read_text())
    assert [deleted.sha256, deleted.label] in listed["train"]
    assert [relabelled.sha256, relabelled.label] in listed["test"]
    assert record["dataset"]["label_counts"] == {"blue": 12, "red": 12}
    assert store.find(deleted.sha256) is None
    assert store.find(relabelled.sha256).label == new_label  # type: ignore[union-attr]
    assert check_dataset_integrity(tmp_path) == {i.sha256: i.label for i in store.items()}
    assert store.snapshot_ids() == []
    assert new_since_last_job(store, jobs) == 2


@pytest.mark.slow
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
            view = jobs.view(started[0])
            progress = (tmp_path / "jobs" / f"{started[0]}.progress.json")
            checkpoints = list((tmp_path / "runs" / started[0]).glob("checkpoint_*"))
            # Kill only once checkpoints are committed: a kill before the first one rightly
            # restarts at epoch 0.
            if len(view["metrics"]) >= 3 and len(checkpoints) >= 2 and progress.exists():
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
    # both attempts' placements are kept; the second resumed from the checkpoint
    assert len(result["attempts"]) == 2
    assert result["attempts"][0]["resumed_from_epoch"] is None
    assert result["attempts"][1]["resumed_from_epoch"] == result["resumed_from_epoch"]


@pytest.mark.slow
def test_a_second_job_on_the_same_volume_is_refused(tmp_path: Path) -> None:
    _fill(tmp_path)
    lock = JobStore(tmp_path).acquire()
    try:
        with pytest.raises(JobRunning):
            run_job(tmp_path, _cfg())
    finally:
        lock.release()
    assert DatasetStore(tmp_path).snapshot_ids() == []


@pytest.mark.slow
def test_feature_cache_runs_the_backbone_only_on_new_images(tmp_path: Path,
                                                            ray_cluster: None) -> None:
    """Features are cached for what the workers see: the train and validation splits (the
    held-out test split is evaluated once, at the gate)."""
    _fill(tmp_path, per_label=10)
    cfg = _cfg(epochs=3, augment=False, workers=2, lr=0.1)
    first = run_job(tmp_path, cfg)
    assert first["status"] == "succeeded", first
    feature_dirs = list((tmp_path / "cache" / "features").iterdir())
    assert len(feature_dirs) == 1
    cached = {p.name: p.stat().st_mtime_ns for p in feature_dirs[0].iterdir()}
    seen = first["dataset"]["train_count"] + first["dataset"]["val_count"]
    assert len(cached) == seen == 20 - first["dataset"]["test_count"]
    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 2, seed=5):
        store.ingest(data, label)
    second = run_job(tmp_path, cfg)
    assert second["status"] == "succeeded", second
    after = {p.name: p.stat().st_mtime_ns for p in feature_dirs[0].iterdir()}
    assert len(after) == second["dataset"]["train_count"] + second["dataset"]["val_count"]
    assert len(after) > len(cached)
    assert all(after[name] == mtime for name, mtime in cached.items())  # none recomputed
    assert first["metrics"][-1]["val_accuracy"] >= 0.5


# -- what crosses into the workers, and the job store (no Ray) -----------------------------------

def test_loop_config_pickles_with_one_resolved_backbone(tmp_path: Path) -> None:
    """Ray pickles the loop config to every worker: it must round-trip whole."""
    _fill(tmp_path, per_label=10)
    data = prepare_data(DatasetStore(tmp_path))
    jobs = JobStore(tmp_path)
    job_id = jobs.create({"epochs": 2}, "test")["job_id"]
    cfg = _cfg(backbone="auto")
    choice = BackboneChoice(LITE0, weights_origin(LITE0), "test")
    loop = loop_config(tmp_path, jobs, job_id, cfg, choice, data)

    assert loop.train_config.backbone == LITE0 and cfg.backbone == "auto"
    assert loop.classes == ("blue", "red")
    assert [s.sha256 for s in loop.train_samples] == [i.sha256 for i in data.train]
    assert [loop.classes[s.label] for s in loop.val_samples] == [i.label for i in data.val]
    assert data.test and not {i.sha256 for i in data.test} & {
        s.sha256 for s in loop.train_samples + loop.val_samples}  # held out from the workers
    assert all(s.path.is_file() for s in loop.train_samples + loop.val_samples)
    assert loop.cancel_path == jobs.cancel_path(job_id)
    assert loop.progress_path == jobs.progress_path(job_id)
    assert loop.as_train_loop_config() == {LOOP_CONFIG_KEY: loop}

    restored = pickle.loads(pickle.dumps(loop.as_train_loop_config()))[LOOP_CONFIG_KEY]
    assert restored == loop
    assert restored.preset(Image.new("RGB", (80, 80))).shape == (
        3, cfg.image_size, cfg.image_size)
    with pytest.raises(ValueError, match="resolve the backbone"):
        dataclasses.replace(loop, train_config=cfg)


def test_job_store_owns_the_layout_views_progress_and_finishes_jobs(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    root = tmp_path / "jobs"
    record = jobs.create({"epochs": 4}, "test")
    job_id = record["job_id"]
    assert jobs.record_path(job_id) == root / f"{job_id}.json"
    assert jobs.progress_path(job_id) == root / f"{job_id}.progress.json"
    assert jobs.cancel_path(job_id) == root / f"{job_id}.cancel"
    assert jobs.lock_path == root / ".lock"
    assert jobs.schedule_state_path == root / "schedule.state"
    with pytest.raises(JobNotFound):
        jobs.progress_path("../x")

    # Running: the view merges the workers' progress file; list() returns records only.
    jobs.update(job_id, status="running")
    jobs.progress_path(job_id).write_text(json.dumps(
        {"epoch": 2, "epochs": 4, "step": 3, "steps": 5, "fraction": 0.4, "eta_s": 7.5,
         "pid": 1, "resumed_from_epoch": 1, "metrics": [{"epoch": 1}, {"epoch": 2}]}))
    jobs.schedule_state_path.write_text('{"last_tick": 0}')
    view = jobs.view(job_id)
    assert view["progress"] == {"epoch": 2, "epochs": 4, "step": 3, "steps": 5,
                                "fraction": 0.4, "eta_s": 7.5}
    assert view["metrics"] == [{"epoch": 1}, {"epoch": 2}] and view["resumed_from_epoch"] == 1
    assert jobs.get(job_id)["metrics"] == []  # the view does not write
    assert [r["job_id"] for r in jobs.list()] == [job_id]

    # finish: status, reason, error, finished_at and fields; a pending cancel request goes.
    jobs.request_cancel(job_id)
    assert jobs.cancel_requested(job_id)
    done = jobs.finish(job_id, "cancelled", "cancelled on request",
                       metrics=jobs.progress_metrics(job_id))
    assert done["status"] == "cancelled" and done["reason"] == "cancelled on request"
    assert done["error"] is None and done["finished_at"] is not None
    assert done["metrics"] == [{"epoch": 1}, {"epoch": 2}]
    assert not jobs.cancel_requested(job_id)
    assert jobs.view(job_id) == jobs.get(job_id) == done

    # A record left running with the lock free was interrupted.
    stale = jobs.create({"epochs": 1}, "test")["job_id"]
    jobs.update(stale, status="running")
    lock = jobs.acquire()
    try:
        assert jobs.mark_interrupted() == []  # a live job holds the lock
    finally:
        lock.release()
    assert jobs.mark_interrupted() == [stale]
    interrupted = jobs.get(stale)
    assert interrupted["status"] == "failed" and interrupted["reason"] == "interrupted"
    assert interrupted["finished_at"] is not None and "runs/" in interrupted["error"]
