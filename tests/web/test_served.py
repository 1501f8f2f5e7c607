"""The page through the real deployment: Ray Serve's proxy in front of the API replicas
(`tests.support.service.start_service`). The page and its files arrive with their headers,
and the job event stream is streamed by the proxy, not buffered: each event arrives while
the stream is still open.

Run it under the Ray lock: `flock /tmp/visionloop-ray.lock .venv/bin/pytest tests/web -m slow`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from service.api.routes.web import WEB_DIR
from tests.support.service import RunningService, start_service
from training.jobs import JobStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> RunningService:
    return start_service(Path(tmp_path_factory.mktemp("served-web")))


def test_the_page_through_serve(served: RunningService) -> None:
    with served.client(token=None) as c:
        page = c.get("/")
        assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers[
            "content-security-policy"]
        assert page.content == (WEB_DIR / "index.html").read_bytes()
        app = c.get("/web/app.js")
        assert app.status_code == 200 and app.content == (WEB_DIR / "app.js").read_bytes()
        assert c.get("/web/config").json()["predict_open"] is True


def test_job_events_stream_through_the_serve_proxy(served: RunningService) -> None:
    jobs = JobStore(served.home)
    lock = jobs.acquire()  # as the CLI's `train` would
    try:
        job_id = jobs.create({"epochs": 2}, "cli")["job_id"]
        arrivals: list[tuple[float, str]] = []

        def later() -> None:
            time.sleep(2.0)
            jobs.update(job_id, status="running", progress={"epoch": 1, "epochs": 2})
            time.sleep(2.0)
            jobs.finish(job_id, "cancelled", "cancelled on request")

        writer = threading.Thread(target=later)
        start = time.monotonic()
        writer.start()
        with served.client() as c, c.stream("GET", f"/v1/train/{job_id}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.monotonic() - start,
                                     json.loads(line[5:]).get("status", "")))
        writer.join()
    finally:
        lock.release()
    assert [s for _, s in arrivals] == ["queued", "running", "cancelled", "cancelled"]
    # streamed: the first event came long before the job moved, the second before it ended
    assert arrivals[0][0] < 1.5, arrivals
    assert 1.5 < arrivals[1][0] < 3.9, arrivals
