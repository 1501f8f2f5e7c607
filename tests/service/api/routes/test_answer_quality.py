"""Calibrated scores and `unknown` answers end to end on the real app (TestClient, a real
Classifier in this process): the version's temperature applied to its softmax, its threshold
turning low scores into `unknown` (top-k still given), `min_score` overriding it (400 outside
0..1), unknown answers first in the review queue, and the version's ECE in /metrics."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.api import create_api
from service.api.clients import InProcessClassifier, InProcessController
from service.api.metrics import Metrics
from service.app import prepare_home
from service.classifier import Classifier, temperature, version_threshold
from service.controller import TrainingController
from service.security import ensure_api_token
from service.settings import load_settings
from tests.service.api.conftest import files
from tests.support.http import assert_error
from tests.support.images import noisy_image
from tests.support.service import BACKBONE
from training.model import build_model
from training.presets import EvalPreset
from training.registry import Registry

CLASSES = ["blue", "red"]


def publish_calibrated(registry: Registry, t: float | None, threshold: float | None) -> str:
    """A version with fixed weights (seed 0) and the given calibration temperature and
    threshold records (None: no record, as v0). -> its name."""
    torch.manual_seed(0)
    model = build_model(BACKBONE, num_classes=len(CLASSES), pretrained=False)
    version, staging = registry.allocate()
    manifest: dict[str, Any] = {
        "backbone": BACKBONE, "classes": CLASSES,
        "preprocessing": EvalPreset.for_size(64).to_dict(), "parent": registry.current(),
        "created_at": time.time(), "metrics": None, "promotion": {"promoted": True}}
    if t is not None:
        manifest["calibration"] = {"method": "temperature_scaling", "temperature": t,
                                   "ece_before": 0.3, "ece_after": 0.02, "ece_bins": 15}
    if threshold is not None:
        manifest["threshold"] = {"threshold": threshold, "rule": "test"}
    registry.publish(version, staging, model.state_dict(), manifest)
    return version


@pytest.fixture(scope="module")
def api(v0_volume: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[TestClient, dict[str, str], Registry, dict[str, str]]]:
    home = tmp_path_factory.mktemp("quality-home")
    shutil.copytree(v0_volume / "models", home / "models")
    settings, _ = prepare_home(load_settings(home=home, backbone=BACKBONE))
    token, _ = ensure_api_token(settings.home, settings.api_token)
    registry = Registry(home)
    versions = {"plain": publish_calibrated(registry, None, None),
                "soft": publish_calibrated(registry, 20.0, 0.99)}
    registry.activate(versions["soft"], True, "test")
    metrics = Metrics(settings)
    classifier = Classifier(home, threads=1)
    classifier.sync()
    controller = TrainingController(settings)
    app = create_api(settings, token, InProcessClassifier(classifier, metrics),
                     InProcessController(controller), metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {token}"}, registry, versions
    controller.stop()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_temperature_and_threshold_records() -> None:
    assert temperature({}) == 1.0 and version_threshold({}) == 0.0  # v0: T=1, nothing unknown
    assert temperature({"calibration": {"temperature": 2.5}}) == 2.5
    assert temperature({"calibration": {"temperature": 0}}) == 1.0  # never divide by 0
    assert temperature({"calibration": {"temperature": "x"}}) == 1.0
    assert version_threshold({"threshold": {"threshold": 0.7}}) == 0.7
    assert version_threshold({"threshold": {"threshold": 1.5}}) == 0.0


def test_temperature_divides_the_logits(api: Any) -> None:
    client, headers, _, versions = api
    image = noisy_image(1, (200, 30, 30))
    answers = {}
    for name in ("plain", "soft"):
        r = client.post("/v1/predict", params={"version": versions[name], "min_score": 0},
                        files=files(("a.png", image)), headers=headers)
        assert r.status_code == 200, r.text
        answers[name] = r.json()["predictions"][0]
    plain, soft = answers["plain"], answers["soft"]
    assert plain["label"] == soft["label"]  # the arg-max does not move
    # two classes: the log-odds of the best score are divided by T = 20
    assert logit(soft["score"]) == pytest.approx(logit(plain["score"]) / 20, rel=1e-3,
                                                 abs=1e-5)
    assert not plain["unknown"] and not soft["unknown"] and soft["threshold"] == 0


def test_below_threshold_is_unknown_with_top_k(api: Any) -> None:
    client, headers, _, versions = api
    r = client.post("/v1/predict", params={"top_k": 2}, files=files(("b.png", noisy_image(
        2, (30, 30, 200)))), headers=headers)
    assert r.status_code == 200, r.text
    [p] = r.json()["predictions"]
    assert r.json()["model_version"] == versions["soft"]
    assert p["unknown"] and p["label"] == "unknown" and p["threshold"] == 0.99
    assert p["score"] < 0.99 and {t["label"] for t in p["top_k"]} == set(CLASSES)
    # the request's min_score overrides the version's threshold
    r = client.post("/v1/predict", params={"min_score": 0.0},
                    files=files(("b.png", noisy_image(2, (30, 30, 200)))), headers=headers)
    [p] = r.json()["predictions"]
    assert not p["unknown"] and p["label"] in CLASSES and p["threshold"] == 0.0


@pytest.mark.parametrize("bad", ["-0.1", "1.01", "high", "nan"])
def test_min_score_outside_0_1_is_400(api: Any, bad: str) -> None:
    client, headers, _, _ = api
    r = client.post("/v1/predict", params={"min_score": bad},
                    files=files(("c.png", noisy_image(3, (1, 2, 3)))), headers=headers)
    assert_error(r, 400, "bad_request")


def test_unknown_answers_come_first_in_the_review_queue(api: Any) -> None:
    client, headers, _, versions = api
    known = client.post("/v1/predict", params={"min_score": 0.0, "version": versions["plain"]},
                        files=files(("k.png", noisy_image(4, (9, 9, 9)))), headers=headers)
    unknown = client.post("/v1/predict", files=files(("u.png", noisy_image(5, (7, 7, 7)))),
                          headers=headers)
    known_id = known.json()["predictions"][0]["prediction_id"]
    unknown_id = unknown.json()["predictions"][0]["prediction_id"]
    # with the bar at 1.0 both are queued; the unknown one first, whatever its margin
    items = client.get("/v1/review", params={"below": 1.0, "limit": 1000},
                       headers=headers).json()["items"]
    ids = [i["prediction_id"] for i in items]
    assert unknown_id in ids and known_id in ids
    flags = [i["unknown"] for i in items]
    assert flags == sorted(flags, reverse=True)  # every unknown one before every known one
    assert ids.index(unknown_id) < ids.index(known_id)
    row = items[ids.index(unknown_id)]
    assert row["unknown"] and row["label"] in CLASSES  # the model's own label is kept
    # with the bar at 0 only unknown answers are queued
    items = client.get("/v1/review", params={"below": 0.0}, headers=headers).json()["items"]
    assert items and all(i["unknown"] for i in items)


def test_ece_of_the_served_version_in_metrics(api: Any) -> None:
    client, headers, _, versions = api
    text = client.get("/metrics", headers=headers).text
    v = versions["soft"]
    assert f'visionloop_model_ece{{calibration="before",version="{v}"}} 0.3' in text
    assert f'visionloop_model_ece{{calibration="after",version="{v}"}} 0.02' in text
    assert f'visionloop_model_temperature{{version="{v}"}} 20.0' in text
    assert "visionloop_predictions_unknown_total" in text
