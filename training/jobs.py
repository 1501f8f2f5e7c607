"""Training job records and the job lock, on the volume so they survive restarts and are shared
by the CLI and the service.

    jobs/<job_id>.json         the record (status, progress, metrics, version, promoted, reason)
    jobs/<job_id>.cancel       present when a cancel was asked for; the workers poll it
    jobs/.lock                 held by the process running a job: at most one job per volume

The lock is an OS file lock, so it dies with its holder: a record still `running` whose lock is
free was interrupted (`mark_interrupted`).
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from training.dataset import write_file_atomic
from training.errors import DomainError

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE = ("queued", "running")


class JobRunning(DomainError, RuntimeError):
    """Another training job holds this volume's job lock."""

    code = "job_running"
    status = 409


class JobNotFound(DomainError, LookupError):
    code = "job_not_found"
    status = 404


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def empty_progress(epochs: int) -> dict[str, Any]:
    return {"epoch": 0, "epochs": epochs, "step": 0, "steps": 0, "fraction": 0.0, "eta_s": None}


class JobStore:
    def __init__(self, home: Path | str):
        self.root = Path(home) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.root / ".lock"), timeout=0)

    def path(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise JobNotFound(f"no such training job {job_id!r}")
        return self.root / f"{job_id}.json"

    def create(self, config: dict[str, Any], source: str, job_id: str | None = None
               ) -> dict[str, Any]:
        job_id = job_id or new_job_id()
        record = {
            "job_id": job_id, "status": "queued", "source": source, "config": config,
            "created_at": time.time(), "started_at": None, "finished_at": None,
            "progress": empty_progress(int(config.get("epochs", 0) or 0)), "metrics": [],
            "version": None, "promoted": None, "reason": None, "error": None,
        }
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        write_file_atomic(self.path(record["job_id"]),
                          json.dumps(record, indent=1, default=str).encode())

    def get(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.path(job_id).read_text())
        except FileNotFoundError:
            raise JobNotFound(f"no such training job {job_id!r}") from None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        record = self.get(job_id)
        record.update(fields)
        self.write(record)
        return record

    def list(self) -> list[dict[str, Any]]:
        """All records, newest first."""
        out = []
        for p in self.root.glob("*.json"):
            if p.name.endswith(".progress.json"):
                continue  # a running job's progress file, not a record
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                log.warning("unreadable job record %s", p)
        return sorted(out, key=lambda r: r.get("created_at") or 0, reverse=True)

    def view(self, job_id: str) -> dict[str, Any]:
        """The record with live progress and metrics merged in while the job runs."""
        from training.job import job_view

        return job_view(self, job_id)

    def last(self) -> dict[str, Any] | None:
        jobs = self.list()
        return jobs[0] if jobs else None

    # -- lock, cancel, interruption -------------------------------------------------------------
    def acquire(self) -> FileLock:
        """Take the job lock or raise JobRunning. Release with `.release()`."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise JobRunning("a training job is already running on this volume") from None
        return self.lock

    def is_locked(self) -> bool:
        """True when some process (this one included) holds the job lock."""
        if self.lock.is_locked:
            return True
        probe = FileLock(str(self.root / ".lock"), timeout=0)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False

    def cancel_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.cancel"

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        record = self.get(job_id)
        if record["status"] in ACTIVE:
            self.cancel_path(job_id).touch()
        return record

    def mark_interrupted(self) -> builtins.list[str]:
        """Records left queued/running by a process that died -> failed, reason interrupted.
        Only when nobody holds the job lock (a live CLI job is left alone)."""
        stale = [r for r in self.list() if r.get("status") in ACTIVE]
        if not stale or self.is_locked():
            return []
        for r in stale:
            self.update(r["job_id"], status="failed", reason="interrupted",
                        error="the process running this job stopped before it finished; its "
                              "checkpoints stay in runs/",
                        finished_at=time.time())
            log.warning("job %s was interrupted (marked failed)", r["job_id"])
        return [r["job_id"] for r in stale]
