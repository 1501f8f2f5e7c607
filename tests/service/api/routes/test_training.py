"""/v1/train: bad overrides and a too-small dataset are 400 before anything is written, a job
already running is 409, records and live progress read back, cancel. (Jobs that really train
run on Ray: tests/training/test_pipeline.py, tests/service/test_app.py.) A job id that
cannot be one is 404 (every route's path parameters are fuzzed in
tests/service/api/test_deps.py)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.service.api.conftest import Api, MakeApi, files
from tests.support.http import assert_error
from tests.support.images import noisy_image
from training.jobs import JobStore


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api()


def test_training_request_errors(api: Api) -> None:
    c, auth = api.client, api.headers()
    assert_error(c.get("/v1/train/nope", headers=auth), 404, "job_not_found")
    assert_error(c.delete("/v1/train/nope", headers=auth), 404, "job_not_found")
    assert_error(c.post("/v1/train", json={"epochs": 0}, headers=auth), 400,
                 "invalid_train_request")
    assert_error(c.post("/v1/train", json={"no_such_option": 1}, headers=auth), 400)
    assert_error(c.post("/v1/train", json={"backbone": "nonet"}, headers=auth), 400)
    assert_error(c.post("/v1/train", json=[1, 2], headers=auth), 400)
    body = assert_error(c.post("/v1/train", json={"epochs": 1}, headers=auth), 400,
                        "dataset_too_small")
    assert "label" in body["error"]["message"]
    assert c.get("/v1/train", headers=auth).json() == {"jobs": []}
    assert_error(c.get("/v1/train", params={"limit": 0}, headers=auth), 400)


def test_job_running_is_409_and_records_read_back(api: Api) -> None:
    c, auth = api.client, api.headers()
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        r = c.post("/v1/labels", data={"label": label}, headers=auth, files=files(
            *[(f"{i}.png", noisy_image(i, colour)) for i in range(10)]))
        assert r.status_code == 200, r.text
    jobs = JobStore(api.home)
    lock = jobs.acquire()  # another process (the CLI's `train`) holds the volume's job lock
    try:
        assert_error(c.post("/v1/train", json={"epochs": 1}, headers=auth), 409, "job_running")
        record = jobs.create({"epochs": 3}, "cli")
        listed = c.get("/v1/train", headers=auth).json()["jobs"]
        assert [j["job_id"] for j in listed] == [record["job_id"]]
        job = c.get(f"/v1/train/{record['job_id']}", headers=auth).json()
        assert job["status"] == "queued" and job["progress"]["epochs"] == 3
        # cancel while the lock is held elsewhere: asked for, the holder stops it
        r = c.delete(f"/v1/train/{record['job_id']}", headers=auth)
        assert r.status_code == 202 and r.json()["status"] == "queued"
    finally:
        lock.release()
    # nobody runs it any more: cancelled at once
    r = c.delete(f"/v1/train/{record['job_id']}", headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"


@pytest.mark.parametrize("job_id", ["x" * 5000, "a\x00b", "%00", ".lock", "...", "schedule.state",
                                    "20261128-101500-a1b2c3\n", "\u0661\u0662"],
                         ids=["5000 chars", "NUL", "encoded NUL", "lock file", "dots",
                              "schedule state", "newline", "other digits"])
def test_job_ids_that_cannot_exist_are_404(api: Api, job_id: str) -> None:
    """Checked against the job id pattern before any path is built: not found, not a 500 from
    the filesystem (name too long, embedded NUL), and the answer quotes at most 64 characters
    of what was sent."""
    c, auth = api.client, api.headers()
    before = sorted(p.name for p in (api.home / "jobs").iterdir())
    for method in ("GET", "DELETE"):
        r = c.request(method, f"/v1/train/{quote(job_id, safe='')}", headers=auth)
        body = assert_error(r, 404, "job_not_found")
        assert len(body["error"]["message"]) < 120
    assert sorted(p.name for p in (api.home / "jobs").iterdir()) == before  # nothing written
