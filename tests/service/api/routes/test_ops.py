"""/healthz, /readyz, /metrics: open, what they say, and what a flood of them costs: concurrent
callers share one fan-out to the replicas, and for VISIONLOOP_OPS_CACHE_S after it they get its
answer without another (counted on the real in-process classifier client)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.clients import InProcessClassifier
from service.api.metrics import Metrics
from service.api.routes.ops import OpsCache
from service.classifier import Classifier
from tests.service.api.conftest import Api, MakeApi, files
from tests.support.http import assert_error
from tests.support.images import image_bytes
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    # No reuse after a fan-out ends: each call below sees what happened before it.
    return make_api(predict_token="predict-token-123", ops_cache_s=0)


def test_open_endpoints(api: Api) -> None:
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json() == {"status": "ready", "model_versions": ["v0"]}
    assert "visionloop_requests_total" in c.get("/metrics").text


def test_metrics_after_traffic(api: Api) -> None:
    c = api.client
    r = c.post("/v1/predict", files=files(("a.png", image_bytes())), headers=api.headers())
    assert r.status_code == 200
    text = c.get("/metrics").text
    assert 'visionloop_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'visionloop_predictions_total{version="v0"} 1.0' in text
    assert 'visionloop_model_info{version="v0"} 1.0' in text
    assert "visionloop_inference_batch_size_count 1.0" in text
    assert "visionloop_model_reload_failures 0.0" in text


def test_unknown_path_and_method(api: Api) -> None:
    assert_error(api.client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(api.client.put("/healthz"), 405, "method_not_allowed")


class CountingClassifier(InProcessClassifier):
    """The real in-process classifier client, counting the fan-outs it is asked for. While
    `gate` is clear each fan-out waits for it (so that a test can have every caller arrive
    first); while `broken` is set, they fail as an unreachable replica would."""

    def __init__(self, classifier: Classifier, metrics: Metrics):
        super().__init__(classifier, metrics)
        self.calls: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.broken = False

    async def _fan_out(self, name: str) -> None:
        self.calls[name] += 1
        await asyncio.to_thread(self.gate.wait, 60)
        if self.broken:
            raise ConnectionError("replica unreachable")

    async def statuses(self) -> list[dict[str, Any]]:
        await self._fan_out("statuses")
        return await super().statuses()

    async def replica_metrics(self) -> list[str]:
        await self._fan_out("replica_metrics")
        return await super().replica_metrics()


def counting(api: Api) -> CountingClassifier:
    app: FastAPI = api.client.app  # type: ignore[assignment]
    client: CountingClassifier = app.state.services.classifier
    return client


def ops_cache(app: Any) -> OpsCache | None:
    return getattr(app.state, "ops_cache", None)


N = 24


@pytest.mark.parametrize("path,cache_name,fan_outs", [
    ("/readyz", "statuses", {"statuses": 1}),
    ("/metrics", "metrics", {"statuses": 1, "replica_metrics": 1}),
])
def test_concurrent_calls_share_one_fan_out(make_api: MakeApi, path: str, cache_name: str,
                                            fan_outs: dict[str, int]) -> None:
    api = make_api(client_type=CountingClassifier, ops_cache_s=60)
    clf = counting(api)
    clf.gate.clear()
    with TestClient(api.client.app) as tc, ThreadPoolExecutor(N) as pool:
        answers = [pool.submit(tc.get, path) for _ in range(N)]

        def all_waiting() -> bool:
            cache = ops_cache(tc.app)
            return cache is not None and getattr(cache, cache_name).waiting == N

        wait_for(all_waiting, timeout=60, interval=0.05, what=f"{N} callers of {path}")
        clf.gate.set()
        bodies = {r.result().text for r in answers}
        assert all(r.result().status_code == 200 for r in answers)
        assert len(bodies) == 1  # one answer for all
        assert dict(clf.calls) == fan_outs
        # and for the next minute, more calls cost no fan-out at all
        for _ in range(N):
            assert tc.get(path).text in bodies
        assert dict(clf.calls) == fan_outs


def test_without_reuse_each_call_fans_out_and_failures_are_503(make_api: MakeApi) -> None:
    api = make_api(client_type=CountingClassifier, ops_cache_s=0)
    c, clf = api.client, counting(api)
    for _ in range(3):
        assert c.get("/readyz").status_code == 200
    assert clf.calls["statuses"] == 3
    clf.broken = True
    body = assert_error(c.get("/readyz"), 503, "not_ready")
    assert "replica unreachable" in body["error"]["message"]
    # /metrics still answers with this replica's own figures
    assert "visionloop_requests_total" in c.get("/metrics").text
    clf.broken = False
    assert c.get("/readyz").json()["model_versions"] == ["v0"]
