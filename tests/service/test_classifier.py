"""The plain Classifier (no Ray): predictions, every image mode, the checked hot swap, a
broken version that keeps the old one serving, and predictions by a named version (its 404 and
409, the bounded cache of other versions, one forward pass per version in a batch)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.classifier import Classifier, ModelNotLoaded, Prediction
from tests.support.images import IMAGE_MODES, encode, image_bytes
from tests.support.service import BACKBONE
from tests.support.versions import publish_broken_copy
from tests.support.versions import publish_version as publish
from tests.support.waiting import wait_for
from training.imageio import ImageError, decode_image
from training.inference import PROBABILITY_TOLERANCE, draft_size, logits, preprocess_batch
from training.registry import InvalidVersion, Registry, VersionNotFound


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
    return encode(img, "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("data", [*IMAGE_MODES.values(), exif_rotated_jpeg()],
                         ids=[*IMAGE_MODES.keys(), "exif-rotated"])
def test_every_mode_is_classified(home: Path, data: bytes) -> None:
    clf = Classifier(home)
    clf.sync()
    [result] = clf.predict_bytes([(data, 3)])
    assert isinstance(result, Prediction)
    assert result.version == "v0" and len(result.top_k) == 3


def test_the_served_path_is_the_benchmarks_fast_path(home: Path) -> None:
    """What a replica answers is what `benchmarks.pipeline` measures as "served": draft decode
    to the resize, `preprocess_batch`, the version's engine on numpy, softmax; and its scores
    equal eager PyTorch's on the preset's own transform of the same image."""
    clf = Classifier(home, threads=1)
    clf.sync()
    loaded = clf.loaded
    data = [encode(Image.effect_mandelbrot((640, 480), (-2.0, -1.5, 1.0, 1.5), 60 + i)
                   .convert("RGB"), "JPEG") for i in range(3)]
    answers = clf.predict_bytes([(d, 1000) for d in data])
    images = [decode_image(d, draft_size=draft_size(loaded.preset)) for d in data]
    fast = logits(loaded.model, preprocess_batch(images, loaded.preset)).softmax(1)
    eager = Registry(home).load("v0", engine="eager")
    with torch.inference_mode():
        reference = eager.model(torch.stack([eager.preset(i) for i in images])).softmax(1)
    for answer, row, ref in zip(answers, fast, reference, strict=True):
        assert isinstance(answer, Prediction) and answer.batch_size == 3
        scores = dict(answer.top_k)
        assert max(abs(scores[c] - float(p)) for c, p in zip(loaded.classes, row, strict=True)
                   ) < 1e-5
        assert max(abs(scores[c] - float(p)) for c, p in zip(loaded.classes, ref, strict=True)
                   ) <= PROBABILITY_TOLERANCE
        assert answer.label == loaded.classes[int(ref.argmax())]


def test_exif_rotation_is_applied(home: Path) -> None:
    clf = Classifier(home)
    assert clf.decode(exif_rotated_jpeg()).size == (40, 90)


def test_bad_bytes_fail_alone(home: Path) -> None:
    clf = Classifier(home)
    clf.sync()
    truncated = image_bytes((1, 2, 3), "PNG", size=(200, 200))[:120]
    results = clf.predict_bytes([(truncated, 1), (image_bytes(), 1), (b"GIF89a....", 1)])
    assert isinstance(results[0], ImageError) and results[0].status == 400
    assert isinstance(results[1], Prediction)
    assert results[1].batch_size == 1 and results[1].version == "v0"
    assert isinstance(results[2], ImageError) and results[2].status == 415


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
    """A client predicts in a loop while CURRENT swaps v1 -> v0 -> v1: no error, every answer
    names a version that was served, and each swap (CURRENT written, then `sync` loading and
    checking the new model) overlaps at least one prediction: the test fails if no prediction
    ran during the swaps, instead of passing on an idle classifier."""
    registry = Registry(tmp_path)
    registry.ensure_v0(BACKBONE)
    v1 = publish(registry, ["x", "y"])
    clf = Classifier(tmp_path)
    clf.sync()
    errors: list[BaseException] = []
    answers: list[tuple[float, float, str]] = []  # (start, end, version) of each prediction
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                version = clf.predict([Image.new("RGB", (64, 64))])[0].version
            except BaseException as exc:
                errors.append(exc)
                return
            answers.append((t0, time.monotonic(), version))

    t = threading.Thread(target=client)
    t.start()
    try:
        wait_for(lambda: answers, timeout=120, interval=0.01, what="a first prediction")
        swaps: list[tuple[float, float]] = []
        for v in [v1, "v0", v1]:
            started = time.monotonic()
            registry.set_current(v)
            assert clf.sync() == v
            swaps.append((started, time.monotonic()))

            def answered_by_new(version: str = v, swapped: float = swaps[-1][1]) -> bool:
                return any(a[2] == version and a[0] > swapped for a in answers)

            # the client goes on, and is answered by the new version
            wait_for(answered_by_new, timeout=120, interval=0.01, what=f"a prediction by {v}")
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert {version for _, _, version in answers} == {"v0", v1}
    for started, ended in swaps:
        assert any(a_start < ended and a_end > started for a_start, a_end, _ in answers), \
            "no prediction ran during a swap"


@pytest.fixture
def volume(home: Path, tmp_path: Path) -> Path:
    """A volume of its own with the module's v0 (copied: publishing v0 measures engines)."""
    shutil.copytree(home / "models", tmp_path / "models")
    return tmp_path


def test_named_versions_answer_from_a_bounded_cache(volume: Path) -> None:
    """v1..v3 published beside the served v0: each answers for itself when named, at most two
    stay loaded (least recently used out), the served model never changes, and a swap to a
    cached version takes the cached model."""
    registry = Registry(volume)
    v1, v2, v3 = (publish(registry, classes) for classes in (["a", "b"], ["c", "d"], ["e", "f"]))
    clf = Classifier(volume, threads=1)
    clf.sync()
    img = [Image.new("RGB", (64, 64), (10, 200, 10))]
    [p] = clf.predict(img, top_k=2, version=v1)
    assert p.version == v1 and {label for label, _ in p.top_k} == {"a", "b"}
    first = clf.model_for(v1)
    assert clf.model_for(v1) is first  # not loaded again
    assert clf.predict(img, version="v0")[0].version == "v0"  # the served one, by its name
    assert clf.predict(img, version=v2)[0].version == v2
    assert clf.status()["other_versions"] == [v1, v2]
    clf.model_for(v1)  # used: v2 is now the least recently used
    assert clf.predict(img, version=v3)[0].version == v3
    assert clf.status()["other_versions"] == [v1, v3]
    assert clf.version == "v0" and clf.predict(img)[0].version == "v0"
    cached = clf.model_for(v3)
    registry.set_current(v3)
    assert clf.sync() == v3 and clf.loaded is cached  # checked when loaded: no second load
    assert clf.status()["other_versions"] == [v1]


def test_named_versions_that_cannot_answer(volume: Path) -> None:
    """A malformed name or a version not on the volume: VersionNotFound (404); a version whose
    weights fail their checksum: InvalidVersion (409), asked again as often as it is named;
    a version removed from the volume is 404 even while cached. The served model answers
    throughout."""
    registry = Registry(volume)
    clf = Classifier(volume, threads=1)
    clf.sync()
    img = [Image.new("RGB", (64, 64))]
    for name in ("v9", "bogus", "v" + "9" * 400, "../v0", ""):
        with pytest.raises(VersionNotFound) as err:
            clf.predict(img, version=name)
        assert err.value.status == 404 and len(str(err.value)) < 200
    broken = publish_broken_copy(registry)
    for _ in range(2):
        with pytest.raises(InvalidVersion, match="checksum") as bad:
            clf.predict(img, version=broken)
        assert bad.value.status == 409
    v2 = publish(registry, ["x", "y"])
    assert clf.predict(img, version=v2)[0].version == v2
    registry.prune(keep=0)  # removes the broken copy and v2 (neither current nor pinned)
    with pytest.raises(VersionNotFound):
        clf.predict(img, version=v2)
    assert clf.predict(img)[0].version == "v0" and clf.reload_failures == 0


def test_a_batch_runs_one_forward_pass_per_version(volume: Path) -> None:
    """`predict_requests` (what `@serve.batch` hands over): the served model's requests and
    v1's are answered each by its own version, in one pass each; a refused image and an unknown
    version fail only themselves."""
    registry = Registry(volume)
    v1 = publish(registry, ["blue", "red"])
    clf = Classifier(volume, threads=1)
    clf.sync()
    good = image_bytes()
    results = clf.predict_requests([(good, 1, None), (good, 2, v1), (b"GIF89a....", 1, None),
                                    (good, 3, None), (good, 1, "v7"), (good, 1, v1)])
    assert [type(r).__name__ for r in results] == [
        "Prediction", "Prediction", "NotAnImage", "Prediction", "VersionNotFound",
        "Prediction"]
    served = [r for r in results if isinstance(r, Prediction) and r.version == "v0"]
    named = [r for r in results if isinstance(r, Prediction) and r.version == v1]
    assert [len(r.top_k) for r in served] == [1, 3] and {r.batch_size for r in served} == {2}
    assert len(named) == 2 and {r.batch_size for r in named} == {2}
    assert {label for r in named for label, _ in r.top_k} <= {"blue", "red"}
