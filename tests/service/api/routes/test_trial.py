"""Shadow and canary through the API (TestClient, a real Classifier in this process):
`PUT /v1/models/trial` and its refusals, the trial in `GET /v1/models` with agreement and
feedback accuracy, canary answers naming their version, and `DELETE` ending it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.service.api.conftest import MakeApi, files
from tests.support.http import assert_error
from tests.support.images import noisy_image
from tests.support.service import BACKBONE
from training.model import build_model
from training.presets import EvalPreset
from training.registry import Registry

CLASSES = ["blue", "red"]


def publish_seeded(registry: Registry, seed: int) -> str:
    """A version with the weights `torch.manual_seed(seed)` gives (same seed: same answers)."""
    torch.manual_seed(seed)
    model = build_model(BACKBONE, num_classes=len(CLASSES), pretrained=False)
    version, staging = registry.allocate()
    registry.publish(version, staging, model.state_dict(), {
        "backbone": BACKBONE, "classes": CLASSES,
        "preprocessing": EvalPreset.for_size(64).to_dict(), "parent": registry.current(),
        "created_at": 0.0, "metrics": None, "promotion": {"promoted": True}})
    return version


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Any:
    api = make_api()
    registry = Registry(api.home)
    current, twin, other = (publish_seeded(registry, s) for s in (0, 0, 1))
    r = api.client.post(f"/v1/models/{current}/activate", headers=api.headers())
    assert r.status_code == 200, r.text
    return api, current, twin, other


def predict(api: Any, seeds: range) -> list[dict[str, Any]]:
    r = api.client.post("/v1/predict", params={"min_score": 0},
                        files=files(*[(f"{s}.png", noisy_image(s, (s % 255, 90, 40)))
                                      for s in seeds]), headers=api.headers())
    assert r.status_code == 200, r.text
    return [{**p, "model_version": r.json()["model_version"]} for p in r.json()["predictions"]]


def test_shadow_agreement_and_feedback_accuracy(api: Any) -> None:
    api, current, twin, _ = api
    r = api.client.put("/v1/models/trial", json={"version": twin, "mode": "shadow",
                                                 "share": 1.0}, headers=api.headers())
    assert r.status_code == 200, r.text
    assert r.json()["version"] == twin and r.json()["replicas"] == [twin]
    answered = predict(api, range(0, 12))
    assert {p["model_version"] for p in answered} == {current}  # the shadow answers nothing
    for p in answered[:6]:  # feedback: the served answer was right
        r = api.client.post("/v1/feedback", json={"prediction_id": p["prediction_id"],
                                                  "label": p["label"]}, headers=api.headers())
        assert r.status_code == 200, r.text
    trial = api.client.get("/v1/models", headers=api.headers()).json()["trial"]
    print(f"\nshadow twin of {current}: {trial['answers']} answers, agreement "
          f"{trial['agreement']}, feedback {trial['feedback']}")
    assert trial["mode"] == "shadow" and trial["answers"] == 12
    assert trial["agreement"] == 1.0  # the same weights agree on every image
    assert trial["feedback"] == {"count": 6, "trial_accuracy": 1.0, "current_count": 6,
                                 "current_accuracy": 1.0}
    assert api.client.get("/v1/models/trial", headers=api.headers()).json()["answers"] == 12
    metrics = api.client.get("/metrics", headers=api.headers()).text
    assert f'visionloop_shadow_answers_total{{version="{twin}"}} 12.0' in metrics
    assert f'visionloop_shadow_agreements_total{{version="{twin}"}} 12.0' in metrics


def test_canary_answers_name_their_version_and_delete_ends_it(api: Any) -> None:
    api, current, _, other = api
    r = api.client.put("/v1/models/trial", json={"version": other, "mode": "canary",
                                                 "share": 1.0}, headers=api.headers())
    assert r.status_code == 200, r.text
    assert r.json()["answers"] == 0  # figures count from the moment it was set
    answered = predict(api, range(100, 104))
    assert {p["model_version"] for p in answered} == {other}
    trial = api.client.get("/v1/models", headers=api.headers()).json()["trial"]
    assert trial["version"] == other and trial["answers"] == 4 and trial["agreement"] is None
    r = api.client.delete("/v1/models/trial", headers=api.headers())
    assert r.status_code == 200 and r.json()["version"] == other
    assert api.client.get("/v1/models", headers=api.headers()).json()["trial"] is None
    assert {p["model_version"] for p in predict(api, range(200, 204))} == {current}
    r = api.client.delete("/v1/models/trial", headers=api.headers())
    assert r.status_code == 200 and r.json() is None


def test_promotion_by_hand_ends_the_trial(api: Any) -> None:
    api, current, twin, _ = api
    api.client.put("/v1/models/trial", json={"version": twin, "mode": "canary",
                                             "share": 0.5}, headers=api.headers())
    r = api.client.post(f"/v1/models/{twin}/activate", headers=api.headers())
    assert r.status_code == 200, r.text
    assert api.client.get("/v1/models", headers=api.headers()).json()["trial"] is None
    api.client.post(f"/v1/models/{current}/activate", headers=api.headers())


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"version": "v1", "mode": "blue-green", "share": 0.1}, 400, "bad_request"),
    ({"version": "v1", "mode": "canary", "share": 0}, 400, "bad_request"),
    ({"version": "v1", "mode": "canary", "share": 1.5}, 400, "bad_request"),
    ({"version": "v1", "mode": "canary"}, 400, "bad_request"),
    ({"version": "v1", "mode": "canary", "share": 0.1, "extra": 1}, 400, "bad_request"),
    ({"version": "v99", "mode": "canary", "share": 0.1}, 404, "version_not_found"),
    ({"version": "../v0", "mode": "shadow", "share": 0.1}, 404, "version_not_found"),
])
def test_bad_trials_refused(api: Any, body: dict[str, Any], status: int, code: str) -> None:
    api, *_ = api
    assert_error(api.client.put("/v1/models/trial", json=body, headers=api.headers()),
                 status, code)
    assert api.client.get("/v1/models", headers=api.headers()).json()["trial"] is None


def test_current_version_is_no_trial(api: Any) -> None:
    api, current, *_ = api
    r = api.client.put("/v1/models/trial", json={"version": current, "mode": "shadow",
                                                 "share": 0.5}, headers=api.headers())
    assert_error(r, 400, "invalid_trial")
    assert_error(api.client.put("/v1/models/trial", json={"version": current, "mode": "shadow",
                                                          "share": 0.5}), 401)
