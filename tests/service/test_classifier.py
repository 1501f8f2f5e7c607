"""The plain Classifier (no Ray): predictions, every image mode, the checked hot swap, and a
broken version that keeps the old one serving. Also the prediction store and the schedule's
persisted tick."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from service.classifier import Classifier, ModelNotLoaded
from service.controller import TrainingController
from service.predictions import PredictionNotFound, PredictionStore, new_prediction_id
from service.settings import SettingsError, load_settings
from tests.conftest import BACKBONE, IMAGE_MODES, image_bytes, noisy_image
from training.dataset import DatasetStore
from training.model import build_model
from training.presets import EvalPreset
from training.registry import Registry


def publish(registry: Registry, classes: list[str], crop: int = 64) -> str:
    """A small trained-looking version (random head) with `classes`, as training would."""
    model = build_model(BACKBONE, num_classes=len(classes), pretrained=False)
    version, staging = registry.allocate()
    manifest = {"backbone": BACKBONE, "classes": classes,
                "preprocessing": EvalPreset.for_size(crop).to_dict(), "parent": registry.current(),
                "created_at": time.time(), "metrics": None,
                "promotion": {"promoted": True, "reason": "test"}}
    registry.publish(version, staging, model.state_dict(), manifest)
    return version


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    assert Registry(home).ensure_v0(BACKBONE) == "v0"
    return home


def test_no_model_until_current(tmp_path: Path) -> None:
    clf = Classifier(tmp_path)
    assert clf.sync() is None
    with pytest.raises(ModelNotLoaded):
        clf.predict([Image.new("RGB", (32, 32))])
    assert clf.predict_bytes([]) == []


def test_v0_answers_imagenet_top_k(home: Path) -> None:
    clf = Classifier(home, threads=1)
    assert clf.sync() == "v0"
    preds = clf.predict([Image.new("RGB", (80, 60), (200, 30, 30))] * 3, top_k=[1, 5, 2000])
    assert [len(p.top_k) for p in preds] == [1, 5, 1000]  # capped at the number of classes
    assert all(p.version == "v0" for p in preds)
    scores = [s for _, s in preds[1].top_k]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert preds[1].label == preds[1].top_k[0][0]


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (90, 40), (20, 200, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("data", [*IMAGE_MODES.values(), exif_rotated_jpeg()],
                         ids=[*IMAGE_MODES.keys(), "exif-rotated"])
def test_every_mode_is_classified(home: Path, data: bytes) -> None:
    clf = Classifier(home)
    clf.sync()
    [result] = clf.predict_bytes([(data, 3)])
    assert result["version"] == "v0" and len(result["top_k"]) == 3


def test_exif_rotation_is_applied(home: Path) -> None:
    clf = Classifier(home)
    assert clf.decode(exif_rotated_jpeg()).size == (40, 90)


def test_bad_bytes_fail_alone(home: Path) -> None:
    clf = Classifier(home)
    clf.sync()
    truncated = image_bytes((1, 2, 3), "PNG", size=(200, 200))[:120]
    results = clf.predict_bytes([(truncated, 1), (image_bytes(), 1), (b"GIF89a....", 1)])
    assert results[0]["error"]["status"] == 400
    assert results[1]["batch_size"] == 1 and results[1]["version"] == "v0"
    assert results[2]["error"]["status"] == 415


def test_hot_swap_checks_then_swaps_and_broken_version_keeps_old(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0(BACKBONE)
    clf = Classifier(tmp_path)
    assert clf.sync() == "v0"
    v1 = publish(registry, ["blue", "red"])
    registry.set_current(v1)

    # A request that started on v0 finishes on v0 while the swap happens.
    old = clf.loaded
    assert clf.sync() == v1
    assert old.version == "v0" and clf.version == v1
    [p] = clf.predict([Image.new("RGB", (64, 64))])
    assert p.version == v1 and {label for label, _ in p.top_k} == {"blue", "red"}

    v2 = publish(registry, ["a", "b", "c"])
    (registry.version_dir(v2) / "model.safetensors").write_bytes(b"not weights")
    registry.set_current(v2)
    assert clf.sync() == v1  # the old one keeps serving
    assert clf.reload_failures == 1 and v2 in (clf.last_error or "")
    assert clf.sync() == v1 and clf.reload_failures == 1  # not retried every poll
    assert clf.sync(force=True) == v1 and clf.reload_failures == 2
    registry.set_current(v1)  # CURRENT back on what is served: the failure is no longer news
    assert clf.sync() == v1 and clf.status()["failed_version"] is None
    assert clf.reload_failures == 2  # the count stays (metrics)


def test_concurrent_predictions_during_swaps(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0(BACKBONE)
    v1 = publish(registry, ["x", "y"])
    clf = Classifier(tmp_path)
    clf.sync()
    errors: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                versions.add(clf.predict([Image.new("RGB", (64, 64))])[0].version)
            except BaseException as exc:
                errors.append(exc)

    t = threading.Thread(target=client)
    t.start()
    for v in ["v1", "v0", "v1"]:
        registry.set_current(v)
        clf.sync()
    stop.set()
    t.join()
    assert not errors and versions <= {"v0", v1}


def test_prediction_store_bounded_and_review(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, keep=3, max_age_s=3600)
    ids = []
    for i, score in enumerate([0.9, 0.2, 0.4, 0.1, 0.3]):
        pid = new_prediction_id()
        store.save(pid, noisy_image(i, (10, 10, 10)), {"model_version": "v0", "label": "x",
                                                       "score": score, "top_k": []})
        ids.append(pid)
    assert [r["score"] for r in store.review(0.5, 10)] == [0.1, 0.2, 0.3, 0.4]
    assert store.prune() == 2
    assert len(store.records()) == 3
    assert store.get(ids[-1]).image_bytes() == noisy_image(4, (10, 10, 10))
    for bad in ["../../etc/passwd", "0" * 32, ""]:
        with pytest.raises(PredictionNotFound):
            store.get(bad)
    assert store.prune(now=time.time() + 7200) == 3


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONLOOP_MAX_FILES", "lots")
    monkeypatch.setenv("VISIONLOOP_RETRAIN_SCHEDULE", "every tuesday")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "VISIONLOOP_MAX_FILES" in str(err.value)
    assert "VISIONLOOP_RETRAIN_SCHEDULE" in str(err.value)
    monkeypatch.setenv("VISIONLOOP_MAX_FILES", "3")
    monkeypatch.setenv("VISIONLOOP_RETRAIN_SCHEDULE", "*/5 * * * * */2")
    assert load_settings().max_files == 3


def test_schedule_tick_is_persisted_and_never_fires_twice(tmp_path: Path) -> None:
    """Ticks without enough new labels start nothing; a restart resumes from the persisted
    tick, so the same tick is not evaluated again."""
    settings = load_settings(home=tmp_path, retrain_schedule="0 * * * *", retrain_min_new=5)
    store = DatasetStore(tmp_path)
    for i in range(3):
        store.ingest(noisy_image(i, (200, 0, 0)), "red")
    t0 = 1_800_000_100.0  # 100 s past an hour; ticks are on the hour
    controller = TrainingController(settings)
    assert controller.tick(t0) is None  # first look: remembers the last due tick, fires nothing
    first = controller._last_tick()
    assert controller.tick(t0 + 10) is None and controller._last_tick() == first
    assert controller.tick(t0 + 3600) is None  # due, but 3 < 5 new images
    second = controller._last_tick()
    assert second is not None and first is not None and second == first + 3600
    restarted = TrainingController(settings)
    assert restarted._last_tick() == second
    assert restarted.tick(t0 + 3610) is None and restarted._last_tick() == second
    assert restarted.jobs.list() == []
