"""The training controller without Ray: the schedule (no tick here starts a job), and what
it does on start with a job a stop or crash interrupted (`VISIONLOOP_RESUME_INTERRUPTED`; a
resume that trains is in tests/training/test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.controller import InvalidTrainRequest, TrainingController, train_config
from service.settings import SettingsError, load_settings
from tests.support.images import labelled_set, noisy_image
from training.config import TrainConfig
from training.dataset import DatasetStore
from training.jobs import JobRunning, JobStore


def test_schedule_tick_is_persisted_and_never_fires_twice(tmp_path: Path) -> None:
    """Ticks without enough new labels start nothing; a restart resumes from the persisted
    tick, so the same tick is not evaluated again."""
    settings = load_settings(home=tmp_path, retrain_schedule="0 * * * *", retrain_min_new=5)
    store = DatasetStore(tmp_path)
    for i in range(3):
        store.ingest(noisy_image(i, (200, 0, 0)), "red")
    t0 = 1_800_000_100.0  # 100 s past an hour; ticks are on the hour
    controller = TrainingController(settings)
    assert controller.tick(t0) is None  # first look: remembers the last due tick, fires nothing
    first = controller._last_tick()
    assert controller.tick(t0 + 10) is None and controller._last_tick() == first
    assert controller.tick(t0 + 3600) is None  # due, but 3 < 5 new images
    second = controller._last_tick()
    assert second is not None and first is not None and second == first + 3600
    restarted = TrainingController(settings)
    assert restarted._last_tick() == second
    assert restarted.tick(t0 + 3610) is None and restarted._last_tick() == second
    assert restarted.jobs.list() == []


def test_a_request_takes_the_deployments_training_defaults(tmp_path: Path) -> None:
    """What the request says wins; what it leaves out comes from the VISIONLOOP_TRAIN_* settings
    (the schedule's `start({})` is all defaults); the rest is TrainConfig's."""
    settings = load_settings(home=tmp_path, backbone="efficientnet_lite0", train_workers=3,
                             train_gpu=True, train_strategy="partial", train_epochs=7,
                             train_batch_size=16)
    bare = train_config({}, settings.train_defaults())
    assert (bare.backbone, bare.workers, bare.gpu, bare.strategy, bare.epochs,
            bare.batch_size) == ("efficientnet_lite0", 3, True, "partial", 7, 16)
    assert bare.lr == TrainConfig().lr
    asked = train_config({"workers": 1, "gpu": False, "epochs": 2}, settings.train_defaults())
    assert (asked.workers, asked.gpu, asked.epochs, asked.strategy) == (1, False, 2, "partial")
    with pytest.raises(InvalidTrainRequest, match="workers"):
        train_config({"workers": 0}, settings.train_defaults())


# -- a job interrupted by a stop or crash ---------------------------------------------------------

def _interrupted_job(home: Path, epochs: int = 4, done: int = 2) -> str:
    """What a process that died mid-job leaves: its record `running`, the workers' progress
    file with `done` epochs' metrics, and the job lock free (it died with its holder)."""
    jobs = JobStore(home)
    job_id = jobs.create({"epochs": epochs, "backbone": "efficientnet_lite0"}, "api")["job_id"]
    jobs.update(job_id, status="running", started_at=123.0)
    jobs.progress_path(job_id).write_text(json.dumps(
        {"epoch": done, "epochs": epochs, "step": 1, "steps": 3, "fraction": 0.55, "eta_s": 9.0,
         "pid": 1, "resumed_from_epoch": None,
         "metrics": [{"epoch": e, "val_accuracy": e / 10} for e in range(1, done + 1)],
         "attempts": [{"workers": [], "resumed_from_epoch": None}]}))
    return job_id


def test_interrupted_job_is_only_marked_with_resume_off(tmp_path: Path) -> None:
    """VISIONLOOP_RESUME_INTERRUPTED=false: marked failed (interrupted), keeping the epochs it
    finished and where it stood; nothing starts."""
    job_id = _interrupted_job(tmp_path)
    controller = TrainingController(load_settings(home=tmp_path, resume_interrupted=False))
    assert not controller.running()
    record = controller.jobs.get(job_id)
    assert (record["status"], record["reason"]) == ("failed", "interrupted")
    assert [m["epoch"] for m in record["metrics"]] == [1, 2]
    assert (record["progress"]["epoch"], record["progress"]["epochs"]) == (2, 4)
    assert record["progress"]["eta_s"] is None and record["started_at"] == 123.0
    assert record["attempts"] == [{"workers": [], "resumed_from_epoch": None}]
    assert f"POST /v1/train/{job_id}/resume" in record["error"]
    assert f"visionloop train --resume {job_id}" in record["error"]
    assert "resumes" not in record
    # a second start finds nothing more to do
    TrainingController(load_settings(home=tmp_path, resume_interrupted=False))
    assert controller.jobs.get(job_id) == record


def test_interrupted_job_that_cannot_be_resumed_stays_marked_saying_why(tmp_path: Path) -> None:
    """With the setting on (the default) a job killed before its first checkpoint, whose
    snapshot is gone, is not resumed: it stays marked and its error says why; the service starts
    all the same. (A resume that trains: tests/training/test_resume.py.)"""
    job_id = _interrupted_job(tmp_path, done=0)
    settings = load_settings(home=tmp_path)
    assert settings.resume_interrupted is True
    controller = TrainingController(settings)
    assert not controller.running()
    record = controller.jobs.get(job_id)
    assert (record["status"], record["reason"]) == ("failed", "interrupted")
    assert "not resumed on restart" in record["error"]
    assert "no checkpoint" in record["error"]
    assert "resumes" not in record


def test_a_job_running_elsewhere_is_not_marked_nor_resumed(tmp_path: Path) -> None:
    """A `visionloop train` holds the job lock: its record is live, whatever the setting."""
    job_id = _interrupted_job(tmp_path)
    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 16):
        store.ingest(data, label)
    jobs = JobStore(tmp_path)
    lock = jobs.acquire()
    try:
        controller = TrainingController(load_settings(home=tmp_path))
        assert controller.jobs.get(job_id)["status"] == "running"
        with pytest.raises(JobRunning, match=f"training job {job_id} is already running"):
            controller.start({})
    finally:
        lock.release()


@pytest.mark.parametrize("value, expected", [("false", False), ("0", False), ("true", True),
                                             ("1", True)])
def test_resume_interrupted_setting_reads_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, expected: bool) -> None:
    monkeypatch.setenv("VISIONLOOP_RESUME_INTERRUPTED", value)
    assert load_settings(home=tmp_path).resume_interrupted is expected


def test_a_bad_resume_interrupted_value_stops_the_start(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONLOOP_RESUME_INTERRUPTED", "sometimes")
    with pytest.raises(SettingsError, match="VISIONLOOP_RESUME_INTERRUPTED"):
        load_settings(home=tmp_path)
