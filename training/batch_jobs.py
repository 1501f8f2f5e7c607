"""Batch prediction jobs: `predict_dir` (`training.batch`) run for the API, its state on the volume.

A server cannot read its clients' disks, so a job classifies a folder that is already on the
service's volume: a path relative to `<VISIONLOOP_HOME>/inbox/` (made on start or first use;
users copy or mount folders there; in docker compose it is inside the /data volume). A folder
name is refused (400 `invalid_batch_folder`) when it is absolute, has a `..` part, resolves
(symlinks followed) outside inbox/ or to inbox/ itself, or is a file; it is 404
`batch_folder_not_found` when missing. Files under it that are symlinks out of inbox/ are left
out of the job, like hidden files.

Layout (`BatchJobStore` is the only code that knows it):

    batch/<job_id>/job.json               the record (below)
    batch/<job_id>/predictions.jsonl|csv  the output: one whole line per file of the folder
    batch/<job_id>/cancel                 present when a cancel was asked for
    batch/.lock                           held by the process running a job (an OS file lock)
    batch/.start.lock                     held for the moment a job is checked and queued

The record: `job_id`, `status` (queued -> running -> succeeded | failed | cancelled), `folder`
(as given, under inbox/), `format`, `version` (resolved when the job is made, so a resume
answers with the same model), `workers` (null: every CPU of the cluster), `top_k`,
`created_at`, `queued_at` (made or resumed), `started_at`, `finished_at` (epoch seconds),
`progress` {`lines`: whole lines in the output, `files`: files in the folder}, `skipped`
(lines already there when this run started), `predicted` / `errors` / `error_codes` (of the
whole output), `images_per_s` and `elapsed_s` (this run: new lines per second, Ray start-up
and model loads included), `reason`, `error`, `resumes` ([{"at", "after": previous
status}]); `view` and `views` add
`cancel_requested` (the marker's presence on an active job: the marker is the truth, so the
record never needs a second writer while the actor writes its progress).

Decisions:
- One batch job at a time per volume (409 `batch_job_running`, naming it), independent of the
  training job lock: the two share the cluster's CPUs, and Ray queues the actors of whichever
  asks second until CPUs are free (the job stays `running`, its progress at 0, meanwhile).
- The job runs in a detached Ray actor (`launch`; 0 CPUs of its own, the Ray Data actor pool
  takes the CPUs) started by the API replica that took the request: the replica's event loop
  and its request slots are not held, and a redeploy or a replica's death does not end the job.
  The actor holds `batch/.lock` while it works and exits when the job ends.
- All state is in files, so any replica answers for any job, and after a restart: a record
  still `queued` or `running` whose lock nobody holds (and, when `queued`, older than
  `QUEUED_GRACE_S`, the time an actor may take to start) was interrupted; the next read marks
  it `failed`, reason `interrupted` (`cancelled` when a cancel was asked for), counts taken
  from its output. Every failed or cancelled job, and a succeeded one (to pick up files added to
  the folder since), can be resumed: it reruns into the same output, and `predict_dir` skips
  every path that already has a line.
- Cancel writes the marker; the running actor sees it at the next batch (and a watcher thread
  within `CANCEL_GRACE_S` when no batch comes, e.g. while its actors wait for CPUs) and ends the
  job `cancelled`, keeping the whole lines written. A queued job is cancelled at once.
- The output can be read while the job runs: only whole lines are served
  (`training.batch.whole_lines`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from filelock import FileLock, Timeout

from training.batch import (
    DEFAULT_TOP_K,
    BatchReport,
    count_output,
    predict_dir,
)
from training.dataset import write_file_atomic
from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS
from training.jobs import JOB_ID_PATTERN, error_text, new_job_id

log = logging.getLogger(__name__)

INBOX_DIR = "inbox"
BATCH_DIR = "batch"
RECORD_FILE = "job.json"
CANCEL_FILE = "cancel"
LOCK_FILE = ".lock"
START_LOCK_FILE = ".start.lock"
OUTPUT_STEM = "predictions"
FORMATS = ("jsonl", "csv")
ACTIVE = ("queued", "running")
BatchFormat = Literal["jsonl", "csv"]

# A queued job's actor has this long to take the batch lock before the job counts as lost.
QUEUED_GRACE_S = 120.0
# After a cancel, how long the running actor waits for its run to stop by itself before it
# writes the end and exits.
CANCEL_GRACE_S = 30.0
PROGRESS_EVERY_S = 1.0
LOCK_WAIT_S = 30.0
START_LOCK_WAIT_S = 10.0
ACTOR_NAMESPACE = "visionloop"


class InvalidBatchFolder(DomainError, ValueError):
    code = "invalid_batch_folder"
    status = 400


class BatchFolderNotFound(DomainError, LookupError):
    code = "batch_folder_not_found"
    status = 404


class BatchJobNotFound(DomainError, LookupError):
    code = "batch_job_not_found"
    status = 404


class BatchJobRunning(DomainError, RuntimeError):
    """Another batch job is queued or running on this volume; the message names it."""

    code = "batch_job_running"
    status = 409


class BatchUnavailable(DomainError, RuntimeError):
    code = "batch_unavailable"
    status = 503


class BatchCancelled(Exception):
    """Raised inside a run to stop it when its cancel marker appears."""


# -- the folder --------------------------------------------------------------------------------

def inbox_dir(home: Path | str) -> Path:
    """`<home>/inbox`, made when missing."""
    inbox = Path(home) / INBOX_DIR
    inbox.mkdir(parents=True, exist_ok=True)
    return inbox


def resolve_inbox_folder(home: Path | str, folder: str) -> Path:
    """A folder name relative to inbox/ -> its real path (see the module docstring). Raises
    InvalidBatchFolder (400) or BatchFolderNotFound (404)."""
    shown = folder[:200]
    if not folder or not folder.strip() or "\0" in folder:
        raise InvalidBatchFolder("name a folder under inbox/ (e.g. 'shipment-42')")
    pure = PurePosixPath(folder)
    if pure.is_absolute():
        raise InvalidBatchFolder(f"folder {shown!r} is absolute; name it relative to the "
                                 f"volume's {INBOX_DIR}/ folder")
    if ".." in pure.parts:
        raise InvalidBatchFolder(f"folder {shown!r} has a '..' part; it must stay inside "
                                 f"{INBOX_DIR}/")
    inbox = inbox_dir(home).resolve()
    try:
        path = (inbox / pure).resolve()
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, one the filesystem cannot encode
        raise InvalidBatchFolder(f"folder {shown!r} cannot be a folder name here: "
                                 f"{type(exc).__name__}") from None
    if path == inbox:
        raise InvalidBatchFolder(f"name a folder inside {INBOX_DIR}/, not {INBOX_DIR}/ itself")
    if not path.is_relative_to(inbox):
        raise InvalidBatchFolder(f"folder {shown!r} leads out of {INBOX_DIR}/ (a symlink); "
                                 f"copy or mount the folder into {INBOX_DIR}/")
    if not exists:
        raise BatchFolderNotFound(f"no folder {shown!r} in {INBOX_DIR}/ on the volume; copy "
                                  f"or mount it to <VISIONLOOP_HOME>/{INBOX_DIR}/{shown}")
    if not is_dir:
        raise InvalidBatchFolder(f"{INBOX_DIR}/{shown} is a file, not a folder")
    return path


# -- the records -------------------------------------------------------------------------------

class BatchJobStore:
    """The batch jobs of one volume: records, output paths, cancel markers, the lock."""

    def __init__(self, home: Path | str):
        self.home = Path(home).resolve()
        self.root = self.home / BATCH_DIR

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise BatchJobNotFound(f"no such batch job {job_id[:64]!r}")
        return self.root / job_id

    def record_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RECORD_FILE

    def cancel_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / CANCEL_FILE

    def output_path(self, record: dict[str, Any]) -> Path:
        return self.job_dir(record["job_id"]) / f"{OUTPUT_STEM}.{record['format']}"

    @property
    def lock_path(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / LOCK_FILE

    def start_lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / START_LOCK_FILE), timeout=START_LOCK_WAIT_S)

    def write(self, record: dict[str, Any]) -> None:
        write_file_atomic(self.record_path(record["job_id"]),
                          json.dumps(record, indent=1, default=str).encode())

    def get(self, job_id: str) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads(self.record_path(job_id).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise BatchJobNotFound(f"no such batch job {job_id[:64]!r}") from None
        return record

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        record = self.get(job_id)
        record.update(fields)
        self.write(record)
        return record

    def list(self) -> list[dict[str, Any]]:
        """Every record, newest first (unreadable ones left out)."""
        out = []
        for p in self.root.glob(f"*/{RECORD_FILE}"):
            try:
                record = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("unreadable batch job record %s", p)
                continue
            if isinstance(record, dict) and "job_id" in record and "status" in record:
                out.append(record)
        return sorted(out, key=lambda r: (r.get("created_at") or 0, r["job_id"]), reverse=True)

    def is_locked(self) -> bool:
        """True when some process holds the batch lock (a job is running)."""
        probe = FileLock(str(self.lock_path), timeout=0)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False

    def cancel_requested(self, job_id: str) -> bool:
        return self.cancel_path(job_id).exists()

    def finish(self, job_id: str, status: str, reason: str, error: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """End a job: its status, why, the error if any, `finished_at`, and the counts of its
        output as it is on disk (whole lines)."""
        record = self.get(job_id)
        counts = count_output(self.output_path(record), record["format"])
        progress = {**(record.get("progress") or {}), **(fields.pop("progress", None) or {}),
                    "lines": counts.lines}
        record.update(status=status, reason=reason, error=error, finished_at=time.time(),
                      progress=progress, predicted=counts.predicted, errors=counts.errors,
                      error_codes=counts.error_codes, **fields)
        self.write(record)
        self.cancel_path(job_id).unlink(missing_ok=True)
        return record

    # -- interruption, creation, resume, cancel -------------------------------------------------
    def mark_interrupted(self, now: float | None = None) -> builtins.list[str]:
        """Records left queued/running by an actor that is gone -> `failed`, reason
        `interrupted` (or `cancelled` when a cancel was asked for). Only while nobody holds
        the batch lock; a queued record younger than QUEUED_GRACE_S is left (its actor may be
        starting). -> their ids."""
        now = time.time() if now is None else now
        stale = [r for r in self.list() if r["status"] in ACTIVE and not (
            r["status"] == "queued"
            and now - float(r.get("queued_at") or r.get("created_at") or 0) < QUEUED_GRACE_S)]
        if not stale or self.is_locked():
            return []
        for r in stale:
            job_id = r["job_id"]
            if self.cancel_requested(job_id):
                self.finish(job_id, "cancelled", "cancelled on request")
                continue
            self.finish(job_id, "failed", "interrupted",
                        error="the process running this job stopped before it finished; "
                              f"resume it with `POST /v1/predict-dir/{job_id}/resume` (the "
                              "lines written are kept)")
            log.warning("batch job %s was interrupted (marked failed; it can be resumed)",
                        job_id)
        return [r["job_id"] for r in stale]

    def with_cancel(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with `cancel_requested`."""
        return {**record, "cancel_requested": record["status"] in ACTIVE
                and self.cancel_requested(record["job_id"])}

    def view(self, job_id: str) -> dict[str, Any]:
        """The record (with `cancel_requested`), after marking it if it was interrupted."""
        record = self.get(job_id)
        if record["status"] in ACTIVE and self.mark_interrupted():
            record = self.get(job_id)
        return self.with_cancel(record)

    def views(self, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """Every record (with `cancel_requested`), newest first, interrupted ones marked."""
        self.mark_interrupted()
        return [self.with_cancel(r) for r in self.list()[:limit]]

    def running_error(self) -> BatchJobRunning | None:
        """The refusal naming the queued or running job, or None when there is none."""
        self.mark_interrupted()
        active = [r for r in self.list() if r["status"] in ACTIVE]
        if not active:
            return None
        r = active[0]
        p = r.get("progress") or {}
        return BatchJobRunning(
            f"batch job {r['job_id']} is {r['status']} (folder {r['folder']!r}, "
            f"{p.get('lines', 0)}/{p.get('files', '?')} files); one batch job runs at a time: "
            f"wait, or cancel it with `DELETE /v1/predict-dir/{r['job_id']}`")

    def create(self, folder: str, fmt: str, version: str, workers: int | None,
               top_k: int = DEFAULT_TOP_K, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> dict[str, Any]:
        """A `queued` record, unless a job is active (BatchJobRunning, 409). The caller has
        checked the folder and resolved the version."""
        if fmt not in FORMATS:
            raise InvalidBatchFolder(f"format {fmt!r}: expected one of {', '.join(FORMATS)}",
                                     code="invalid_batch_request")
        with self.start_lock():
            refusal = self.running_error()
            if refusal is not None:
                raise refusal
            now = time.time()
            record: dict[str, Any] = {
                "job_id": new_job_id(), "status": "queued", "folder": folder, "format": fmt,
                "version": version, "workers": workers, "top_k": top_k,
                "max_pixels": max_pixels, "created_at": now, "queued_at": now,
                "started_at": None, "finished_at": None,
                "progress": {"lines": 0, "files": None}, "skipped": 0, "predicted": 0,
                "errors": 0, "error_codes": {}, "images_per_s": None, "elapsed_s": None,
                "reason": None, "error": None, "resumes": []}
            self.job_dir(record["job_id"]).mkdir(parents=True)
            self.write(record)
        return record

    def begin_resume(self, job_id: str) -> dict[str, Any]:
        """Put a finished job back to `queued` for a rerun into its output. Raises
        BatchJobNotFound (404), BatchJobRunning (409: this job or another is active)."""
        with self.start_lock():
            record = self.get(job_id)
            refusal = self.running_error()
            if refusal is not None:
                raise refusal
            record = self.get(job_id)
            self.cancel_path(job_id).unlink(missing_ok=True)
            now = time.time()
            resumes = [*record.get("resumes", []), {"at": now, "after": record["status"]}]
            record.update(status="queued", queued_at=now, finished_at=None, reason=None,
                          error=None, resumes=resumes)
            self.write(record)
        return record

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        """Ask an active job to stop: a queued one whose actor has not started is cancelled
        at once; a running one at its next batch. A finished job is answered as it is."""
        with self.start_lock():
            record = self.view(job_id)
            if record["status"] not in ACTIVE:
                return record
            self.cancel_path(job_id).touch()
            if record["status"] == "queued" and not self.is_locked():
                return self.finish(job_id, "cancelled", "cancelled on request")
            return self.with_cancel(self.get(job_id))


# -- the run -----------------------------------------------------------------------------------

class _Run:
    """One run of a job inside the actor: progress writes, the cancel watcher, one end."""

    def __init__(self, store: BatchJobStore, job_id: str, hard_exit: Callable[[], None]):
        self.store, self.job_id, self.hard_exit = store, job_id, hard_exit
        self.mutex = threading.Lock()
        self.ended = False
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self.lines = 0
        self.skipped = 0
        self.files: int | None = None
        self.last_write = 0.0

    def check_cancel(self) -> None:
        if self.cancel.is_set() or self.store.cancel_requested(self.job_id):
            self.cancel.set()
            raise BatchCancelled

    def on_start(self, report: BatchReport) -> None:
        self.lines, self.skipped, self.files = report.skipped, report.skipped, report.files
        self._progress(force=True, skipped=report.skipped)
        self.check_cancel()

    def on_batch(self, n: int) -> None:
        self.lines += n
        self._progress()
        self.check_cancel()

    def _progress(self, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_EVERY_S:
            return
        with self.mutex:
            if self.ended:
                return
            self.store.update(self.job_id, progress={"lines": self.lines, "files": self.files},
                              **fields)
            self.last_write = now

    def end(self, status: str, reason: str, error: str | None = None, **fields: Any) -> bool:
        with self.mutex:
            if self.ended:
                return False
            self.ended = True
            self.store.finish(self.job_id, status, reason, error,
                              progress={"lines": self.lines, "files": self.files}, **fields)
            return True

    def watch(self) -> None:
        """Poll the cancel marker; when the run has not stopped CANCEL_GRACE_S after it
        appeared (no batch came to notice it), end the job here and exit the process."""
        while not self.finished.wait(0.5):
            if self.store.cancel_requested(self.job_id):
                self.cancel.set()
                if self.finished.wait(CANCEL_GRACE_S):
                    return
                if self.end("cancelled", "cancelled on request"):
                    log.warning("batch job %s: cancelled while no batch came; exiting",
                                self.job_id)
                    self.hard_exit()
                return


def run_batch_job(home: Path | str, job_id: str,
                  hard_exit: Callable[[], None] = lambda: os._exit(0)) -> dict[str, Any]:
    """Run one queued job to its end (plain Python; the actor of `launch` calls it): take the
    batch lock, `predict_dir` into the job's output, write the end. -> the final record.
    `hard_exit`: how the cancel watcher ends this process when the run does not stop."""
    store = BatchJobStore(home)
    lock = FileLock(str(store.lock_path))
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        return store.finish(job_id, "failed", "batch_job_running",
                            error="another batch job held the volume's batch lock")
    try:
        with store.start_lock():  # against a cancel of the queued job in between
            record = store.get(job_id)
            if record["status"] != "queued":
                return record
            if store.cancel_requested(job_id):
                return store.finish(job_id, "cancelled", "cancelled on request")
            record = store.update(job_id, status="running", started_at=time.time())
        run = _Run(store, job_id, hard_exit)
        watcher = threading.Thread(target=run.watch, name=f"batch-cancel-{job_id}",
                                   daemon=True)
        watcher.start()
        start = time.perf_counter()
        try:
            folder = resolve_inbox_folder(store.home, record["folder"])
            report = predict_dir(
                store.home, folder, store.output_path(record), version=record["version"],
                workers=record.get("workers"), top_k=int(record.get("top_k") or DEFAULT_TOP_K),
                max_pixels=int(record.get("max_pixels") or DEFAULT_MAX_PIXELS),
                progress=False, on_start=run.on_start, on_batch=run.on_batch,
                confine=inbox_dir(store.home))
            log.info("batch job %s: %s", job_id, report.summary())
            status, reason, error = "succeeded", "done", None
        except BatchCancelled:
            status, reason, error = "cancelled", "cancelled on request", None
        except Exception as exc:
            log.exception("batch job %s failed", job_id)
            status, reason, error = "failed", getattr(exc, "code", "error"), error_text(exc)
        finally:
            run.finished.set()
        elapsed = time.perf_counter() - start
        new = run.lines - run.skipped
        run.end(status, reason, error, elapsed_s=round(elapsed, 3),
                images_per_s=round(new / elapsed, 3) if elapsed > 0 else None)
        log.info("batch job %s: %s", job_id, status)
        return store.get(job_id)
    finally:
        lock.release()


# -- the Ray seam ------------------------------------------------------------------------------

class BatchJobActor:
    """The detached actor of one run: runs the job, then exits."""

    def run(self, home: str, job_id: str) -> None:
        import ray

        try:
            run_batch_job(home, job_id)
        finally:
            ray.actor.exit_actor()


def launch(home: Path | str, record: dict[str, Any]) -> None:
    """Start the run of a queued job in a detached Ray actor and return at once. The caller
    must be connected to the cluster (an API replica is); else BatchUnavailable (503) and the
    job is marked failed."""
    import ray

    job_id = record["job_id"]
    store = BatchJobStore(home)
    try:
        if not ray.is_initialized():
            raise BatchUnavailable("batch jobs run on the Ray cluster, and this process is not "
                                   "connected to one")
        actor = ray.remote(num_cpus=0, max_restarts=0)(BatchJobActor).options(
            name=f"visionloop-batch-{job_id}-{len(record.get('resumes') or [])}",
            namespace=ACTOR_NAMESPACE, lifetime="detached")
        handle: Any = actor.remote()
        handle.run.remote(str(store.home), job_id)
    except Exception as exc:
        store.finish(job_id, "failed", "launch", error=error_text(exc))
        raise
