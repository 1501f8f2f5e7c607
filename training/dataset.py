"""The dataset store: labelled originals on the volume, content-addressed.

Layout (under `<home>/dataset/`):
    <label>/<sha256>.<ext>    the original bytes; one label per image
    ledger.jsonl              one JSON line per event: added, relabelled, deleted
    .tmp/                     writes in progress (renamed into place when complete)
    .snapshots/<job_id>/      a training job's frozen view: hard links `<sha256>.<ext>` of the
                              originals it trains on + `snapshot.json` (labels, ledger offset)
    .lock                     a file lock: one writer at a time across processes

No client filename ever reaches a path: the name is the hash of the bytes, the extension comes
from the decoder's verdict, and the label must match `LABEL_PATTERN`.

The split is a pure function of the image's hash (`split_of`): train, validation (picks the
best epoch) and test (held out: only the promotion gate sees it). Adding images never moves an
old image across splits.

Changing from the earlier two-way split (validation below `DEFAULT_VAL_FRACTION`, the rest
train) re-assigned some images once: the validation boundary is unchanged, so every old
validation image stays there, but the old training images whose hash number is at or above
`1 - DEFAULT_TEST_FRACTION` (a quarter of them) became test images. Versions published before
the change list those images under "train" in their data lists (`models/v<N>/data.json`, which
stay as written): such a version has seen part of today's test split, so its test accuracy is
optimistic. The gate still compares a candidate with it on the same test split (the error is on
the safe side: the candidate has to beat an inflated score) and records, per compared version,
how many test images it trained on (`trained_on_test`); new images do not add to that count.

A job trains on a `Snapshot` (`DatasetStore.snapshot`): hard links made under the store's lock,
so a delete or a relabel while the job runs changes the store, not the job's files (a link
keeps the bytes until the job removes its snapshot), and the ledger offset recorded with it
makes every later event count as new for the next job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from filelock import FileLock

from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image, probe_image

log = logging.getLogger(__name__)

LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2
Split = Literal["train", "val", "test"]
SNAPSHOTS_DIR = ".snapshots"
SNAPSHOT_RECORD = "snapshot.json"
SNAPSHOT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# os.link fails with these where the filesystem has no hard links (or not across devices):
# the snapshot then copies the file.
NO_HARD_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                          errno.EMLINK, errno.ENOSYS})
Status = Literal["added", "duplicate", "relabelled"]


class InvalidLabel(DomainError, ValueError):
    code = "invalid_label"
    status = 400


class VolumeFull(DomainError, OSError):
    code = "insufficient_storage"
    status = 507


class DatasetTooSmall(DomainError, ValueError):
    """The dataset cannot be trained on yet; the message says what to add."""

    code = "dataset_too_small"
    status = 400


def check_label(label: str) -> str:
    if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
        raise InvalidLabel(
            f"invalid label {label!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit (no spaces, slashes or path parts)"
        )
    return label


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both in (0, 1) and leaving room for training; ValueError naming the values otherwise."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise ValueError(f"invalid split fractions val={val_fraction!r}, test={test_fraction!r}: "
                         "each must be in (0, 1) and together below 1")


def split_of(sha256: str, val_fraction: float = DEFAULT_VAL_FRACTION,
             test_fraction: float = DEFAULT_TEST_FRACTION) -> Split:
    """Deterministic split by content hash. u = the first 8 hex digits as a fraction of 2**32:
    validation when u < val_fraction, test when u >= 1 - test_fraction, train otherwise. The
    two held-out ranges sit at the two ends, so the validation range is the one the earlier
    two-way split used (see the module docstring)."""
    check_fractions(val_fraction, test_fraction)
    u = int(sha256[:8], 16) / 2**32
    if u < val_fraction:
        return "val"
    if u >= 1 - test_fraction:
        return "test"
    return "train"


@dataclass(frozen=True)
class Item:
    sha256: str
    label: str
    path: Path


class Splits(NamedTuple):
    """Items per split, each in the order given (the store's: by label, then sha256)."""

    train: list[Item]
    val: list[Item]
    test: list[Item]


def split_items(items: Iterable[Item], val_fraction: float = DEFAULT_VAL_FRACTION,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> Splits:
    out = Splits([], [], [])
    for item in items:
        getattr(out, split_of(item.sha256, val_fraction, test_fraction)).append(item)
    return out


def check_snapshot_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not SNAPSHOT_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"invalid job id {job_id!r} for a dataset snapshot: use 1-128 "
                         "characters from A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return job_id


@dataclass(frozen=True)
class Snapshot:
    """A training job's frozen view of the dataset (`DatasetStore.snapshot`).

    `entries` are the images as they were when it was taken: their labels then, and paths into
    the snapshot folder (`root`), which later deletes and relabels in the store do not touch.
    `ledger_offset`: the ledger's length then; every event after it is new for the next job.
    `method`: "hardlink" (no bytes copied) or "copy" (a filesystem without hard links).
    """

    job_id: str
    root: Path
    ledger_offset: int
    created_at: float
    method: str
    entries: tuple[Item, ...]

    def items(self) -> list[Item]:
        """Every image of the snapshot, sorted by (label, sha256) like `DatasetStore.items`."""
        return list(self.entries)


@dataclass(frozen=True)
class IngestResult:
    sha256: str
    label: str
    status: Status


@dataclass
class ImportReport:
    added: int = 0
    duplicate: int = 0
    relabelled: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def count(self, status: Status) -> None:
        setattr(self, status, getattr(self, status) + 1)

    def summary(self) -> str:
        s = (f"added {self.added}, duplicate {self.duplicate}, relabelled {self.relabelled}, "
             f"skipped {len(self.skipped)}")
        return s


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write temp + fsync + os.replace + fsync(dir). ENOSPC -> VolumeFull, temp removed."""
    tmp_dir = tmp_dir or path.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VolumeFull(exc.errno, f"the data volume is full: {exc.strerror}") from None
        raise


def _link_or_copy(source: Path, target: Path) -> int:
    """Hard-link `source` at `target`; copy it where the filesystem cannot link. -> 1 when
    copied, 0 when linked. ENOSPC -> VolumeFull."""
    try:
        os.link(source, target)
        return 0
    except OSError as exc:
        if exc.errno not in NO_HARD_LINK:
            raise
    try:
        shutil.copyfile(source, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        target.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VolumeFull(exc.errno, f"the data volume is full: {exc.strerror}") from None
        raise
    return 1


class DatasetStore:
    def __init__(self, home: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(home) / "dataset"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".tmp"
        self.ledger_path = self.root / "ledger.jsonl"
        self.max_pixels = max_pixels
        self._lock = FileLock(str(self.root / ".lock"), timeout=60)

    # -- reading -------------------------------------------------------------------------------
    def labels(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and LABEL_PATTERN.fullmatch(p.name))

    def items(self) -> list[Item]:
        """Every stored image, sorted by (label, sha256)."""
        out = []
        for label in self.labels():
            for p in sorted((self.root / label).iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    out.append(Item(p.stem, label, p))
        return out

    def counts(self) -> dict[str, int]:
        c = Counter(item.label for item in self.items())
        return {label: c[label] for label in sorted(c)}

    def find(self, sha256: str) -> Item | None:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        for label in self.labels():
            for p in (self.root / label).glob(f"{sha256}.*"):
                return Item(sha256, label, p)
        return None

    def split(self, val_fraction: float = DEFAULT_VAL_FRACTION,
              test_fraction: float = DEFAULT_TEST_FRACTION) -> Splits:
        return split_items(self.items(), val_fraction, test_fraction)

    def ledger_length(self) -> int:
        if not self.ledger_path.exists():
            return 0
        with open(self.ledger_path, "rb") as f:
            return sum(1 for _ in f)

    def new_since(self, offset: int) -> int:
        """Images added or relabelled after ledger line `offset` (still present)."""
        if not self.ledger_path.exists():
            return 0
        shas: set[str] = set()
        with open(self.ledger_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i < offset:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; the image itself is on disk or not
                if event.get("event") in ("added", "relabelled"):
                    shas.add(event["sha256"])
                elif event.get("event") == "deleted":
                    shas.discard(event["sha256"])
        return len(shas)

    # -- writing -------------------------------------------------------------------------------
    def ingest(self, data: bytes, label: str, source: str = "upload") -> IngestResult:
        """Store `data` under `label`. Raises InvalidLabel, ImageError (not stored) or VolumeFull.

        Idempotent by content hash: the same bytes under the same label -> "duplicate"; under a
        new label -> moved ("relabelled").
        """
        check_label(label)
        info = probe_image(data, self.max_pixels)
        decode_image(data, self.max_pixels)  # a truncated file passes the header probe
        sha = sha256_of(data)
        target = self.root / label / f"{sha}.{info.extension}"
        with self._lock:
            existing = self.find(sha)
            if existing is not None and existing.label == label:
                return IngestResult(sha, label, "duplicate")
            target.parent.mkdir(exist_ok=True)
            if existing is not None:
                os.replace(existing.path, target)
                fsync_dir(target.parent)
                fsync_dir(existing.path.parent)
                self._append_ledger("relabelled", sha, label, existing.label, source)
                return IngestResult(sha, label, "relabelled")
            write_file_atomic(target, data, self.tmp)
            try:
                self._append_ledger("added", sha, label, None, source)
            except VolumeFull:
                target.unlink(missing_ok=True)
                raise
            return IngestResult(sha, label, "added")

    def delete(self, sha256: str, source: str = "api") -> bool:
        with self._lock:
            item = self.find(sha256)
            if item is None:
                return False
            item.path.unlink()
            fsync_dir(item.path.parent)
            self._append_ledger("deleted", sha256, None, item.label, source)
            return True

    def _append_ledger(self, event: str, sha: str, label: str | None, old: str | None,
                       source: str) -> None:
        line = json.dumps({"time": time.time(), "event": event, "sha256": sha, "label": label,
                           "old_label": old, "source": source}) + "\n"
        size = self.ledger_path.stat().st_size if self.ledger_path.exists() else 0
        try:
            with open(self.ledger_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # Leave no line (ingest then removes the image it wrote) and no cut line (the next
            # append would be glued to it). Appends run under the store's lock.
            with contextlib.suppress(OSError):
                os.truncate(self.ledger_path, size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise VolumeFull(exc.errno, f"the data volume is full: {exc.strerror}") from None
            raise

    # -- snapshots -----------------------------------------------------------------------------
    @property
    def snapshots_root(self) -> Path:
        return self.root / SNAPSHOTS_DIR

    def snapshot(self, job_id: str) -> Snapshot:
        """Freeze the dataset for job `job_id` -> its Snapshot.

        Under the store's lock (no ingest, relabel or delete meanwhile): one hard link per image
        in `.snapshots/<job_id>/` (a copy where the filesystem has no hard links), then
        `snapshot.json`, written last and atomically, so a folder without it is unfinished. The
        ledger offset is read under the same lock: events after it are exactly the changes the
        job does not see. Writers wait for the links (metadata only: no bytes are copied); a
        copy would make them wait for the bytes. Anything left under this job id (an attempt
        that died) is replaced. Raises VolumeFull (nothing left behind) when the volume fills.
        """
        root = self.snapshots_root / check_snapshot_id(job_id)
        with self._lock:
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            try:
                entries, copied = [], 0
                for item in self.items():
                    target = root / item.path.name
                    copied += _link_or_copy(item.path, target)
                    entries.append(Item(item.sha256, item.label, target))
                snap = Snapshot(job_id, root, self.ledger_length(), time.time(),
                                "copy" if copied else "hardlink", tuple(entries))
                record = {"job_id": job_id, "ledger_offset": snap.ledger_offset,
                          "created_at": snap.created_at, "method": snap.method,
                          "items": [[i.sha256, i.label, i.path.name] for i in entries]}
                write_file_atomic(root / SNAPSHOT_RECORD, json.dumps(record).encode())
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
        log.info("dataset snapshot for job %s: %d images (%s), ledger offset %d", job_id,
                 len(entries), snap.method, snap.ledger_offset)
        return snap

    def open_snapshot(self, job_id: str) -> Snapshot | None:
        """The finished snapshot of `job_id` (a job resumed under its id trains on the same
        images), or None when there is none, it is unfinished or a file of it is missing."""
        root = self.snapshots_root / check_snapshot_id(job_id)
        try:
            record = json.loads((root / SNAPSHOT_RECORD).read_text())
            entries = tuple(Item(sha, label, root / name) for sha, label, name in record["items"])
            snap = Snapshot(job_id, root, int(record["ledger_offset"]),
                            float(record["created_at"]), str(record["method"]), entries)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(i.path.is_file() for i in entries):
            return None
        return snap

    def remove_snapshot(self, job_id: str) -> bool:
        """Remove `job_id`'s snapshot; the bytes of images deleted from the store meanwhile go
        with their last link. -> whether there was one."""
        root = self.snapshots_root / check_snapshot_id(job_id)
        if not root.exists():
            return False
        shutil.rmtree(root)
        return True

    def snapshot_ids(self) -> list[str]:
        if not self.snapshots_root.is_dir():
            return []
        return sorted(p.name for p in self.snapshots_root.iterdir()
                      if p.is_dir() and SNAPSHOT_ID_PATTERN.fullmatch(p.name))

    def prune_snapshots(self, keep: Collection[str]) -> list[str]:
        """Retention: remove every snapshot whose job id is not in `keep` (the caller knows
        which jobs can still run: those of jobs that died are left behind). -> the removed."""
        removed = []
        for job_id in self.snapshot_ids():
            if job_id not in keep and self.remove_snapshot(job_id):
                removed.append(job_id)
                log.info("retention: removed the dataset snapshot of job %s (not running)",
                         job_id)
        return removed

    # -- bulk import ---------------------------------------------------------------------------
    def ingest_many(self, files: Iterable[tuple[str, str, bytes]], source: str
                    ) -> ImportReport:
        """(display name, label, bytes) triples -> report; bad files are skipped and counted."""
        report = ImportReport()
        for name, label, data in files:
            try:
                report.count(self.ingest(data, label, source).status)
            except (ImageError, InvalidLabel) as exc:
                report.skipped.append((name, str(exc)))
        return report


def iter_imagefolder(root: Path) -> Iterator[tuple[str, str, bytes]]:
    """Walk an ImageFolder tree (`root/<label>/<file>`, or `root/train|val|test/<label>/...`
    merged) -> (path, label, bytes). Labels come from folder names, validated by ingest."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    subs = {p.name for p in root.iterdir() if p.is_dir()}
    split_dirs = [root / s for s in ("train", "val", "test") if s in subs]
    tops = split_dirs if split_dirs and subs <= {"train", "val", "test"} else [root]
    for top in tops:
        for label_dir in sorted(p for p in top.iterdir() if p.is_dir()):
            for f in sorted(label_dir.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    yield str(f), label_dir.name, f.read_bytes()


# -- CIFAR-10 ------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of numpy arrays; allow exactly what they need, so a
    malicious batch file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="bytes").load()


def _key(d: dict, name: str):  # CIFAR batches use bytes keys; tolerate str keys too
    return d[name.encode()] if name.encode() in d else d[name]


def iter_cifar10(folder: Path, subset: int | None) -> Iterator[tuple[str, str, bytes]]:
    """A `cifar-10-batches-py` folder -> PNG bytes per image, at most `subset` per class,
    taken in file order (data_batch_1..5, then test_batch)."""
    from PIL import Image

    folder = Path(folder)
    meta = load_cifar_batch(folder / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, "label_names")]
    taken: Counter[int] = Counter()
    batches = sorted(folder.glob("data_batch_*")) + sorted(folder.glob("test_batch"))
    if not batches:
        raise FileNotFoundError(f"no data_batch_* or test_batch in {folder}")
    for batch_path in batches:
        batch = load_cifar_batch(batch_path)
        data = _key(batch, "data")
        labels = _key(batch, "labels")
        for row, y in zip(data, labels, strict=True):
            if subset is not None and taken[y] >= subset:
                continue
            taken[y] += 1
            img = Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            yield f"{batch_path.name}#{sum(taken.values())}", names[y], buf.getvalue()
        if subset is not None and len(taken) == len(names) and min(taken.values()) >= subset:
            return


def download_cifar10(cache_dir: Path) -> Path:
    """Fetch CIFAR-10 with torchvision (needs the network); -> the cifar-10-batches-py folder."""
    from torchvision.datasets import CIFAR10

    CIFAR10(root=str(cache_dir), train=True, download=True)
    return Path(cache_dir) / "cifar-10-batches-py"
