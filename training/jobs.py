"""Training jobs on the volume: the records, their live progress, cancel requests, the job lock
and how a job ends. `JobStore` is the only code that knows the layout of `jobs/`, which the CLI,
the service and the training workers share and which survives restarts:

    jobs/<job_id>.json           the record (status, progress, metrics, version, promoted, reason)
    jobs/<job_id>.progress.json  written by rank 0 while the job runs (`training.loop`); merged
                                 into the record by `view` and, at the end, by the pipeline
    jobs/<job_id>.cancel         present when a cancel was asked for; the workers poll it
    jobs/.lock                   held by the process running a job: at most one job per volume
    jobs/schedule.state          the controller's last schedule tick (JSON, deliberately not
                                 *.json so it is never read as a record)

A record goes queued -> running -> succeeded | failed | cancelled; every end goes through
`JobStore.finish`. The lock is an OS file lock, so it dies with its holder: a record still
`running` whose lock is free was interrupted (`mark_interrupted`: `failed`, reason
`interrupted`, keeping the epochs it finished and where it stood).

A failed, cancelled or interrupted job can be resumed under its own id
(`training.pipeline.resume_job`): `begin_resume` puts the record back to `queued`, keeps the
metrics of the epochs up to the checkpoint it resumes from, sets `resumed_from_epoch`, and
appends one entry to `resumes` (when, by whom, from which epoch, and how the job had ended).
`started_at` stays the first start; `resumed_at` is the last resume.

`stage` says what a job is doing, from its creation on (`queued`, then `preparing data`,
`starting workers` under Ray Train, `computing features`, `training`, `evaluating`,
`publishing`), and `stages` lists each with the time it began (Unix seconds): the pipeline
sets its own (`JobStore.set_stage`), the training code its own in the progress file (`view`
merges them while the job runs, `finish` when it ends; a resume appends its own run of them).

`JobRunning` names the job that holds the lock (`job_running_error`): its id, who started it,
its status and epoch, and how to cancel it.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from training.dataset import write_file_atomic
from training.errors import DomainError

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FinalStatus = Literal["succeeded", "failed", "cancelled"]
ACTIVE = ("queued", "running")
CANCELLED_ON_REQUEST = "cancelled on request"
ERROR_MAX_CHARS = 2000

RECORD_SUFFIX = ".json"
PROGRESS_SUFFIX = ".progress.json"
CANCEL_SUFFIX = ".cancel"
LOCK_FILE = ".lock"
SCHEDULE_STATE_FILE = "schedule.state"
STAGE_QUEUED = "queued"
STAGE_PREPARING = "preparing data"
STAGE_STARTING_WORKERS = "starting workers"
STAGE_FEATURES = "computing features"
STAGE_TRAINING = "training"
STAGE_EVALUATING = "evaluating"
STAGE_PUBLISHING = "publishing"
# The stages the training code reports in the progress file (rank 0), between the pipeline's
# `starting workers` (or `training`, in process) and `evaluating`.
WORKER_STAGES = (STAGE_FEATURES, STAGE_TRAINING)

# What a job id can be (`new_job_id` makes `20261128-101500-a1b2c3`): checked before any path is
# built from one, so an id from a URL (a NUL byte, 10 000 characters, "..") is simply not found.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class JobRunning(DomainError, RuntimeError):
    """Another training job holds this volume's job lock. `job_id`: that job, when its record
    is known (the message names it; `JobStore.job_running_error` builds both)."""

    code = "job_running"
    status = 409

    def __init__(self, *args: Any, job_id: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.job_id = job_id


class JobNotResumable(DomainError, RuntimeError):
    """A job that cannot be resumed (it succeeded, or nothing of it is left to continue
    from); the message says why and what to do instead."""

    code = "job_not_resumable"
    status = 409


class JobNotFound(DomainError, LookupError):
    code = "job_not_found"
    status = 404


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def error_text(exc: BaseException) -> str:
    """`Type: message`, bounded: what a failed record keeps of an exception."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]


def progress_summary(progress: dict[str, Any] | None, epochs: int) -> dict[str, Any]:
    """The API's progress shape from a progress file's contents (or from nothing yet)."""
    p = progress or {}
    return {"epoch": p.get("epoch", 0), "epochs": p.get("epochs", epochs),
            "step": p.get("step", 0), "steps": p.get("steps", 0),
            "fraction": p.get("fraction", 0.0), "eta_s": p.get("eta_s")}


def running_message(record: dict[str, Any] | None) -> str:
    """What a JobRunning says about the job holding the lock: its id, who started it
    (`source`: api, schedule, cli), its status and epoch x/y, and how to cancel it. `record`
    is the job's view (live progress merged), or None when the holder has not written its
    record yet (a `visionloop train` still checking its data)."""
    if record is None:
        return ("a training job is already running on this volume (its record is not written "
                "yet: it is starting); `GET /v1/train` lists it in a moment, and "
                "`DELETE /v1/train/{id}` or `visionloop cancel {id}` cancels it")
    job_id = record["job_id"]
    p = record.get("progress") or {}
    where = f"epoch {p.get('epoch', 0)}/{p.get('epochs', 0)}"
    if record.get("pending") and not (record["pending"] or {}).get("until"):
        where += ", waiting for the cluster's resources"
    resumed = (f", resumed from epoch {record['resumed_from_epoch']}"
               if record.get("resumed_from_epoch") is not None and record.get("resumes") else "")
    return (f"training job {job_id} is already running on this volume (started by "
            f"{record.get('source') or 'unknown'}, {record.get('status')}, {where}{resumed}); "
            f"wait for it to end, or cancel it with `DELETE /v1/train/{job_id}` or "
            f"`visionloop cancel {job_id}`")


def merged_stages(stages: list[dict[str, Any]] | None, progress: dict[str, Any] | None
                  ) -> list[dict[str, Any]]:
    """The record's `stages` with those the training code wrote in the progress file that it
    lacks, in time order."""
    out = list(stages or [])
    seen = {(s.get("stage"), s.get("at")) for s in out}
    out += [s for s in (progress or {}).get("stages") or []
            if (s.get("stage"), s.get("at")) not in seen]
    return sorted(out, key=lambda s: float(s.get("at") or 0))


def placement_of(progress: dict[str, Any] | None) -> dict[str, Any]:
    """`workers` and `attempts` of a progress file (where the job's workers ran), if any."""
    p = progress or {}
    return {k: p[k] for k in ("workers", "attempts") if p.get(k)}


class JobStore:
    def __init__(self, home: Path | str):
        self.root = Path(home) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.lock_path), timeout=0)

    # -- the layout ----------------------------------------------------------------------------
    def _file(self, job_id: str, suffix: str) -> Path:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise JobNotFound(f"no such training job {job_id[:64]!r}")
        return self.root / f"{job_id}{suffix}"

    def record_path(self, job_id: str) -> Path:
        return self._file(job_id, RECORD_SUFFIX)

    def progress_path(self, job_id: str) -> Path:
        return self._file(job_id, PROGRESS_SUFFIX)

    def cancel_path(self, job_id: str) -> Path:
        return self._file(job_id, CANCEL_SUFFIX)

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def schedule_state_path(self) -> Path:
        return self.root / SCHEDULE_STATE_FILE

    # -- records -------------------------------------------------------------------------------
    def create(self, config: dict[str, Any], source: str, job_id: str | None = None
               ) -> dict[str, Any]:
        job_id = job_id or new_job_id()
        record = {
            "job_id": job_id, "status": "queued", "source": source, "config": config,
            "created_at": time.time(), "started_at": None, "finished_at": None,
            "progress": progress_summary(None, int(config.get("epochs", 0) or 0)), "metrics": [],
            "stage": STAGE_QUEUED, "stages": [{"stage": STAGE_QUEUED, "at": time.time()}],
            "version": None, "promoted": None, "reason": None, "error": None,
        }
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        write_file_atomic(self.record_path(record["job_id"]),
                          json.dumps(record, indent=1, default=str).encode())

    def get(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.record_path(job_id).read_text())
        except FileNotFoundError:
            raise JobNotFound(f"no such training job {job_id!r}") from None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        record = self.get(job_id)
        record.update(fields)
        self.write(record)
        return record

    def set_stage(self, job_id: str, stage: str) -> dict[str, Any]:
        """The job is now at `stage`: the record's `stage`, and an entry in `stages` with the
        time it began (the worker stages seen so far are merged in first, so `stages` stays in
        order)."""
        record = self.get(job_id)
        stages = merged_stages(record.get("stages"), self.read_progress(job_id))
        return self.update(job_id, stage=stage,
                           stages=[*stages, {"stage": stage, "at": time.time()}])

    def finish(self, job_id: str, status: FinalStatus, reason: str, error: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """End a job: its final status, why, the error if any, `finished_at`, and `fields`
        (metrics, version, ...). A finished job has nothing left to cancel, so a pending cancel
        request goes. Where its workers ran (`workers`: the last attempt's; `attempts`: every
        attempt's placement and resume epoch) is kept from the progress file. -> the final
        record."""
        progress = self.read_progress(job_id)
        placement = placement_of(progress)
        stages = merged_stages(self.get(job_id).get("stages"), progress)
        record = self.update(job_id, status=status, reason=reason, error=error,
                             finished_at=time.time(), stages=stages, **{**placement, **fields})
        self.cancel_path(job_id).unlink(missing_ok=True)
        return record

    def list(self) -> list[dict[str, Any]]:
        """Every job record, newest first (progress files and unreadable files left out)."""
        out = []
        for p in self.root.glob(f"*{RECORD_SUFFIX}"):
            if p.name.endswith(PROGRESS_SUFFIX):
                continue
            try:
                record = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("unreadable job record %s", p)
                continue
            if isinstance(record, dict) and "job_id" in record and "status" in record:
                out.append(record)
        return sorted(out, key=lambda r: r.get("created_at") or 0, reverse=True)

    def last(self) -> dict[str, Any] | None:
        jobs = self.list()
        return jobs[0] if jobs else None

    # -- live progress -------------------------------------------------------------------------
    def read_progress(self, job_id: str) -> dict[str, Any] | None:
        """The progress file's contents (epoch, step, fraction, eta_s, metrics so far, pid,
        resumed_from_epoch), or None before rank 0 has written one."""
        try:
            return json.loads(self.progress_path(job_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def progress_metrics(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The per-epoch metrics the workers reported so far ([] when none)."""
        return list((self.read_progress(job_id) or {}).get("metrics", []))

    def view(self, job_id: str) -> dict[str, Any]:
        """The record with live progress and metrics merged in while the job runs."""
        record = self.get(job_id)
        if record["status"] == "running":
            p = self.read_progress(job_id)
            if p:
                record["progress"] = progress_summary(p, record["progress"].get("epochs", 0))
                record["metrics"] = p.get("metrics", [])
                record["resumed_from_epoch"] = p.get("resumed_from_epoch")
                record.update(placement_of(p))
                record["stages"] = merged_stages(record.get("stages"), p)
                if p.get("stage") in WORKER_STAGES and \
                        record.get("stage") in (STAGE_PREPARING, STAGE_STARTING_WORKERS):
                    record["stage"] = p["stage"]
        return record

    # -- lock, cancel, interruption -------------------------------------------------------------
    def active(self) -> dict[str, Any] | None:
        """The view of the job that is queued or running, or None. Were several records left
        active (one running, older ones from a process that died and not yet marked), the one
        started or resumed last is the one running."""
        active = [r for r in self.list() if r.get("status") in ACTIVE]
        if not active:
            return None
        newest = max(active, key=lambda r: max(float(r.get("created_at") or 0),
                                               float(r.get("resumed_at") or 0)))
        try:
            return self.view(newest["job_id"])
        except JobNotFound:  # it went between the two reads
            return None

    def job_running_error(self) -> JobRunning:
        """The JobRunning to raise while a job holds the lock: it names that job."""
        record = self.active()
        return JobRunning(running_message(record),
                          job_id=record["job_id"] if record else None)

    def acquire(self) -> FileLock:
        """Take the job lock or raise JobRunning (naming the job that holds it). Release with
        `.release()`."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise self.job_running_error() from None
        return self.lock

    def is_locked(self) -> bool:
        """True when some process (this one included) holds the job lock."""
        if self.lock.is_locked:
            return True
        probe = FileLock(str(self.lock_path), timeout=0)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        record = self.get(job_id)
        if record["status"] in ACTIVE:
            self.cancel_path(job_id).touch()
        return record

    def cancel_requested(self, job_id: str) -> bool:
        return self.cancel_path(job_id).exists()

    def mark_interrupted(self) -> builtins.list[str]:
        """Records left queued/running by a process that died -> failed, reason interrupted,
        keeping what the workers had written: the metrics of the epochs they finished, the
        progress (epoch x/y) where they stopped, `resumed_from_epoch`, and where they ran. Only
        when nobody holds the job lock (a live CLI job is left alone). -> their ids, newest
        first."""
        stale = [r for r in self.list() if r.get("status") in ACTIVE]
        if not stale or self.is_locked():
            return []
        for r in stale:
            job_id = r["job_id"]
            view = self.view(job_id) if r["status"] == "running" else r
            kept = {k: view[k] for k in ("progress", "metrics", "resumed_from_epoch")
                    if view.get(k) is not None}
            if kept.get("progress"):
                kept["progress"] = {**kept["progress"], "eta_s": None}
            self.finish(job_id, "failed", "interrupted",
                        error="the process running this job stopped before it finished; its "
                              "checkpoints stay in runs/ and its dataset snapshot in "
                              f"dataset/.snapshots/: resume it with `POST "
                              f"/v1/train/{job_id}/resume` or `visionloop train --resume "
                              f"{job_id}`", **kept)
            log.warning("job %s was interrupted (marked failed; it can be resumed)", job_id)
        return [r["job_id"] for r in stale]

    def begin_resume(self, job_id: str, source: str, from_epoch: int | None,
                     epochs: int) -> dict[str, Any]:
        """Put a failed, cancelled or interrupted job back to `queued` for a resume from the
        checkpoint of epoch `from_epoch` (None: from the start, on its dataset snapshot) of
        `epochs`. The record keeps the metrics of epochs 1..from_epoch (the checkpoint has
        them too: the workers carry on from there), gets `resumed_from_epoch`, `resumed_at`,
        and one more entry in `resumes` ({"at", "source", "from_epoch", "after": {"status",
        "reason", "error"}}); its end (`finished_at`, reason, error, version, promoted) is
        cleared. The progress file is rewritten the same way (attempts kept), so progress
        reads epoch from_epoch/epochs until the workers report. -> the record."""
        record = self.get(job_id)
        done = from_epoch or 0
        metrics = [m for m in record.get("metrics") or [] if int(m.get("epoch", 0)) <= done]
        now = time.time()
        resumes = [*(record.get("resumes") or []),
                   {"at": now, "source": source, "from_epoch": from_epoch,
                    "after": {k: record.get(k) for k in ("status", "reason", "error")}}]
        progress = {"epoch": done, "epochs": epochs, "step": 0, "steps": 0,
                    "fraction": round(done / max(1, epochs), 4), "eta_s": None}
        old = self.read_progress(job_id) or {}
        old.pop("stage", None)  # the last attempt's: this one reports its own
        write_file_atomic(self.progress_path(job_id), json.dumps(
            {**old, **progress, "metrics": metrics, "resumed_from_epoch": from_epoch,
             "updated_at": now}).encode())
        self.cancel_path(job_id).unlink(missing_ok=True)
        return self.update(job_id, status="queued", resumed_from_epoch=from_epoch,
                           resumed_at=now, resumes=resumes, metrics=metrics,
                           progress=progress, finished_at=None, reason=None, error=None,
                           version=None, promoted=None, pending=None)
