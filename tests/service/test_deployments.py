"""The API on Ray Serve, for what only Serve does: the HTTP proxy to the API replica, predict
through `@serve.batch` (an image refused by the decoder in the batch fails alone), readiness
and /metrics as broadcasts, and the controller's refusals crossing its deployment handle as
exceptions with their status and code. Route behaviour itself is tested without Serve in
tests/service/api/."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.http import assert_error
from tests.support.images import image_bytes, noisy_image
from tests.support.service import RunningService, start_service
from tests.support.versions import publish_version
from training.registry import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield start_service(tmp_path_factory.mktemp("deployments-home"))


def test_predict_through_serve(svc: RunningService) -> None:
    good = noisy_image(1, (200, 20, 20))
    truncated = noisy_image(2, (20, 20, 200), size=200)[:400]  # header fine, decode fails
    with svc.client(token=None) as c:
        r = c.post("/v1/predict", files=[("files", ("a.png", good)), ("files", ("b.png", good))])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v0" and r.headers["x-model-version"] == "v0"
        assert [p["filename"] for p in body["predictions"]] == ["a.png", "b.png"]
        body = assert_error(c.post("/v1/predict", files=[("files", ("t.png", truncated))]),
                            400, "invalid_image")
        assert body["error"]["message"].startswith("t.png: ")


def test_controller_refusals_cross_the_handle(svc: RunningService) -> None:
    with svc.client() as c:
        body = assert_error(c.post("/v1/train", json={"epochs": 1}), 400, "dataset_too_small")
        assert "Traceback" not in body["error"]["message"]
        assert_error(c.post("/v1/train", json={"epochs": 0}), 400, "invalid_train_request")
        body = assert_error(c.delete("/v1/train/nope"), 404, "job_not_found")
        assert body["error"]["message"] == "no such training job 'nope'"


def test_readiness_and_metrics_broadcast(svc: RunningService) -> None:
    with svc.client(token=None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["model_versions"] == ["v0"]
        assert c.post("/v1/predict", files=[("files", ("a.png", image_bytes()))]
                      ).status_code == 200
    text = httpx.get(f"{svc.url}/metrics").text
    assert 'visionloop_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'visionloop_model_info{version="v0"} 1.0' in text
    assert "visionloop_inference_batch_size_count" in text
    assert "visionloop_model_reload_failures 0.0" in text


def test_predict_a_named_version_through_serve(svc: RunningService) -> None:
    """`?version=v1` through the Serve proxy: the API replica loads v1 itself (one hop: no
    deployment but the ingress holds a model) and answers with it, through the same batching
    path; the served model and CURRENT stay v0; an unknown version is 404 with its code."""
    v1 = publish_version(Registry(svc.home), ["blue", "red"])
    image = noisy_image(4, (20, 200, 20))
    with svc.client(token=None) as c:
        r = c.post("/v1/predict", params={"version": v1},
                   files=[("files", ("a.png", image)), ("files", ("b.png", image))])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == v1 and r.headers["x-model-version"] == v1
        assert all({t["label"] for t in p["top_k"]} == {"blue", "red"}
                   for p in body["predictions"])
        assert c.post("/v1/predict", files=[("files", ("a.png", image))]
                      ).json()["model_version"] == "v0"
        assert_error(c.post("/v1/predict", params={"version": "v99"},
                            files=[("files", ("a.png", image))]), 404, "version_not_found")
        assert c.get("/readyz").json()["model_versions"] == ["v0"]
    assert Registry(svc.home).current() == "v0"


def test_trial_through_serve(svc: RunningService) -> None:
    """`PUT /v1/models/trial` broadcasts to every replica before it answers: a canary at share
    1.0 answers every request that names no version, through the same `@serve.batch`; DELETE
    ends it everywhere. /metrics carries the quality collector of the replica's volume."""
    trial = publish_version(Registry(svc.home), ["blue", "red"])
    image = noisy_image(5, (200, 200, 20))
    with svc.client() as c:
        r = c.put("/v1/models/trial", json={"version": trial, "mode": "canary", "share": 1.0})
        assert r.status_code == 200, r.text
        assert r.json()["replicas"] == [trial]
        r = c.post("/v1/predict", files=[("files", ("a.png", image))])
        assert r.status_code == 200 and r.json()["model_version"] == trial
        listed = c.get("/v1/models").json()
        assert listed["current"] == "v0" and listed["trial"]["answers"] == 1
        assert c.delete("/v1/models/trial").json()["version"] == trial
        assert c.get("/v1/models").json()["trial"] is None
        assert c.post("/v1/predict", files=[("files", ("a.png", image))]
                      ).json()["model_version"] == "v0"
    assert "visionloop_drift_threshold 0.25" in httpx.get(f"{svc.url}/metrics").text
