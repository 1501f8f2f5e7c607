"""Resume and the named 409 through the whole service on Ray Serve (the controller behind its
deployment handle, its refusals crossing the handle as themselves), and what the controller
deployment does on start with an interrupted job it cannot resume. (A resume that trains:
tests/training/test_resume.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.http import assert_error
from tests.support.images import labelled_set
from tests.support.service import RunningService, start_service
from training.dataset import DatasetStore
from training.jobs import JobStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    home = tmp_path_factory.mktemp("resume-home")
    store = DatasetStore(home)
    for label, data in labelled_set(["red", "blue"], 16):  # enough to pass the data checks
        store.ingest(data, label)
    jobs = JobStore(home)
    done = jobs.create({"epochs": 2}, "api")["job_id"]
    jobs.finish(done, "succeeded", "promoted", version="v1", promoted=True)
    # left `running` by a process that died before its first checkpoint, its snapshot gone
    stale = jobs.create({"epochs": 3}, "schedule")["job_id"]
    jobs.update(stale, status="running")
    service = start_service(home)  # VISIONLOOP_RESUME_INTERRUPTED: on (the default)
    service.settings.__dict__["_jobs"] = {"done": done, "stale": stale}
    yield service


def test_resume_refusals_and_the_interrupted_job_over_serve(svc: RunningService) -> None:
    ids = svc.settings.__dict__["_jobs"]
    with svc.client() as c:
        assert_error(c.post("/v1/train/nope/resume"), 404, "job_not_found")
        message = assert_error(c.post(f"/v1/train/{ids['done']}/resume"), 409,
                               "job_not_resumable")["error"]["message"]
        assert "succeeded" in message
        stale = c.get(f"/v1/train/{ids['stale']}").json()
        assert (stale["status"], stale["reason"]) == ("failed", "interrupted")
        assert "not resumed on restart" in stale["error"] and "no checkpoint" in stale["error"]
        assert_error(c.post(f"/v1/train/{ids['stale']}/resume"), 409, "job_not_resumable")


def test_job_running_409_names_the_job_over_serve(svc: RunningService) -> None:
    ids = svc.settings.__dict__["_jobs"]
    jobs = JobStore(svc.home)
    lock = jobs.acquire()  # a `visionloop train` on the same volume
    try:
        running = jobs.create({"epochs": 6}, "cli")["job_id"]
        jobs.update(running, status="running")
        jobs.progress_path(running).write_text(json.dumps(
            {"epoch": 3, "epochs": 6, "step": 0, "steps": 4, "fraction": 0.5, "metrics": []}))
        with svc.client() as c:
            for r in (c.post("/v1/train", json={"epochs": 1}),
                      c.post(f"/v1/train/{ids['stale']}/resume")):
                message = assert_error(r, 409, "job_running")["error"]["message"]
                assert f"training job {running} is already running" in message
                assert "started by cli" in message and "epoch 3/6" in message
                assert f"`DELETE /v1/train/{running}`" in message
                assert f"`visionloop cancel {running}`" in message
    finally:
        jobs.finish(running, "cancelled", "cancelled on request")
        lock.release()
