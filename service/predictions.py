"""Recent predictions on the volume, kept for feedback and review: an SQLite index and the
images, content-addressed.

    predictions/index.sqlite3 (+ -wal, -shm)   one row per prediction (SQLite, WAL mode)
    predictions/images/<sha256>.<ext>          each distinct image once, as uploaded
    predictions/.tmp/                          image writes in progress

Every API replica process writes here at once (one volume, several processes): SQLite in WAL
mode lets readers (the review queue, feedback lookups) run beside one writer, and a busy timeout
makes writers queue instead of failing. Each write is one `BEGIN IMMEDIATE` transaction, and
the image files change only inside one (renamed into place, or unlinked), so a file and its row
appear and disappear together as far as any other process can see. SQLite over WAL needs every
writer on one host (its shared-memory index is per host): on a volume shared by several hosts
(NFS), keep the API replicas on one of them.

A row is a prediction: its id, time, model version, top-1 label and score, top-k, the
uncertainty measures of its top-k (`margin`, `entropy`; see `uncertainty`), the client's
filename, the sha256 of its image, and its review `state`:

    pending      in the review queue (when scored below the threshold asked for)
    labelled     feedback put its image in the dataset; out of the queue. Feedback may be sent
                 again (to correct a label) until retention removes the row
    dismissed    a reviewer said it needs no label; out of the queue; feedback still accepted
    not_stored   answered but not kept (`NOT_STORED_REASONS`): a small row without an image,
                 so that feedback can say why it is refused

Bounds, applied on every save and by `prune` (the training controller calls it every minute):
at most `keep` rows, `max_bytes` bytes (images plus an estimate of each row's size, so
identical images sent again and again cannot grow the index unbounded either), and nothing
older than `max_age_s`. When over a bound, rows that left the queue go first, then the oldest
pending ones; an image goes with the last row that refers to it. An image larger than
`max_bytes` on its own is not stored. Before storing, the free space of the volume is checked:
below `min_free_bytes` (plus the image) the prediction is answered but not stored, so a flood
of predictions (predict is open by default) cannot take the space that labels and model
versions need. `save` never raises for any of this: it says what it did, and the predict route
counts what was not stored in `/metrics`.

Prediction ids are 32 random hex digits, checked against `ID_PATTERN` before any lookup; no
path is ever made from a client's string (image paths come from the index's sha256 and the
decoder's format).

A volume written by the previous layout (`predictions/<id>.json` beside `<id>.<ext>`) is
migrated when a store opens it: each readable pair becomes a row (same id and time, so feedback
on it keeps working) and its image moves into `images/`; a record without its image, an image
without its record, or an unreadable record is removed. Nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from training.dataset import VolumeFull
from training.errors import DomainError
from training.imageio import ImageError, probe_image

if TYPE_CHECKING:  # service.settings imports the model zoo; the store needs only its values
    from service.settings import Settings

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_LEGACY_FILE = re.compile(r"^([0-9a-f]{32})\.(json|jpg|jpeg|png|webp)$")
_LEGACY_TMP = re.compile(r"^\.[0-9a-f]{32}\.(json|jpg|jpeg|png|webp)\.tmp$")
_IMAGE_FILE = re.compile(r"^([0-9a-f]{64})\.(jpg|png|webp)$")

MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# 2: `predictions.unknown` (answered `unknown`; first in the review queue), added to a version-1
# index by `_create_schema`; the `shadow` table (a shadow version's answer to a prediction).
SCHEMA_VERSION = 2
# What a row costs beyond its variable-length fields (ids, numbers, index entries): an estimate,
# only so that rows count against `max_bytes` at all.
ROW_OVERHEAD_BYTES = 256
MAX_FILENAME_CHARS = 255
# A temporary image older than this belongs to no save still running (a save's temporary file
# lives for the time of one write).
STALE_TMP_S = 3600.0

Kept = Literal["stored", "disabled", "low_space", "too_large", "volume_full", "busy", "error"]
NOT_STORED_REASONS: tuple[Kept, ...] = ("disabled", "low_space", "too_large", "volume_full",
                                        "busy", "error")
ReviewOrder = Literal["margin", "entropy", "score"]

_ORDER_SQL: dict[str, str] = {
    "margin": "margin ASC",
    "entropy": "entropy DESC",
    "score": "score ASC",
}
# Eviction order: rows out of the queue first (reviewed, or never stored), then pending ones,
# oldest first in each.
_EVICTION_SQL = "ORDER BY (state = 'pending') ASC, created_at ASC"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
        sha256 TEXT PRIMARY KEY, ext TEXT NOT NULL, size INTEGER NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS predictions (
        prediction_id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_version TEXT NOT NULL,
        label TEXT NOT NULL, score REAL NOT NULL, margin REAL NOT NULL, entropy REAL NOT NULL,
        top_k TEXT NOT NULL, filename TEXT, sha256 TEXT, state TEXT NOT NULL, reason TEXT,
        reviewed_at REAL, size INTEGER NOT NULL, unknown INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS shadow (
        prediction_id TEXT PRIMARY KEY, version TEXT NOT NULL, label TEXT NOT NULL,
        score REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS shadow_version ON shadow (version)",
    """CREATE TRIGGER IF NOT EXISTS shadow_removed AFTER DELETE ON predictions BEGIN
        DELETE FROM shadow WHERE prediction_id = OLD.prediction_id; END""",
    "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created_at)",
    "CREATE INDEX IF NOT EXISTS predictions_version ON predictions (model_version, created_at)",
    "CREATE INDEX IF NOT EXISTS predictions_sha256 ON predictions (sha256)",
    "CREATE INDEX IF NOT EXISTS predictions_queue ON predictions (state, label, score)",
    "CREATE INDEX IF NOT EXISTS predictions_eviction ON predictions "
    "((state = 'pending'), created_at)",
    # Row count and bytes kept by triggers, in the same transactions as the rows: the bounds
    # are checked on every save without a scan.
    """CREATE TABLE IF NOT EXISTS stats (
        id INTEGER PRIMARY KEY CHECK (id = 0), rows INTEGER NOT NULL, bytes INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO stats (id, rows, bytes) VALUES (0, 0, 0)",
    """CREATE TRIGGER IF NOT EXISTS predictions_added AFTER INSERT ON predictions BEGIN
        UPDATE stats SET rows = rows + 1, bytes = bytes + NEW.size WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS predictions_removed AFTER DELETE ON predictions BEGIN
        UPDATE stats SET rows = rows - 1, bytes = bytes - OLD.size WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS images_added AFTER INSERT ON images BEGIN
        UPDATE stats SET bytes = bytes + NEW.size WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS images_removed AFTER DELETE ON images BEGIN
        UPDATE stats SET bytes = bytes - OLD.size WHERE id = 0; END""",
)

_COLUMNS = ("prediction_id, created_at, model_version, label, score, margin, entropy, top_k, "
            "filename, sha256, state, reason, reviewed_at, unknown")


class PredictionNotFound(DomainError, LookupError):
    code = "prediction_not_found"
    status = 404


class PredictionIndexBusy(DomainError):
    """Another process held the index past the busy timeout: retry."""

    code = "unavailable"
    status = 503
    headers = {"Retry-After": "1"}


WAL_CHECKPOINT_PAGES = 256
WAL_SIZE_LIMIT = 1 << 20


def new_prediction_id() -> str:
    return secrets.token_hex(16)


def _shown(prediction_id: str) -> str:
    """A client's id as an error message shows it: quoted, and cut short."""
    text = prediction_id if isinstance(prediction_id, str) else ""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def uncertainty(scores: Sequence[float]) -> tuple[float, float]:
    """Top-k softmax probabilities (any order) -> (margin, entropy).

    margin: top-1 minus top-2, in [0, 1]; small = the model nearly gave another answer. With
    only one score known, the runner-up is taken as large as it could be (min(p1, 1 - p1)): the
    smallest margin the known score allows.
    entropy: in nats, over the top-k plus the rest of the probability mass as one outcome: a
    lower bound of the entropy over every class, exact when k covers them all.
    """
    ps = sorted((min(max(float(s), 0.0), 1.0) for s in scores), reverse=True)
    if not ps:
        return 0.0, 0.0
    second = ps[1] if len(ps) > 1 else min(ps[0], 1.0 - ps[0])
    rest = max(0.0, 1.0 - sum(ps))
    entropy = -sum(p * math.log(p) for p in (*ps, rest) if p > 0.0)
    return ps[0] - second, max(entropy, 0.0)


@dataclass(frozen=True)
class StoredPrediction:
    """A stored prediction: its row (`record`: prediction_id, created_at, model_version, label,
    score, margin, entropy, top_k [{label, score}], filename, sha256, state, reviewed_at) and
    where its image is."""

    record: dict[str, Any]
    image_path: Path

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_path.suffix.lstrip(".")]

    def image_bytes(self) -> bytes:
        return self.image_path.read_bytes()


@dataclass(frozen=True)
class StoreStats:
    """What the store holds: rows (`predictions`; `pending` of them in the queue, `not_stored`
    without an image), distinct `images`, and `bytes` counted against `max_bytes`."""

    predictions: int
    pending: int
    not_stored: int
    images: int
    bytes: int


def _sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error (extended codes folded), or None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return _sqlite_code(exc) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_busy(exc: BaseException) -> bool:
    return _sqlite_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class PredictionStore:
    """The prediction store of one volume (see the module docstring). Cheap to construct; safe
    to use from many threads and processes at once (one connection per thread)."""

    def __init__(self, home: Path | str, keep: int = 1000, max_age_s: float = 7 * 24 * 3600,
                 max_bytes: int = 1024**3, min_free_bytes: int = 1024**3,
                 busy_timeout_s: float = 5.0):
        self.root = Path(home) / "predictions"
        self.images = self.root / "images"
        self.tmp = self.root / ".tmp"
        self.db_path = self.root / "index.sqlite3"
        self.keep = keep
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        for folder in (self.root, self.images, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._create_schema()
        self._migrate_legacy()

    @classmethod
    def from_settings(cls, settings: Settings, home: Path | None = None) -> PredictionStore:
        """The store as `service.settings.Settings` configures it (on `home`, default the
        settings' own)."""
        return cls(Path(settings.home) if home is None else home,
                   keep=settings.predictions_keep,
                   max_age_s=settings.predictions_max_age_s,
                   max_bytes=settings.predictions_max_bytes,
                   min_free_bytes=settings.min_free_bytes)

    # -- connections -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, opened on first use and kept: closing the last connection
        of a process checkpoints and removes the WAL, which per call would cost more than the
        write itself. A forked child opens its own, and leaves its parent's alone (never used,
        never closed: SQLite forbids both across a fork)."""
        connections: dict[int, sqlite3.Connection] = self._local.__dict__.setdefault(
            "connections", {})
        db = connections.get(os.getpid())
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
            # In WAL mode NORMAL syncs at checkpoints only: a crash may lose the last few
            # predictions, never the index's consistency, and predict does not wait for the disk.
            db.execute("PRAGMA synchronous=NORMAL")
            # The WAL outside the byte bound stays small: checkpoint every 256 pages (1 MiB at
            # 4 KiB pages; SQLite's default is 1000) and truncate the file back to 1 MiB after
            # one, instead of keeping its high-water mark.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            connections[os.getpid()] = db
        yield db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (`BEGIN IMMEDIATE`): writers of every process
        queue here for up to `busy_timeout_s`."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _api_errors(self) -> Iterator[None]:
        """The index's own failures, for calls made on behalf of a request: a full volume is
        507, a writer holding the index past the busy timeout is 503 (retry)."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if _is_full(exc):
                raise VolumeFull("the data volume is full: the prediction index cannot be "
                                 "updated") from None
            if _is_busy(exc):
                raise PredictionIndexBusy("the prediction index is busy; retry") from None
            raise

    def _create_schema(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the database file
            if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
        with self._write() as db:
            for statement in _SCHEMA:  # not executescript: it would commit our transaction
                db.execute(statement)
            columns = {r[1] for r in db.execute("PRAGMA table_info(predictions)")}
            if "unknown" not in columns:  # a version-1 index: every old answer was known
                db.execute("ALTER TABLE predictions ADD COLUMN unknown INTEGER NOT NULL "
                           "DEFAULT 0")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing -----------------------------------------------------------------------------
    def save(self, prediction_id: str, data: bytes, record: dict[str, Any],
             created_at: float | None = None) -> Kept:
        """Keep one prediction: `data`, the image bytes as uploaded (already decoded by the
        classifier, so a known format); `record`: model_version, label, score, top_k
        [{label, score}], filename. -> "stored", or why not (`NOT_STORED_REASONS`). Never
        raises: the prediction has been answered whatever happens here, and an unexpected
        failure is logged and counted ("error") rather than turned into a failed predict."""
        if self.keep <= 0 or self.max_bytes <= 0:
            return "disabled"
        try:
            return self._save(prediction_id, data, record,
                              time.time() if created_at is None else created_at)
        except Exception:
            log.exception("could not keep prediction %s", prediction_id)
            return "error"

    def _save(self, prediction_id: str, data: bytes, record: dict[str, Any],
              created_at: float) -> Kept:
        row = self._row(prediction_id, record, created_at)
        if len(data) + row["size"] > self.max_bytes:
            return self._not_stored(row, "too_large")
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        if free - len(data) < self.min_free_bytes:
            return self._not_stored(row, "low_space")
        sha = hashlib.sha256(data).hexdigest()
        ext = probe_image(data, max_pixels=2**62).extension
        tmp: Path | None = None
        try:
            if not self._image_known(sha):
                tmp = self._write_tmp(data)  # outside the write lock: other writers go on
            with self._write() as db:
                self._insert(db, row, sha, ext, data, tmp, created_at)
                tmp = None
                self._enforce(db, time.time())
            return "stored"
        except (sqlite3.Error, OSError) as exc:
            reason: Kept = "volume_full" if _is_full(exc) else "busy" if _is_busy(exc) else "error"
            if reason == "error":
                log.warning("could not keep prediction %s: %r", prediction_id, exc)
            return self._not_stored(row, reason)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _row(self, prediction_id: str, record: dict[str, Any], created_at: float
             ) -> dict[str, Any]:
        """A prediction record (as `save` takes it) -> the values of its row."""
        top_k: list[dict[str, Any]] = [{"label": str(t["label"]), "score": float(t["score"])}
                                       for t in record.get("top_k") or []]
        score = float(record["score"])
        margin, entropy = uncertainty([float(t["score"]) for t in top_k] or [score])
        top_k_json = json.dumps(top_k, separators=(",", ":"))
        label, version = str(record["label"]), str(record["model_version"])
        filename = record.get("filename")
        if filename is not None:  # a client's string: storable whatever its characters
            filename = str(filename)[:MAX_FILENAME_CHARS].encode("utf-8", "replace").decode()
        size = (ROW_OVERHEAD_BYTES + len(top_k_json) + len(label) + len(version)
                + len(filename or ""))
        return {"prediction_id": prediction_id, "created_at": created_at,
                "model_version": version, "label": label, "score": score, "margin": margin,
                "entropy": entropy, "top_k": top_k_json, "filename": filename, "size": size,
                "unknown": int(bool(record.get("unknown"))), "shadow": record.get("shadow")}

    def _image_known(self, sha: str) -> bool:
        try:
            with self._connect() as db:
                return db.execute("SELECT 1 FROM images WHERE sha256 = ?",
                                  (sha,)).fetchone() is not None
        except sqlite3.Error:
            return False

    def _write_tmp(self, data: bytes) -> Path:
        """The image in `.tmp/` (not fsynced: a prediction lost in a crash costs nothing).
        ENOSPC: the partial file is removed before the error goes on."""
        tmp = self.tmp / f"{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            tmp.write_bytes(data)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _insert(self, db: sqlite3.Connection, row: dict[str, Any], sha: str, ext: str,
                data: bytes, tmp: Path | None, created_at: float) -> None:
        """Inside a write transaction: the image (once per sha256) and the row referring to it.
        `tmp`, when given, is the image already written; it is consumed."""
        if db.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is None:
            # Written or renamed under the lock: `prune` cannot remove it between the look and
            # the row (it unlinks under the same lock).
            if tmp is None:
                tmp = self._write_tmp(data)
            os.replace(tmp, self.images / f"{sha}.{ext}")
            db.execute("INSERT INTO images (sha256, ext, size, created_at) VALUES (?, ?, ?, ?)",
                       (sha, ext, len(data), created_at))
        elif tmp is not None:
            tmp.unlink(missing_ok=True)
        db.execute(
            "INSERT OR IGNORE INTO predictions (prediction_id, created_at, model_version, label, "
            "score, margin, entropy, top_k, filename, sha256, state, size, unknown) VALUES "
            "(:prediction_id, :created_at, :model_version, :label, :score, :margin, :entropy, "
            ":top_k, :filename, :sha256, 'pending', :size, :unknown)", {**row, "sha256": sha})
        self._insert_shadow(db, row)

    def _insert_shadow(self, db: sqlite3.Connection, row: dict[str, Any]) -> None:
        shadow = row.get("shadow")
        if shadow:
            db.execute("INSERT OR IGNORE INTO shadow (prediction_id, version, label, score) "
                       "VALUES (?, ?, ?, ?)", (row["prediction_id"], str(shadow["version"]),
                                               str(shadow["label"]), float(shadow["score"])))

    def _not_stored(self, row: dict[str, Any], reason: Kept) -> Kept:
        """Remember that this prediction was answered but not kept, and why (a row without an
        image and without top_k). Best effort: on a volume too full even for that, nothing."""
        small = {**row, "top_k": "[]", "filename": None,
                 "size": ROW_OVERHEAD_BYTES + len(row["label"]) + len(row["model_version"])}
        try:
            with self._write() as db:
                db.execute(
                    "INSERT OR IGNORE INTO predictions (prediction_id, created_at, model_version, "
                    "label, score, margin, entropy, top_k, filename, sha256, state, reason, size, "
                    "unknown) VALUES (:prediction_id, :created_at, :model_version, :label, "
                    ":score, :margin, :entropy, :top_k, NULL, NULL, 'not_stored', :reason, "
                    ":size, :unknown)",
                    {**small, "reason": reason})
                self._insert_shadow(db, small)
                self._enforce(db, time.time())
        except (sqlite3.Error, OSError) as exc:
            log.debug("could not record that prediction %s was not kept: %r",
                      row["prediction_id"], exc)
        return reason

    # -- retention ---------------------------------------------------------------------------
    def _stats(self, db: sqlite3.Connection) -> tuple[int, int]:
        rows, size = db.execute("SELECT rows, bytes FROM stats WHERE id = 0").fetchone()
        return int(rows), int(size)

    def _enforce(self, db: sqlite3.Connection, now: float) -> int:
        """Inside a write transaction: apply the age, count and byte bounds. -> rows removed."""
        removed = self._remove(db, "created_at < ?", (now - self.max_age_s,))
        rows, _ = self._stats(db)
        if rows > self.keep:
            removed += self._remove(
                db, f"prediction_id IN (SELECT prediction_id FROM predictions {_EVICTION_SQL} "
                    "LIMIT ?)", (rows - self.keep,))
        while True:
            # One at a time (an image frees its bytes only with the last row that refers to
            # it), from candidates read in eviction order a batch at a time.
            batch = db.execute(f"SELECT prediction_id FROM predictions {_EVICTION_SQL} "
                               "LIMIT 64").fetchall()
            for (prediction_id,) in batch:
                if self._stats(db)[1] <= self.max_bytes:
                    return removed
                removed += self._remove(db, "prediction_id = ?", (prediction_id,))
            if not batch or self._stats(db)[1] <= self.max_bytes:
                return removed

    def _remove(self, db: sqlite3.Connection, where: str, params: Sequence[Any]) -> int:
        """Inside a write transaction: delete the rows `where` selects, then every image no row
        refers to any more (file and row). -> rows deleted."""
        deleted = db.execute(f"DELETE FROM predictions WHERE {where} RETURNING sha256",
                             params).fetchall()
        for sha in {sha for (sha,) in deleted if sha is not None}:
            gone = db.execute(
                "DELETE FROM images WHERE sha256 = ? AND NOT EXISTS "
                "(SELECT 1 FROM predictions WHERE sha256 = ?) RETURNING ext",
                (sha, sha)).fetchone()
            if gone is not None:
                # Unlinked before the commit, under the lock: a save of the same image waits
                # for us and then writes it anew. Should the commit fail, the row keeps a
                # missing file, which reads answer as "gone".
                (self.images / f"{sha}.{gone[0]}").unlink(missing_ok=True)
        return len(deleted)

    def prune(self, now: float | None = None) -> int:
        """Apply the bounds (age, count, bytes), and remove what a crash left behind: images no
        row refers to, temporary files of saves long gone. -> predictions removed."""
        now = time.time() if now is None else now
        with self._write() as db:
            removed = self._enforce(db, now)
            known = {sha for (sha,) in db.execute("SELECT sha256 FROM images")}
            orphans = 0
            for path in self.images.iterdir():
                m = _IMAGE_FILE.fullmatch(path.name)
                if m is None or m.group(1) not in known:  # only this store writes here
                    path.unlink(missing_ok=True)
                    orphans += 1
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink()
        if removed or orphans:
            log.info("retention: removed %d prediction(s) and %d orphaned image file(s) "
                     "(keeping at most %d predictions, %d bytes, %d s old)",
                     removed, orphans, self.keep, self.max_bytes, self.max_age_s)
        return removed

    # -- reading -----------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        record = dict(row)
        record["top_k"] = json.loads(record["top_k"])
        if "unknown" in record:
            record["unknown"] = bool(record["unknown"])
        return record

    def _select(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._api_errors(), self._connect() as db:
            cursor = db.cursor()
            cursor.row_factory = sqlite3.Row
            return [self._record(r) for r in cursor.execute(sql, params).fetchall()]

    def _lookup(self, prediction_id: str) -> dict[str, Any]:
        """The row of a prediction that was kept (with `ext`, its image's extension, None when
        the image row is gone). Raises PredictionNotFound, saying why: an id that is not one of
        ours, a prediction answered but not kept (and why), or one removed by retention."""
        if not isinstance(prediction_id, str) or not ID_PATTERN.fullmatch(prediction_id):
            raise PredictionNotFound(f"unknown prediction id {_shown(prediction_id)}: "
                                     "ids are 32 hex digits, as predict answers them")
        rows = self._select(
            f"SELECT {_COLUMNS}, (SELECT ext FROM images i WHERE i.sha256 = p.sha256) AS ext "
            "FROM predictions p WHERE prediction_id = ?", (prediction_id,))
        if not rows:
            raise PredictionNotFound(
                f"unknown prediction id {_shown(prediction_id)}: predictions are kept for "
                f"feedback for {self.max_age_s:g} s at most, and fewer when more than "
                f"{self.keep} predictions or {self.max_bytes} bytes would be kept "
                "(VISIONLOOP_PREDICTIONS_MAX_AGE_S, _KEEP, _MAX_BYTES)")
        record = rows[0]
        if record["state"] == "not_stored":
            raise PredictionNotFound(
                f"prediction {_shown(prediction_id)} was answered but not kept: "
                f"{self.reason_text(record['reason'])}")
        return record

    def get(self, prediction_id: str) -> StoredPrediction:
        """A kept prediction and its image. Raises PredictionNotFound (404) as `_lookup` does,
        or when its image is gone from the volume."""
        record = self._lookup(prediction_id)
        ext = record.pop("ext")
        if ext is None:
            raise PredictionNotFound(f"the image of prediction {_shown(prediction_id)} is gone")
        return StoredPrediction(record, self.images / f"{record['sha256']}.{ext}")

    def reason_text(self, reason: str | None) -> str:
        """Why a prediction was not kept, in words, naming the setting involved."""
        return {
            "disabled": "this service keeps no predictions (VISIONLOOP_PREDICTIONS_KEEP or "
                        "VISIONLOOP_PREDICTIONS_MAX_BYTES is 0)",
            "low_space": "the volume had less free space than VISIONLOOP_MIN_FREE_BYTES "
                         f"({self.min_free_bytes} bytes), kept for labels and model versions",
            "too_large": "its image is larger than the whole prediction store "
                         f"(VISIONLOOP_PREDICTIONS_MAX_BYTES = {self.max_bytes} bytes)",
            "volume_full": "the data volume was full",
            "busy": "the prediction index was busy",
            "error": "the prediction store failed (the service log has the error)",
        }.get(reason or "", f"{reason}")

    def review(self, below: float, limit: int, label: str | None = None,
               order: ReviewOrder = "margin", now: float | None = None) -> list[dict[str, Any]]:
        """The review queue: pending predictions (not labelled, not dismissed, image kept)
        within the age limit, answered `unknown` or scored below `below`, predicted as `label`
        (the model's label) when given; the `unknown` ones first, then most uncertain first by
        `order` (margin: smallest first; entropy: largest first; score: lowest first), newest
        first among equals. -> at most `limit` records."""
        if order not in _ORDER_SQL:
            raise ValueError(f"unknown order {order!r}; expected one of {sorted(_ORDER_SQL)}")
        now = time.time() if now is None else now
        where = "state = 'pending' AND (unknown = 1 OR score < ?) AND created_at >= ?"
        params: list[Any] = [below, now - self.max_age_s]
        if label is not None:
            where += " AND label = ?"
            params.append(label)
        return self._select(f"SELECT {_COLUMNS} FROM predictions WHERE {where} "
                            f"ORDER BY unknown DESC, {_ORDER_SQL[order]}, created_at DESC "
                            "LIMIT ?",
                            (*params, limit))

    def recent_answers(self, version: str, limit: int) -> tuple[list[str], list[float]]:
        """The labels (the model's own, `unknown` or not) and scores of the newest `limit`
        answers of `version`, kept or not (a prediction not kept still has its row): the live
        side of drift (`training.calibration.drift`)."""
        with self._api_errors(), self._connect() as db:
            rows = db.execute("SELECT label, score FROM predictions WHERE model_version = ? "
                              "ORDER BY created_at DESC LIMIT ?", (version, limit)).fetchall()
        return [str(r[0]) for r in rows], [float(r[1]) for r in rows]

    def trial_stats(self, version: str, current: str | None, since: float,
                    label_of: Callable[[str], str | None]) -> dict[str, Any]:
        """How `version` (on trial since `since`) does on live traffic: `answers` it gave
        (as canary) or computed (as shadow); `agreement`: the share of its shadow answers with
        the same label as the served answer (None without shadow answers); `feedback`: on the
        predictions that came back labelled (`label_of(sha256)`: the image's label in the
        dataset now, None if it is gone), its accuracy (`trial_accuracy`, over `count`) and the
        current version's on its own labelled answers of the same period (`current_accuracy`,
        over `current_count`). A shadow's feedback is on the same images as the current
        version's answers; a canary's on the images it answered."""
        with self._api_errors(), self._connect() as db:
            shadow = db.execute(
                "SELECT s.label, p.label, p.state, p.sha256 FROM shadow s JOIN predictions p "
                "ON s.prediction_id = p.prediction_id WHERE s.version = ? AND "
                "p.created_at >= ?", (version, since)).fetchall()
            canary = db.execute(
                "SELECT label, state, sha256 FROM predictions WHERE model_version = ? AND "
                "created_at >= ?", (version, since)).fetchall()
            served = db.execute(
                "SELECT label, sha256 FROM predictions WHERE model_version = ? AND "
                "created_at >= ? AND state = 'labelled' AND sha256 IS NOT NULL",
                (current or "", since)).fetchall()

        def accuracy(pairs: list[tuple[str, str | None]]) -> tuple[int, float | None]:
            known = [(said, truth) for said, truth in pairs if truth is not None]
            return len(known), (sum(s == t for s, t in known) / len(known) if known else None)

        trial_pairs = [(r[0], label_of(r[3])) for r in shadow if r[2] == "labelled" and r[3]]
        trial_pairs += [(r[0], label_of(r[2])) for r in canary if r[1] == "labelled" and r[2]]
        count, trial_accuracy = accuracy(trial_pairs)
        current_count, current_accuracy = accuracy([(r[0], label_of(r[1])) for r in served])
        return {"answers": len(shadow) + len(canary),
                "agreement": (sum(r[0] == r[1] for r in shadow) / len(shadow)
                              if shadow else None),
                "feedback": {"count": count, "trial_accuracy": trial_accuracy,
                             "current_count": current_count,
                             "current_accuracy": current_accuracy}}

    def resolve(self, prediction_id: str, state: Literal["labelled", "dismissed"]) -> str:
        """Take a prediction out of the review queue: `labelled` (feedback stored its image in
        the dataset) or `dismissed` (a reviewer said it needs no label; a labelled one stays
        labelled). -> its state now. Raises PredictionNotFound as `get` does."""
        self._lookup(prediction_id)  # 404 with the reason, before writing anything
        with self._api_errors(), self._write() as db:
            only = "" if state == "labelled" else " AND state = 'pending'"
            db.execute(f"UPDATE predictions SET state = ?, reviewed_at = ? "
                       f"WHERE prediction_id = ? AND state != 'not_stored'{only}",
                       (state, time.time(), prediction_id))
            row = db.execute("SELECT state FROM predictions WHERE prediction_id = ?",
                             (prediction_id,)).fetchone()
        if row is None:  # removed by retention between the look and the write
            raise PredictionNotFound(f"prediction {_shown(prediction_id)} was just removed by "
                                     "retention")
        return str(row[0])

    def stats(self) -> StoreStats:
        with self._connect() as db:
            rows, size = self._stats(db)
            pending, not_stored = db.execute(
                "SELECT COALESCE(SUM(state = 'pending'), 0), "
                "COALESCE(SUM(state = 'not_stored'), 0) FROM predictions").fetchone()
            (images,) = db.execute("SELECT COUNT(*) FROM images").fetchone()
        return StoreStats(rows, int(pending), int(not_stored), int(images), size)

    # -- the previous layout -------------------------------------------------------------------
    def _migrate_legacy(self) -> None:
        """`predictions/<id>.json` + `<id>.<ext>` (the layout before this index) -> rows and
        content-addressed images; what cannot be migrated is removed. Several processes may
        run this at once: each pair is migrated in its own transaction, and a file another
        process took already is skipped."""
        by_id: dict[str, dict[str, Path]] = {}
        stale: list[Path] = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                m = _LEGACY_FILE.fullmatch(entry.name)
                if m is not None and entry.is_file(follow_symlinks=False):
                    by_id.setdefault(m.group(1), {})[m.group(2)] = Path(entry.path)
                elif _LEGACY_TMP.fullmatch(entry.name):
                    stale.append(Path(entry.path))
        if not by_id and not stale:
            return
        migrated = dropped = 0
        for prediction_id, files in by_id.items():
            record_path = files.pop("json", None)
            image = next(iter(files.values()), None)
            try:
                if record_path is not None and image is not None:
                    record = json.loads(record_path.read_bytes())
                    data = image.read_bytes()
                    self._migrate_one(prediction_id, record, data)
                    migrated += 1
                else:
                    dropped += 1
            except FileNotFoundError:
                continue  # another process is migrating this one
            except (OSError, sqlite3.Error, ValueError, KeyError, TypeError, ImageError) as exc:
                log.warning("prediction %s of the previous layout could not be migrated (%r); "
                            "removing it", prediction_id, exc)
                dropped += 1
            for path in (record_path, *files.values()):
                if path is not None:
                    path.unlink(missing_ok=True)
        for path in stale:
            path.unlink(missing_ok=True)
        log.info("predictions: migrated %d prediction(s) of the previous layout into the index; "
                 "removed %d incomplete one(s)", migrated, dropped)

    def _migrate_one(self, prediction_id: str, record: dict[str, Any], data: bytes) -> None:
        created_at = float(record["created_at"])
        row = self._row(prediction_id, record, created_at)
        sha = hashlib.sha256(data).hexdigest()
        ext = probe_image(data, max_pixels=2**62).extension
        with self._write() as db:
            self._insert(db, row, sha, ext, data, None, created_at)
            self._enforce(db, time.time())
