"""/v1/train: bad overrides and a too-small dataset are 400 before anything is written, a job
already running is 409 naming it, records and live progress read back, cancel, and resume's
refusals (a resume that trains runs on Ray: tests/training/test_resume.py). (Jobs that really train
run on Ray: tests/training/test_pipeline.py, tests/service/test_app.py.) A job id that
cannot be one is 404 (every route's path parameters are fuzzed in
tests/service/api/test_deps.py)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.service.api.conftest import Api, MakeApi, files
from tests.support.http import assert_error
from tests.support.images import noisy_image
from training.dataset import DatasetStore
from training.jobs import JobStore
from training.loop import CHECKPOINT_FILE
from training.pipeline import RUN_STATE_FILE, latest_checkpoint_epoch, plan_resume, prepare_data


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


# -- a job already running is named; resume's refusals ------------------------------------------

def _running_job(jobs: JobStore, source: str, epoch: int, epochs: int) -> str:
    """A job another process runs: its record `running` and its workers' progress file."""
    job_id = jobs.create({"epochs": epochs}, source)["job_id"]
    jobs.update(job_id, status="running", started_at=1.0)
    jobs.progress_path(job_id).write_text(json.dumps(
        {"epoch": epoch, "epochs": epochs, "step": 2, "steps": 4, "fraction": 0.3,
         "eta_s": 12.0, "metrics": [{"epoch": e} for e in range(1, epoch + 1)]}))
    return job_id


def test_job_running_409_names_the_job_and_how_to_cancel_it(make_api: MakeApi) -> None:
    api = make_api()
    c, auth = api.client, api.headers()
    _labelled(api)
    jobs = JobStore(api.home)
    failed = jobs.create({"epochs": 2}, "api")["job_id"]
    jobs.finish(failed, "failed", "error", error="boom")
    lock = jobs.acquire()  # the CLI's `visionloop train` holds the volume's job lock
    try:
        body = assert_error(c.post("/v1/train", json={"epochs": 1}, headers=auth), 409,
                            "job_running")
        assert "record is not written yet" in body["error"]["message"]  # it is starting
        running = _running_job(jobs, "cli", epoch=2, epochs=5)
        for r in (c.post("/v1/train", json={"epochs": 1}, headers=auth),
                  c.post(f"/v1/train/{failed}/resume", headers=auth)):
            message = assert_error(r, 409, "job_running")["error"]["message"]
            assert f"training job {running} is already running" in message
            assert "started by cli" in message and "running" in message
            assert "epoch 2/5" in message
            assert f"`DELETE /v1/train/{running}`" in message
            assert f"`visionloop cancel {running}`" in message
        # an unknown id is 404 whatever runs
        assert_error(c.post("/v1/train/nope/resume", headers=auth), 404, "job_not_found")
    finally:
        lock.release()
    assert jobs.get(failed)["status"] == "failed"  # nothing written by the refusals
    jobs.finish(running, "cancelled", "cancelled on request")


def _labelled(api: Api, n: int = 10) -> None:
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        r = api.client.post("/v1/labels", data={"label": label}, headers=api.headers(),
                            files=files(*[(f"{i}.png", noisy_image(i, colour))
                                          for i in range(n)]))
        assert r.status_code == 200, r.text


def _ray_run_state(home: Path, job_id: str, epoch: int) -> None:
    """The run folder Ray Train 2.60 leaves: `checkpoint_manager_snapshot.json` naming the
    latest checkpoint and the metrics reported with it, and that checkpoint's folder (the
    format is checked against a real run in tests/training/test_resume.py)."""
    run = home / "runs" / job_id
    name = f"checkpoint_2026-11-29_10-00-0{epoch}.000000"
    (run / name).mkdir(parents=True)
    (run / name / CHECKPOINT_FILE).write_bytes(b"weights")
    result = {"version": 0, "checkpoint_dir_name": name, "metrics": {"epoch": epoch}}
    (run / RUN_STATE_FILE).write_text(json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": [result],
         "checkpoint_report_indices": [epoch - 1], "latest_checkpoint_result": result,
         "pending_training_results": [], "pending_validation_specs": [],
         "current_report_index": epoch, "validated_checkpoint_dir_names": [],
         "timed_out_validation_checkpoint_dir_names": [],
         "failed_validation_checkpoint_dir_names": []}))


def test_resume_refuses_what_cannot_be_resumed_saying_why(make_api: MakeApi) -> None:
    api = make_api()
    c, auth = api.client, api.headers()
    _labelled(api)
    jobs, store = JobStore(api.home), DatasetStore(api.home)
    config = {"epochs": 3, "backbone": "efficientnet_lite0"}

    done = jobs.create(config, "api")["job_id"]
    jobs.finish(done, "succeeded", "promoted", version="v1", promoted=True)
    message = assert_error(c.post(f"/v1/train/{done}/resume", headers=auth), 409,
                           "job_not_resumable")["error"]["message"]
    assert "succeeded" in message and "v1" in message and "POST /v1/train" in message

    # no checkpoint, no snapshot (it failed waiting for resources: it never trained)
    pending = jobs.create(config, "schedule")["job_id"]
    jobs.finish(pending, "failed", "pending", error="no CPUs")
    message = assert_error(c.post(f"/v1/train/{pending}/resume", headers=auth), 409,
                           "job_not_resumable")["error"]["message"]
    assert "no checkpoint" in message and "snapshot is gone" in message
    assert "failed (pending)" in message

    # a checkpoint, its snapshot removed when it ended, and the dataset changed since
    failed = jobs.create(config, "api")["job_id"]
    jobs.finish(failed, "failed", "error", error="out of retries",
                dataset=prepare_data(store).fingerprint)
    _ray_run_state(api.home, failed, epoch=2)
    assert latest_checkpoint_epoch(api.home / "runs" / failed) == 2
    assert plan_resume(api.home, failed).from_epoch == 2  # resumable as the dataset stands
    store.ingest(noisy_image(99, (30, 200, 30)), "green")
    message = assert_error(c.post(f"/v1/train/{failed}/resume", headers=auth), 409,
                           "job_not_resumable")["error"]["message"]
    assert "dataset has changed" in message and "epoch 2" in message

    # a config that is no longer valid
    odd = jobs.create({"epochs": 0}, "api")["job_id"]
    jobs.finish(odd, "failed", "error")
    assert_error(c.post(f"/v1/train/{odd}/resume", headers=auth), 409, "job_not_resumable")

    for job_id in (done, pending, failed, odd):  # nothing written by the refusals
        assert jobs.get(job_id)["status"] in ("succeeded", "failed")
        assert "resumes" not in jobs.get(job_id)
    assert store.snapshot_ids() == []


def test_job_list_has_what_visionloop_jobs_shows(make_api: MakeApi) -> None:
    """`visionloop jobs` prints id, status, source, started/finished, version, promoted and
    reason from `GET /v1/train`; a running job comes with its live progress."""
    api = make_api()
    jobs = JobStore(api.home)
    old = jobs.create({"epochs": 2}, "schedule")["job_id"]
    jobs.update(old, started_at=100.0)
    jobs.finish(old, "succeeded", "promoted", version="v1", promoted=True)
    lock = jobs.acquire()
    try:
        running = _running_job(jobs, "cli", epoch=1, epochs=4)
        listed = api.client.get("/v1/train", headers=api.headers()).json()["jobs"]
    finally:
        lock.release()
    assert [j["job_id"] for j in listed] == [running, old]
    for j in listed:
        assert {"job_id", "status", "source", "created_at", "started_at", "finished_at",
                "progress", "version", "promoted", "reason"} <= set(j), j
    now, before = listed
    assert (now["status"], now["source"], now["progress"]["epoch"],
            now["progress"]["epochs"]) == ("running", "cli", 1, 4)
    assert (before["status"], before["source"], before["version"], before["promoted"],
            before["reason"], before["started_at"]) == ("succeeded", "schedule", "v1", True,
                                                        "promoted", 100.0)
    assert before["finished_at"] is not None
