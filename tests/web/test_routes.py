"""The page's routes over real HTTP (uvicorn on loopback): `/` and its files with their
security headers, caching and name allow-list; the open page configuration; the training
defaults and weights sizes behind the token; and the job event stream (one `job` event per
change of the record, `end` when it finishes, a bounded lifetime, 401/404 before any byte)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.routes.web import ASSET_NAME, WEB_DIR
from tests.support.http import assert_error
from tests.web.conftest import MakeWeb
from tests.web.server import WebService
from training.config import TrainConfig
from training.jobs import JobStore
from training.registry import WEIGHTS


@pytest.fixture(scope="module")
def web(make_web: MakeWeb) -> WebService:
    return make_web()


def test_the_page_and_its_files_carry_the_security_headers(web: WebService) -> None:
    with web.client(token=None) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "set-cookie" not in page.headers
        for path in sorted(WEB_DIR.iterdir()):
            if path.name == "index.html":
                continue
            r = c.get(f"/web/{path.name}")
            assert r.status_code == 200, path.name
            assert r.content == path.read_bytes()
            kind = {".js": "text/javascript", ".css": "text/css"}[path.suffix]
            assert r.headers["content-type"].startswith(kind), path.name
            assert r.headers["cache-control"] == "no-cache"
            again = c.get(f"/web/{path.name}", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
            stale = c.get(f"/web/{path.name}", headers={"If-None-Match": '"other"'})
            assert stale.status_code == 200


@pytest.mark.parametrize("name", ["nope.js", "index.html", "..%2Fapi%2Fmain.py", ".hidden.js",
                                  "APP.JS", "app.js%00.css", "style.css.map",
                                  "x" * 300 + ".js", "%2E%2E%2Fweb.py"])
def test_only_the_pages_own_files_are_served(web: WebService, name: str) -> None:
    with web.client(token=None) as c:
        r = c.get(f"/web/{name}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] in ("not_found", "http_404")
        assert len(r.json()["error"]["message"]) < 120


def test_every_page_file_is_named_for_the_allow_list_and_small() -> None:
    for path in WEB_DIR.iterdir():
        assert path.name == "index.html" or ASSET_NAME.fullmatch(path.name), path.name
        assert path.stat().st_size < 200 * 1024, path.name


def test_the_configuration_is_open_and_the_rest_needs_the_token(web: WebService) -> None:
    with web.client(token=None) as c:
        config = c.get("/web/config").json()
        assert config == {"predict_open": True,
                          "max_upload_bytes": web.settings.max_upload_bytes,
                          "max_files": web.settings.max_files,
                          "max_pixels": web.settings.max_pixels}
        for path in ("/v1/web/train-defaults", "/v1/web/model-sizes",
                     "/v1/train/20261128-101500-a1b2c3/events"):
            assert_error(c.get(path), 401)
    with web.client(token="wrong") as c:
        assert_error(c.get("/v1/web/train-defaults"), 401)
    with web.client() as c:
        body = c.get("/v1/web/train-defaults").json()
        expected = TrainConfig(**web.settings.train_defaults()).model_dump()
        assert body["defaults"] == json.loads(json.dumps(expected))
        assert body["strategies"] == ["feature-extract", "finetune", "partial"]
        sizes = c.get("/v1/web/model-sizes").json()["sizes"]
        assert sizes == {"v0": (web.home / "models" / "v0" / WEIGHTS).stat().st_size}


def read_events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) of a text/event-stream response, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []


def test_events_of_unknown_jobs_are_404_before_the_stream(web: WebService) -> None:
    with web.client() as c:
        assert_error(c.get("/v1/train/20261128-101500-a1b2c3/events"), 404, "job_not_found")
        assert_error(c.get("/v1/train/..%2F..%2Fsecrets/events"), 404)
        assert_error(c.get("/v1/train/" + "x" * 3000 + "/events"), 404, "job_not_found")
        assert_error(c.get("/v1/train/20261128-101500-a1b2c3/events",
                           params={"max_s": 0}), 400)


def test_events_follow_a_job_until_it_ends(web: WebService) -> None:
    """A job run by another process (the CLI's `train`, which holds the volume's job lock):
    its record changes, each change is one event, and `end` closes the stream."""
    jobs = JobStore(web.home)
    lock = jobs.acquire()
    try:
        record = jobs.create({"epochs": 2}, "cli")
        job_id = record["job_id"]
        seen: list[tuple[str, Any]] = []

        def progress() -> None:
            time.sleep(1.0)
            jobs.update(job_id, status="running", started_at=time.time(),
                        progress={"epoch": 1, "epochs": 2, "step": 4, "steps": 8,
                                  "fraction": 0.5, "eta_s": 3.0},
                        metrics=[{"epoch": 1, "train_loss": 0.9, "train_accuracy": 0.5,
                                  "val_loss": 0.8, "val_accuracy": 0.6}])
            time.sleep(1.0)
            jobs.finish(job_id, "succeeded", "not promoted: below the gate", version="v0",
                        promoted=False)

        writer = threading.Thread(target=progress)
        started = time.monotonic()
        writer.start()
        with web.client() as c, c.stream("GET", f"/v1/train/{job_id}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            for event in read_events(r):
                seen.append(event)
        writer.join()
        assert time.monotonic() - started < 15
    finally:
        lock.release()
    kinds = [e for e, _ in seen]
    assert kinds == ["job", "job", "job", "end"], kinds
    assert [d["status"] for _, d in seen[:3]] == ["queued", "running", "succeeded"]
    assert seen[1][1]["progress"]["epoch"] == 1 and seen[1][1]["metrics"][0]["val_accuracy"] == 0.6
    assert seen[2][1]["reason"] == "not promoted: below the gate"
    assert seen[3][1] == {"status": "succeeded"}


def test_a_stream_closes_after_max_s_and_a_finished_job_answers_at_once(
        web: WebService) -> None:
    jobs = JobStore(web.home)
    lock = jobs.acquire()
    try:
        job_id = jobs.create({"epochs": 1}, "cli")["job_id"]
        started = time.monotonic()
        with web.client() as c, c.stream("GET", f"/v1/train/{job_id}/events",
                                         params={"max_s": 1}) as r:
            events = list(read_events(r))
        assert 1 <= time.monotonic() - started < 5
        assert [e for e, _ in events] == ["job"]  # no `end`: the client reconnects
        jobs.finish(job_id, "cancelled", "cancelled on request")
    finally:
        lock.release()
    with web.client() as c, c.stream("GET", f"/v1/train/{job_id}/events") as r:
        events = list(read_events(r))
    assert [(e, d["status"]) for e, d in events] == [("job", "cancelled"), ("end", "cancelled")]


def test_the_page_files_are_package_data() -> None:
    """`pip install .` ships service/web/ (the Docker image installs the package)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml")
                              .read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    assert "web/*" in patterns
