"""Drift end to end on the real app (TestClient, a real Classifier): a version (v0's ImageNet
weights republished, so its answers depend on the image) whose reference was recorded on one
kind of image, live traffic of the same kind (a low score), then of another
kind (the score rises past the threshold), in GET /v1/models/{v} and /metrics."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_api
from service.api.clients import InProcessClassifier, InProcessController
from service.api.metrics import Metrics
from service.app import prepare_home
from service.classifier import Classifier, Prediction
from service.controller import TrainingController
from service.security import ensure_api_token
from service.settings import load_settings
from tests.service.api.conftest import files
from tests.support.images import noisy_image
from tests.support.service import BACKBONE
from training.calibration import reference
from training.registry import Registry

RED, BLUE = (220, 40, 30), (20, 40, 230)


def publish_v0_with(registry: Registry, ref: dict[str, Any]) -> str:
    """v0's weights and classes published again with a `reference` record. -> its name."""
    v0 = registry.load("v0", engine="eager")
    version, staging = registry.allocate()
    manifest: dict[str, Any] = {
        "backbone": v0.manifest["backbone"], "classes": v0.classes,
        "preprocessing": v0.manifest["preprocessing"], "parent": "v0",
        "created_at": time.time(), "metrics": None, "promotion": {"promoted": True},
        "reference": ref}
    registry.publish(version, staging, v0.model.state_dict(), manifest)
    return version


@pytest.fixture(scope="module")
def api(v0_volume: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[TestClient, dict[str, str], str]]:
    home = tmp_path_factory.mktemp("drift-home")
    shutil.copytree(v0_volume / "models", home / "models")
    settings, _ = prepare_home(load_settings(home=home, backbone=BACKBONE, drift_window=60,
                                             drift_min_predictions=30))
    token, _ = ensure_api_token(settings.home, settings.api_token)
    registry = Registry(home)
    # The reference as publish records it: v0's answers on "held-out" red images.
    clf = Classifier(home, threads=1)
    answers = [a for a in clf.predict_bytes([(noisy_image(s, RED), 1) for s in range(60)],
                                            version="v0") if isinstance(a, Prediction)]
    assert len(answers) == 60
    classes = registry.manifest("v0")["classes"]
    ref = reference(classes, [classes.index(a.label) for a in answers],
                    [a.score for a in answers])
    version = publish_v0_with(registry, ref)
    registry.activate(version, True, "test")
    metrics = Metrics(settings)
    classifier = Classifier(home, threads=1)
    classifier.sync()
    controller = TrainingController(settings)
    app = create_api(settings, token, InProcessClassifier(classifier, metrics),
                     InProcessController(controller), metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {token}"}, version
    controller.stop()


def send(client: TestClient, headers: dict[str, str], colour: tuple[int, int, int],
         seeds: range) -> None:
    for start in range(seeds.start, seeds.stop, 10):
        batch = [(f"{s}.png", noisy_image(s, colour)) for s in range(start,
                                                                     min(start + 10, seeds.stop))]
        r = client.post("/v1/predict", files=files(*batch), headers=headers)
        assert r.status_code == 200, r.text


def test_drift_score_rises_when_the_input_changes(api: Any) -> None:
    client, headers, version = api
    v0 = client.get("/v1/models/v0", headers=headers).json()
    assert v0["drift"] is None  # published without a reference
    send(client, headers, RED, range(1000, 1010))
    few = client.get(f"/v1/models/{version}", headers=headers).json()["drift"]
    assert few["count"] == 10 and few["score"] is None and few["drifted"] is None

    send(client, headers, RED, range(1010, 1060))  # more of the same kind: 60 in the window
    same = client.get(f"/v1/models/{version}", headers=headers).json()["drift"]
    send(client, headers, BLUE, range(2000, 2060))  # the window is now all blue
    other = client.get(f"/v1/models/{version}", headers=headers).json()["drift"]
    top = {k: v for k, v in other["live"]["label_shares"].items() if v}
    print(f"\ndrift (PSI, threshold {same['threshold']}): same kind of input "
          f"{same['score']:.4f} (labels {same['label_psi']:.4f}, confidence "
          f"{same['confidence_psi']:.4f}); another kind {other['score']:.4f} (labels "
          f"{other['label_psi']:.4f}, confidence {other['confidence_psi']:.4f}); live labels "
          f"of the other kind {top}")
    assert same["count"] == other["count"] == 60 and same["window"] == 60
    assert not same["drifted"] and same["score"] < 0.25
    assert other["drifted"] and other["score"] > 0.25 and other["score"] > 3 * same["score"]
    text = client.get("/metrics", headers=headers).text
    assert f'visionloop_drift_score{{part="max",version="{version}"}} ' in text
    assert f'visionloop_drift_live_answers{{version="{version}"}} 60.0' in text
    assert "visionloop_drift_threshold 0.25" in text
    assert f'visionloop_prediction_score_count{{version="{version}"}} 120.0' in text
