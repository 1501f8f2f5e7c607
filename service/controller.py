"""The training controller: one job at a time per volume, job records, cancel, the schedule,
and retention. Plain Python; `service.deployments.ControllerDeployment` wraps it for Serve.

- `start` validates the overrides (`TrainConfig`, 400; what the request leaves out comes from
  the deployment's training defaults, `Settings.train_defaults()`), the dataset (`prepare_data`,
  400) and what the Ray cluster can hold (`training.resources.check_cluster`, 400
  `insufficient_resources`; not for a job whose epochs run in the controller's process,
  `training.pipeline.runs_in_process`, which asks Ray for nothing) before anything is written,
  refuses with `JobRunning` (409) while this process or any other (the CLI's `train`) holds the
  volume's job lock, writes a `queued` record and runs `training.pipeline.run_job` in a thread
  (the caller is inside the Ray cluster). `run_job` waits for the workers' resources at most
  `VISIONLOOP_TRAIN_PENDING_TIMEOUT_S` (then the job fails, reason `pending`), and a cancel ends
  a job at any stage, pending included; the job lock goes with the job's end.
- The schedule (`VISIONLOOP_RETRAIN_SCHEDULE`, cron; a sixth field is seconds) is evaluated by
  `tick(now)`, a plain function of the time: when a cron time has passed since the last tick
  seen, that tick is persisted first (`jobs/schedule.state`, so a restart never fires the same
  tick twice; a tick missed while the service was down fires once), then a job starts if at
  least `VISIONLOOP_RETRAIN_MIN_NEW` images are new since the last job and none is running;
  that job is `start({})`: the deployment's training defaults (`VISIONLOOP_TRAIN_*`). A job
  the cluster cannot hold is not started (logged); the next tick looks again.
- Resume (`resume(job_id)`, `POST /v1/train/{id}/resume`): a failed, cancelled or interrupted
  job reruns under its id from its last checkpoint with its config and dataset snapshot
  (`training.pipeline.resume_job`; `plan_resume` refuses, before anything is written, with
  404, 409 `job_running` or 409 `job_not_resumable` saying why). On start, a job left
  `queued`/`running` by a process that died is marked `failed`, reason `interrupted`, keeping
  its metrics; with `VISIONLOOP_RESUME_INTERRUPTED` (default true) the newest such job is then
  resumed at once (`resumes[].source` "restart"); one that cannot be resumed stays marked, its
  error saying why. A job the CLI is running (the volume's job lock held) is left alone.
- A refusal because a job runs (`JobRunning`, 409) names that job: id, who started it, status
  and epoch, and how to cancel it (`JobStore.job_running_error`).
- Retention after every job and every minute: model versions beyond `keep_versions` (by
  `run_job`), Ray Train run folders of finished jobs beyond the newest `keep_versions`, and
  predictions beyond their bounds (`PredictionStore.prune`: age, count, bytes).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from croniter import croniter
from pydantic import ValidationError

from service.predictions import PredictionStore
from service.settings import Settings
from training.config import TrainConfig
from training.dataset import DatasetStore, DatasetTooSmall, write_file_atomic
from training.errors import DomainError
from training.jobs import ACTIVE, CANCELLED_ON_REQUEST, JobRunning, JobStore, error_text
from training.resources import InsufficientResources, check_cluster

log = logging.getLogger(__name__)

# How long `resume` waits for the resumed job to be back to `queued` (its lock taken, its
# snapshot opened) before it answers with the record as it is.
RESUME_START_TIMEOUT_S = 60.0
RESUMED_ON_RESTART = "restart"  # `resumes[].source` of a job resumed when the service starts


class InvalidTrainRequest(DomainError, ValueError):
    code = "invalid_train_request"
    status = 400


def new_since_last_job(store: DatasetStore, jobs: JobStore) -> int:
    """Images added or relabelled since the newest job that started training (promoted or not,
    so a rejected candidate does not retrigger the schedule; a job that failed waiting for
    resources has its offset cleared, so its labels still count)."""
    for record in jobs.list():  # newest first; a job that failed before training has none
        offset = record.get("ledger_offset")
        if offset is not None:
            return store.new_since(int(offset))
    return store.new_since(0)


def train_config(overrides: dict[str, Any], defaults: Mapping[str, Any]) -> TrainConfig:
    """Overrides with the CLI's names over the deployment's `defaults`
    (`Settings.train_defaults()`) -> TrainConfig; raises InvalidTrainRequest (400)."""
    try:
        return TrainConfig(**{**defaults, **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidTrainRequest(f"invalid training options: {problems}") from None
    except TypeError as exc:
        raise InvalidTrainRequest(f"invalid training options: {exc}") from None


def _import_pipeline() -> None:
    """Import `training.pipeline` (torch, torchvision, the engine) in the background when the
    controller starts: the import takes seconds on a small machine, and without this the first
    `POST /v1/train` pays it before it answers. A failure is left to that request to raise."""
    try:
        import training.pipeline  # noqa: F401
    except Exception:
        log.debug("background import of training.pipeline failed", exc_info=True)


class TrainingController:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = Path(settings.home).resolve()
        self.store = DatasetStore(self.home, settings.max_pixels)
        self.jobs = JobStore(self.home)
        self.predictions = PredictionStore.from_settings(settings, self.home)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        threading.Thread(target=_import_pipeline, name="import-pipeline", daemon=True).start()
        interrupted = self.jobs.mark_interrupted()
        if interrupted:
            log.warning("marked %d interrupted job(s) failed: %s", len(interrupted), interrupted)
            if settings.resume_interrupted:
                self._resume_interrupted(interrupted[0])

    # -- jobs ----------------------------------------------------------------------------------
    def running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()) or self.jobs.is_locked()

    def start(self, overrides: dict[str, Any], source: str = "api") -> dict[str, Any]:
        """Validate, then start a job in a thread -> its `queued` record. Raises
        InvalidTrainRequest / DatasetTooSmall / InsufficientResources (400) and JobRunning
        (409), each before anything is written."""
        from training.pipeline import prepare_data, runs_in_process

        cfg = train_config(overrides, self.settings.train_defaults())
        prepare_data(self.store)
        if not runs_in_process(cfg):  # one that does asks Ray for nothing
            check_cluster(cfg)
        with self._lock:
            if self.running():
                raise self.jobs.job_running_error()
            record = self.jobs.create(cfg.model_dump(), source)
            self._thread = threading.Thread(target=self._run, args=(cfg, record["job_id"], source),
                                            name=f"job-{record['job_id']}", daemon=True)
            self._thread.start()
        log.info("training job %s started (%s)", record["job_id"], source)
        return record

    def _run(self, cfg: TrainConfig, job_id: str, source: str) -> None:
        from training.pipeline import run_job

        try:
            record = run_job(self.home, cfg, job_id=job_id, source=source,
                             keep_versions=self.settings.keep_versions,
                             pending_timeout_s=self.settings.train_pending_timeout_s)
            log.info("training job %s ended: %s (%s)", job_id, record["status"],
                     record.get("reason"))
        except (JobRunning, DatasetTooSmall) as exc:  # lost a race with the CLI, or data deleted
            self.jobs.finish(job_id, "failed", type(exc).__name__, error=str(exc))
        except Exception as exc:
            log.exception("training job %s crashed", job_id)
            self.jobs.finish(job_id, "failed", "error", error=error_text(exc))
        finally:
            self.prune_runs()

    def resume(self, job_id: str, source: str = "api") -> dict[str, Any]:
        """Resume job `job_id` in a thread (`training.pipeline.resume_job`) -> its record once
        it is back to `queued` (with `resumed_from_epoch` and `resumes`). Raises JobNotFound
        (404), JobRunning (409, naming the running job), JobNotResumable (409, saying why) and
        InsufficientResources (400), each before anything is written."""
        from training.pipeline import plan_resume, runs_in_process

        started = threading.Event()
        box: dict[str, BaseException] = {}
        self.jobs.get(job_id)  # 404 first
        if self.running():
            raise self.jobs.job_running_error()
        plan = plan_resume(self.home, job_id)
        if not runs_in_process(plan.cfg):
            check_cluster(plan.cfg)
        with self._lock:
            if self.running():
                raise self.jobs.job_running_error()
            self._thread = threading.Thread(target=self._resume, name=f"job-{job_id}",
                                            args=(job_id, source, started, box), daemon=True)
            self._thread.start()
        started.wait(RESUME_START_TIMEOUT_S)
        if "error" in box:
            raise box["error"]
        log.info("training job %s resumed (%s) from epoch %s", job_id, source, plan.from_epoch)
        return self.jobs.view(job_id)

    def _resume(self, job_id: str, source: str, started: threading.Event,
                box: dict[str, BaseException]) -> None:
        """The resume thread: an error before the job started goes to `box` (the caller
        raises it; the record is untouched), one after it is logged (the record says it)."""
        from training.pipeline import resume_job

        try:
            record = resume_job(self.home, job_id, source=source,
                                keep_versions=self.settings.keep_versions,
                                on_started=lambda _: started.set(),
                                pending_timeout_s=self.settings.train_pending_timeout_s)
            log.info("resumed training job %s ended: %s (%s)", job_id, record["status"],
                     record.get("reason"))
        except Exception as exc:
            if started.is_set():
                log.exception("resumed training job %s crashed", job_id)
            else:
                box["error"] = exc
        finally:
            started.set()
            self.prune_runs()

    def _resume_interrupted(self, job_id: str) -> None:
        """On start (`VISIONLOOP_RESUME_INTERRUPTED`): resume the job a stop or crash
        interrupted; one that cannot be resumed stays `failed` (interrupted) and its error
        says why it was not."""
        try:
            record = self.resume(job_id, source=RESUMED_ON_RESTART)
        except Exception as exc:  # the service starts all the same; the record says why
            log.warning("interrupted job %s not resumed: %s", job_id, exc)
            error = self.jobs.get(job_id).get("error") or ""
            self.jobs.update(job_id, error=f"{error}; not resumed on restart: {exc}")
            return
        log.warning("interrupted job %s resumed on restart from epoch %s", job_id,
                    record.get("resumed_from_epoch"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop, at any stage: before its workers start (`run_job` looks before
        and while it waits for resources) and while they train (they poll for it); the record
        turns `cancelled` and the job lock is released when `run_job` returns. A queued job
        whose thread is gone is cancelled at once. Raises JobNotFound."""
        record = self.jobs.request_cancel(job_id)
        if record["status"] == "queued" and not self.running():
            record = self.jobs.finish(job_id, "cancelled", CANCELLED_ON_REQUEST)
        return record

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- schedule ------------------------------------------------------------------------------
    def _last_tick(self) -> float | None:
        try:
            return float(json.loads(self.jobs.schedule_state_path.read_text())["last_tick"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_tick(self, tick: float) -> None:
        write_file_atomic(self.jobs.schedule_state_path,
                          json.dumps({"last_tick": tick, "schedule":
                                      self.settings.retrain_schedule}).encode())

    def tick(self, now: float) -> str | None:
        """Evaluate the schedule at time `now` (epoch seconds). -> the job id started, or None."""
        expr = self.settings.retrain_schedule
        if not expr:
            return None
        due = croniter(expr, now).get_prev(float)
        last = self._last_tick()
        if last is None:  # first look at this schedule: start counting from now
            self._save_tick(due)
            return None
        if due <= last:
            return None
        self._save_tick(due)  # before acting: a crash or restart never fires this tick again
        new = new_since_last_job(self.store, self.jobs)
        if new < self.settings.retrain_min_new:
            log.info("schedule: %d new image(s) since the last job, %d needed; not training",
                     new, self.settings.retrain_min_new)
            return None
        if self.running():
            log.info("schedule: a job is running; skipping this tick")
            return None
        try:
            return str(self.start({}, source="schedule")["job_id"])
        except (JobRunning, DatasetTooSmall, InvalidTrainRequest, InsufficientResources) as exc:
            log.warning("schedule: not training: %s", exc)
            return None

    def run_background(self, poll_s: float = 1.0, retention_every_s: float = 60.0) -> None:
        """Tick the schedule every `poll_s` and apply retention every `retention_every_s`, in a
        daemon thread, until `stop()`."""
        def loop() -> None:
            next_retention = 0.0
            while not self._stop.wait(poll_s):
                try:
                    self.tick(time.time())
                    if time.monotonic() >= next_retention:
                        self.predictions.prune()
                        next_retention = time.monotonic() + retention_every_s
                except Exception:
                    log.exception("schedule/retention loop")

        threading.Thread(target=loop, name="schedule", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # -- retention -----------------------------------------------------------------------------
    def prune_runs(self) -> list[str]:
        """Remove `runs/<job_id>` of finished jobs beyond the newest `keep_versions` jobs."""
        runs = self.home / "runs"
        if not runs.is_dir():
            return []
        finished = [r["job_id"] for r in self.jobs.list()
                    if "job_id" in r and r.get("status") not in ACTIVE]
        removed = []
        for job_id in finished[self.settings.keep_versions:]:
            path = runs / job_id
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(job_id)
        if removed:
            log.info("retention: removed %d old training run folder(s): %s", len(removed), removed)
        return removed
