"""`/v1/predict-dir` without Ray: every refusal before a job is made (no token, folders that are
absolute, escape inbox/ or are missing, an unknown version, a bad body, unknown ids), and what
the volume's records say (a job that holds the slot, one interrupted, a queued cancel, the
output's whole lines). Jobs that run are in test_predict_dir_jobs.py (real Ray)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from tests.service.api.conftest import Api, MakeApi
from tests.support.images import image_bytes
from training.batch_jobs import QUEUED_GRACE_S, BatchJobStore


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    api = make_api()
    shipment = api.home / "inbox" / "shipment-42"
    shipment.mkdir(parents=True)
    (shipment / "a.png").write_bytes(image_bytes())
    (api.home / "inbox" / "loose.png").write_bytes(image_bytes())
    outside = api.home / "elsewhere"
    outside.mkdir()
    (outside / "b.png").write_bytes(image_bytes())
    (api.home / "inbox" / "link-out").symlink_to(outside, target_is_directory=True)
    return api


@pytest.fixture
def jobs(api: Api) -> Iterator[BatchJobStore]:
    """The volume's batch jobs, emptied after the test."""
    store = BatchJobStore(api.home)
    yield store
    for record in store.list():
        for p in sorted(store.job_dir(record["job_id"]).iterdir()):
            p.unlink()
        store.job_dir(record["job_id"]).rmdir()


def _error(resp: object) -> tuple[int, str, str]:
    body = resp.json()  # type: ignore[attr-defined]
    return resp.status_code, body["error"]["code"], body["error"]["message"]  # type: ignore


def test_inbox_is_made_on_first_use(make_api: MakeApi) -> None:
    api = make_api()
    assert not (api.home / "inbox").exists()
    resp = api.client.post("/v1/predict-dir", json={"folder": "x"}, headers=api.headers())
    assert _error(resp)[:2] == (404, "batch_folder_not_found")
    assert (api.home / "inbox").is_dir()


def test_token_required_everywhere(api: Api) -> None:
    calls = [("post", "/v1/predict-dir", {"folder": "shipment-42"}),
             ("get", "/v1/predict-dir", None), ("get", "/v1/predict-dir/x", None),
             ("get", "/v1/predict-dir/x/output", None), ("delete", "/v1/predict-dir/x", None),
             ("post", "/v1/predict-dir/x/resume", None)]
    for method, url, body in calls:
        resp = api.client.request(method, url, json=body)
        assert resp.status_code == 401, (method, url)
        resp = api.client.request(method, url, json=body, headers=api.headers("wrong"))
        assert resp.status_code in (401, 403), (method, url)


@pytest.mark.parametrize(("folder", "status", "code", "says"), [
    ("/etc", 400, "invalid_batch_folder", "absolute"),
    (str(Path("/tmp")), 400, "invalid_batch_folder", "absolute"),
    ("../models", 400, "invalid_batch_folder", "'..'"),
    ("shipment-42/../../models", 400, "invalid_batch_folder", "'..'"),
    ("link-out", 400, "invalid_batch_folder", "symlink"),
    (".", 400, "invalid_batch_folder", "not inbox/ itself"),
    ("loose.png", 400, "invalid_batch_folder", "a file, not a folder"),
    ("nope", 404, "batch_folder_not_found", "inbox/nope"),
    ("a\0b", 400, "invalid_batch_folder", "name a folder"),
    ("a" * 300, 400, "invalid_batch_folder", "cannot be a folder name"),
    ("x\ud800", 400, "bad_request", ""),  # refused as JSON already
    ("", 400, "bad_request", "folder"),
])
def test_folder_refusals(api: Api, jobs: BatchJobStore, folder: str, status: int, code: str,
                         says: str) -> None:
    body = json.dumps({"folder": folder}).encode()  # ASCII: a lone surrogate escaped
    resp = api.client.post("/v1/predict-dir", content=body,
                           headers={**api.headers(), "Content-Type": "application/json"})
    got_status, got_code, message = _error(resp)
    assert (got_status, got_code) == (status, code)
    assert says in message
    assert jobs.list() == []


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"folder": "shipment-42", "version": "v42"}, 404, "version_not_found"),
    ({"folder": "shipment-42", "format": "xml"}, 400, "bad_request"),
    ({"folder": "shipment-42", "workers": 0}, 400, "bad_request"),
    ({"folder": "shipment-42", "out": "/etc/passwd"}, 400, "bad_request"),
    ({}, 400, "bad_request"),
])
def test_body_refusals(api: Api, jobs: BatchJobStore, body: dict, status: int,
                       code: str) -> None:
    resp = api.client.post("/v1/predict-dir", json=body, headers=api.headers())
    assert _error(resp)[:2] == (status, code)
    assert jobs.list() == []


@pytest.mark.parametrize("job_id", ["20261129-000000-abcdef", "...", ".lock", "x" * 5000,
                                    "a%00b"])
def test_unknown_ids(api: Api, job_id: str) -> None:
    for method, suffix in (("get", ""), ("get", "/output"), ("delete", ""),
                           ("post", "/resume")):
        resp = api.client.request(method, f"/v1/predict-dir/{job_id}{suffix}",
                                  headers=api.headers())
        assert _error(resp)[:2] == (404, "batch_job_not_found"), (method, suffix)


def test_without_ray_the_job_fails_and_says_so(api: Api, jobs: BatchJobStore) -> None:
    resp = api.client.post("/v1/predict-dir", json={"folder": "shipment-42"},
                           headers=api.headers())
    assert _error(resp)[:2] == (503, "batch_unavailable")
    [record] = jobs.list()
    assert record["status"] == "failed" and record["reason"] == "launch"
    assert "Ray" in record["error"]


def test_one_job_at_a_time_and_an_interrupted_one_is_marked(api: Api,
                                                            jobs: BatchJobStore) -> None:
    running = jobs.create("shipment-42", "jsonl", "v0", None)
    resp = api.client.post("/v1/predict-dir", json={"folder": "shipment-42"},
                           headers=api.headers())
    status, code, message = _error(resp)
    assert (status, code) == (409, "batch_job_running") and running["job_id"] in message
    resume = api.client.post(f"/v1/predict-dir/{running['job_id']}/resume",
                             headers=api.headers())
    assert _error(resume)[:2] == (409, "batch_job_running")

    # Its actor took the lock and set it running, then died: the next read marks it.
    jobs.update(running["job_id"], status="running", started_at=time.time())
    lock = FileLock(str(jobs.lock_path))
    with lock.acquire(timeout=0):
        view = api.client.get(f"/v1/predict-dir/{running['job_id']}", headers=api.headers())
        assert view.json()["status"] == "running"
    view = api.client.get(f"/v1/predict-dir/{running['job_id']}", headers=api.headers())
    assert (view.json()["status"], view.json()["reason"]) == ("failed", "interrupted")
    assert "resume" in view.json()["error"]

    # A queued one whose actor never started is lost after the grace period.
    lost = jobs.create("shipment-42", "csv", "v0", 1)
    jobs.update(lost["job_id"], queued_at=time.time() - QUEUED_GRACE_S - 1)
    listed = api.client.get("/v1/predict-dir", headers=api.headers()).json()["jobs"]
    assert [(r["job_id"], r["status"]) for r in listed] == [
        (lost["job_id"], "failed"), (running["job_id"], "failed")]


def test_cancel_a_queued_job(api: Api, jobs: BatchJobStore) -> None:
    queued = jobs.create("shipment-42", "jsonl", "v0", None)
    resp = api.client.delete(f"/v1/predict-dir/{queued['job_id']}", headers=api.headers())
    assert resp.status_code == 202
    assert (resp.json()["status"], resp.json()["reason"]) == ("cancelled",
                                                               "cancelled on request")
    assert not jobs.cancel_path(queued["job_id"]).exists()
    again = api.client.delete(f"/v1/predict-dir/{queued['job_id']}", headers=api.headers())
    assert again.status_code == 202 and again.json()["status"] == "cancelled"


def test_output_serves_whole_lines_only(api: Api, jobs: BatchJobStore) -> None:
    record = jobs.create("shipment-42", "jsonl", "v0", None)
    lines = [json.dumps({"path": f"{i}.png", "label": "red", "version": "v0"}) + "\n"
             for i in range(3)]
    jobs.output_path(record).write_text("".join(lines) + '{"path": "3.png", "lab')
    resp = api.client.get(f"/v1/predict-dir/{record['job_id']}/output",
                          headers=api.headers())
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["x-job-status"] == "queued"
    assert resp.text == "".join(lines)


def test_resume_needs_its_folder(api: Api, jobs: BatchJobStore) -> None:
    gone = api.home / "inbox" / "gone"
    gone.mkdir()
    record = jobs.create("gone", "jsonl", "v0", None)
    jobs.finish(record["job_id"], "failed", "interrupted")
    gone.rmdir()
    resp = api.client.post(f"/v1/predict-dir/{record['job_id']}/resume", headers=api.headers())
    assert _error(resp)[:2] == (404, "batch_folder_not_found")
    assert jobs.get(record["job_id"])["status"] == "failed"


def test_cancel_of_a_running_job_is_a_request(api: Api, jobs: BatchJobStore) -> None:
    record = jobs.create("shipment-42", "jsonl", "v0", None)
    jobs.update(record["job_id"], status="running")
    with FileLock(str(jobs.lock_path)).acquire(timeout=0):  # its actor, alive
        resp = api.client.delete(f"/v1/predict-dir/{record['job_id']}", headers=api.headers())
        assert resp.status_code == 202
        assert (resp.json()["status"], resp.json()["cancel_requested"]) == ("running", True)
        assert jobs.cancel_path(record["job_id"]).exists()
    # The actor died before it saw the request: the next read ends the job as cancelled.
    view = api.client.get(f"/v1/predict-dir/{record['job_id']}", headers=api.headers()).json()
    assert (view["status"], view["cancel_requested"]) == ("cancelled", False)
