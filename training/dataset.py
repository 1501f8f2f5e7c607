"""The dataset store: labelled originals on the volume, content-addressed.

Layout (under `<home>/dataset/`):
    <folder>/<sha256>.<ext>   the original bytes; one label per image; <folder> = label_folder()
    <folder>/.label           the label's display name (UTF-8), where <folder> is not the name
    ledger.jsonl              one JSON line per event: added, relabelled, deleted,
                              label_renamed, label_merged
    .relabel.json             a label rename or merge in progress (its plan; see below)
    .tmp/                     writes in progress (renamed into place when complete)
    .snapshots/<job_id>/      a training job's frozen view: hard links `<sha256>.<ext>` of the
                              originals it trains on + `snapshot.json` (labels, ledger offset)
    .lock                     a file lock: one writer at a time across processes
and `<home>/cache/thumbnails/<size>/<sha256>.jpg`, small copies for browsing (safe to delete).

Labels are display names: what a user types, what a model's classes are called, and what the
API answers, e.g. `Golden Retriever` or v0's own ImageNet names (`Egyptian cat`,
`jack-o'-lantern`), so feedback on a v0 prediction can use the name it predicted. The rules
(`check_label`, `LABEL_RULES`): 1-64 characters after Unicode NFC normalisation, each a letter,
mark or digit of any script, a space, or one of - _ . , ' ( ) & +; at least one letter or
digit; no leading or trailing space, no two spaces in a row, no leading `.` (so never `.` or
`..`). Everything else is refused, path separators, control and invisible formatting
characters included. Labels are case-sensitive (`Cat` and `cat` are two labels).

No label and no client filename ever reaches a path as typed: an image's file name is the hash
of its bytes with the extension of the decoder's verdict, and a label's folder is
`label_folder(label)`, the one function that maps a label to its folder (reading goes through
it too: a folder counts as a label's only if `label_folder` of that label gives the folder's
name). A "plain" label (`PLAIN_LABEL_PATTERN`: ASCII letters, digits, `_ . -`, starting with a
letter or digit; every label the store accepted before display names, but `ledger.jsonl`) is
its own folder, so existing volumes keep working unchanged. Any other label is stored under an
ASCII slug and the first 8 hex digits of the SHA-256 of its UTF-8 name (`Golden Retriever` in
`golden-retriever~2eb35bd4`), with the name in that folder's `.label`. The `~` cannot occur
in a plain name, so the two kinds never collide; two names whose slugs and short hashes agree
are told apart by `.label` (the second is refused, naming the first). A new folder is built in
`.tmp/` with its `.label` and renamed into place, so it never appears without its name. A
folder is removed when its last image goes.

Renaming a label (`rename_label`: the new name must be free) and merging one into another
(`merge_label`) move every image of the label, one `os.rename` each, under the store's lock.
The ledger gets one `label_renamed` / `label_merged` line (sha256 null, `images`: the count)
and one `relabelled` line per image (`by`: that event), so replaying the ledger image by image
still gives the store's state, and the moved images count as new for the next job (its model
has the new class names). Crash safety: the plan (every move and the exact ledger text) is
written to `.relabel.json` first; appending the ledger lines is the commit. Whoever next takes
the lock (every writer and snapshot), and every reader that sees a plan, first settles it: a
committed plan is finished (the moves are idempotent), an uncommitted one is undone (no image
has moved before the commit). A job never sees a half-moved label: it trains on a snapshot,
taken under the same lock after settling. Renames and merges do not wait for a running job:
its snapshot keeps the names it started with, and the ledger lines after the snapshot's offset
make the moved images new for the next job.

The split is a pure function of the image's hash (`split_of`): train, validation (picks the
best epoch) and test (held out: only the promotion gate sees it). Adding images never moves an
old image across splits, and neither does a relabel, rename or merge.

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
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import quote

from filelock import FileLock

from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image, probe_image

log = logging.getLogger(__name__)

LABEL_MAX_CHARS = 64
# Allowed besides letters, marks and digits (Unicode categories L*, M*, N*).
LABEL_PUNCTUATION = frozenset(" -_.,'()&+")
LABEL_RULES = ("1-64 characters (after Unicode NFC normalisation): letters and digits of any "
               "script, spaces and - _ . , ' ( ) & +; at least one letter or digit; no leading "
               "or trailing space, no two spaces in a row, no leading '.'; no slashes, control "
               "characters or other symbols")
# A label that is its own folder: every label the store accepted before display names.
PLAIN_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The folder of any other label: an ASCII slug, "~", 8 hex digits of the name's SHA-256.
SLUG_FOLDER_PATTERN = re.compile(r"^[a-z0-9-]{1,40}~[0-9a-f]{8}$")
SLUG_MAX_CHARS = 40
LEDGER_FILE = "ledger.jsonl"
LABEL_FILE = ".label"
RELABEL_PLAN = ".relabel.json"
THUMBNAIL_SIZE = 256  # pixels, the longer side
THUMBNAIL_QUALITY = 85
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
LabelOp = Literal["rename", "merge"]


class InvalidLabel(DomainError, ValueError):
    code = "invalid_label"
    status = 400


class LabelNotFound(DomainError, LookupError):
    code = "label_not_found"
    status = 404


class LabelExists(DomainError, ValueError):
    """A rename onto a label that has images: that is a merge."""

    code = "label_exists"
    status = 409


class InvalidLabelChange(DomainError, ValueError):
    """A rename or merge of a label onto itself."""

    code = "invalid_label_change"
    status = 400


class VolumeFull(DomainError, OSError):
    code = "insufficient_storage"
    status = 507


class DatasetTooSmall(DomainError, ValueError):
    """The dataset cannot be trained on yet; the message says what to add."""

    code = "dataset_too_small"
    status = 400


def _label_problem(name: str) -> str | None:
    """What breaks the label rules in `name` (already NFC), or None."""
    if not name:
        return "it is empty"
    if len(name) > LABEL_MAX_CHARS:
        return f"it has {len(name)} characters"
    bad = [c for c in dict.fromkeys(name)
           if c not in LABEL_PUNCTUATION and unicodedata.category(c)[0] not in "LMN"]
    if bad:
        return "it contains " + ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad[:5])
    if name[0] == "." or name[0] == " " or name[-1] == " ":
        return "it starts with '.' or a space, or ends with a space"
    if "  " in name:
        return "it has two spaces in a row"
    if not any(unicodedata.category(c)[0] in "LN" for c in name):
        return "it has no letter or digit"
    return None


def check_label(label: object) -> str:
    """A valid label -> its NFC form (what the store records and answers); InvalidLabel (400)
    naming the problem and listing the rules (`LABEL_RULES`) otherwise."""
    if not isinstance(label, str):
        raise InvalidLabel(f"invalid label {label!r}: a label is text. Label rules: "
                           f"{LABEL_RULES}")
    name = unicodedata.normalize("NFC", label)
    problem = _label_problem(name)
    if problem:
        raise InvalidLabel(f"invalid label {label!r}: {problem}. Label rules: {LABEL_RULES}")
    return name


def _is_plain(name: str) -> bool:
    """A label that is its own folder name (the ledger's file name is not one)."""
    return bool(PLAIN_LABEL_PATTERN.fullmatch(name)) and name != LEDGER_FILE


def label_folder(label: str) -> str:
    """The name of the folder under dataset/ that holds `label`'s images: the label itself when
    it is plain (`PLAIN_LABEL_PATTERN`), else `<slug>~<8 hex digits of sha256(name)>`; the
    one mapping from labels to folders (module docstring). Raises InvalidLabel."""
    name = check_label(label)
    if _is_plain(name):
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    slug = slug[:SLUG_MAX_CHARS].strip("-") or "label"
    return f"{slug}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def folder_label(folder: Path) -> str | None:
    """The label whose images `folder` holds, or None when it is no label's folder (the
    store's own dot-folders, a folder made by hand, one whose `.label` is missing or does not
    name a label that `label_folder` maps to this folder)."""
    name = folder.name
    if _is_plain(name):
        return name
    if not SLUG_FOLDER_PATTERN.fullmatch(name):
        return None
    try:
        label = check_label((folder / LABEL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, InvalidLabel):
        return None
    return label if label_folder(label) == name else None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_thumbnail(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                   size: int = THUMBNAIL_SIZE) -> bytes:
    """Image bytes -> a JPEG whose longer side is at most `size` pixels (RGB, EXIF-oriented,
    first frame; JPEGs decoded at a reduced scale). Raises ImageError."""
    from PIL import Image

    img = decode_image(data, max_pixels, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


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


@dataclass(frozen=True)
class StoredImage:
    """One stored image as browsing shows it: `bytes` its size, `added_at` when its bytes were
    stored (the file's modification time, seconds since the epoch; a relabel, rename or merge
    keeps it)."""

    sha256: str
    label: str
    path: Path
    bytes: int
    added_at: float


@dataclass(frozen=True)
class ImagePage:
    """`images`: at most `limit` of the label's `total` images from `offset` on, newest first
    (`added_at` descending, then sha256)."""

    label: str
    total: int
    offset: int
    limit: int
    images: list[StoredImage]


@dataclass(frozen=True)
class LabelChange:
    """A finished rename or merge: `old_label`'s `moved` images are now under `label`, which
    holds `total`."""

    op: LabelOp
    old_label: str
    label: str
    moved: int
    total: int


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


def _ledger_line(event: str, sha: str | None, label: str | None, old: str | None,
                 source: str, **extra: Any) -> str:
    return json.dumps({"time": time.time(), "event": event, "sha256": sha, "label": label,
                       "old_label": old, "source": source, **extra}) + "\n"


def _images_in(folder: Path, label: str) -> list[Item]:
    """The images in a label's folder, by sha256; none when the folder has just gone."""
    try:
        paths = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Item(p.stem, label, p) for p in paths if not p.name.startswith(".") and p.is_file()]


class DatasetStore:
    def __init__(self, home: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.home = Path(home)
        self.root = self.home / "dataset"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".tmp"
        self.ledger_path = self.root / LEDGER_FILE
        self.plan_path = self.root / RELABEL_PLAN
        self.thumbnails = self.home / "cache" / "thumbnails" / str(THUMBNAIL_SIZE)
        self.max_pixels = max_pixels
        self._lock = FileLock(str(self.root / ".lock"), timeout=60)

    # -- reading -------------------------------------------------------------------------------
    # Public readers first settle a rename or merge in progress (`_settle`); the private ones
    # (`_folders`, `_items`, `_find`, `_label_items`) do not, and are what code under the lock
    # calls.
    def labels(self) -> list[str]:
        """The labels that have at least one image, sorted."""
        self._settle()
        return sorted(label for label, folder in self._folders().items()
                      if _images_in(folder, label))

    def items(self) -> list[Item]:
        """Every stored image, sorted by (label, sha256)."""
        self._settle()
        return self._items()

    def counts(self) -> dict[str, int]:
        c = Counter(item.label for item in self.items())
        return {label: c[label] for label in sorted(c)}

    def find(self, sha256: str) -> Item | None:
        self._settle()
        return self._find(sha256)

    def page(self, label: str, offset: int = 0, limit: int = 50) -> ImagePage:
        """One page of `label`'s images, newest first (`ImagePage`). Raises LabelNotFound (a
        label without images, or no valid label at all) and ValueError (offset < 0 or
        limit < 1)."""
        if offset < 0 or limit < 1:
            raise ValueError(f"invalid page offset={offset!r}, limit={limit!r}: the offset "
                             "must be >= 0 and the limit >= 1")
        self._settle()
        images = []
        for item in self._label_items(label):
            try:
                st = item.path.stat()
            except FileNotFoundError:  # deleted or moved since the listing
                continue
            images.append(StoredImage(item.sha256, item.label, item.path, st.st_size,
                                      st.st_mtime))
        images.sort(key=lambda i: (-i.added_at, i.sha256))
        name = images[0].label if images else check_label(label)
        return ImagePage(name, len(images), offset, limit, images[offset:offset + limit])

    def read_image(self, sha256: str) -> tuple[Item, bytes] | None:
        """A stored image and its bytes, or None when the store has no such image."""
        for _ in range(3):  # a relabel may move it between the look and the read
            item = self.find(sha256)
            if item is None:
                return None
            with contextlib.suppress(FileNotFoundError):
                return item, item.path.read_bytes()
        return None

    def thumbnail(self, sha256: str) -> bytes | None:
        """A stored image as a small JPEG (`make_thumbnail`), or None when the store has no such
        image. Made on first request and kept in `cache/thumbnails/<size>/<sha256>.jpg`
        (content-addressed, so never stale; removed with the image); served without caching
        when the cache cannot be written (a full volume)."""
        found = self.read_image(sha256)
        if found is None:
            return None
        item, data = found
        cached = self.thumbnails / f"{item.sha256}.jpg"
        with contextlib.suppress(FileNotFoundError):
            return cached.read_bytes()
        thumb = make_thumbnail(data, self.max_pixels)
        try:
            self.thumbnails.mkdir(parents=True, exist_ok=True)
            write_file_atomic(cached, thumb)
        except OSError as exc:
            log.warning("thumbnail of %s not cached: %s", item.sha256, exc)
        return thumb

    def split(self, val_fraction: float = DEFAULT_VAL_FRACTION,
              test_fraction: float = DEFAULT_TEST_FRACTION) -> Splits:
        return split_items(self.items(), val_fraction, test_fraction)

    def ledger_length(self) -> int:
        self._settle()
        return self._ledger_lines()

    def new_since(self, offset: int) -> int:
        """Images added or relabelled (one by one, or by a rename or merge of their label)
        after ledger line `offset` (still present)."""
        self._settle()
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

    def _folders(self) -> dict[str, Path]:
        """label -> its folder, for every folder that is a label's (`folder_label`)."""
        out = {}
        for p in self.root.iterdir():
            if p.is_dir():
                label = folder_label(p)
                if label is not None:
                    out[label] = p
        return out

    def _items(self) -> list[Item]:
        return [item for label, folder in sorted(self._folders().items())
                for item in _images_in(folder, label)]

    def _find(self, sha256: str) -> Item | None:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        for label, folder in sorted(self._folders().items()):
            for p in folder.glob(f"{sha256}.*"):
                return Item(sha256, label, p)
        return None

    def _label_items(self, label: str) -> list[Item]:
        """`label`'s images; LabelNotFound when it has none (or is no valid label)."""
        items = self._images_of(label)
        if not items:
            raise LabelNotFound(f"no label {label!r} in the dataset (labels are "
                                "case-sensitive; GET /v1/dataset lists them)")
        return items

    def _images_of(self, label: str) -> list[Item]:
        """`label`'s images; none for an unknown or invalid label."""
        try:
            name = check_label(label)
        except InvalidLabel:
            return []
        folder = self.root / label_folder(name)
        return _images_in(folder, name) if folder_label(folder) == name else []

    def _ledger_lines(self) -> int:
        if not self.ledger_path.exists():
            return 0
        with open(self.ledger_path, "rb") as f:
            return sum(1 for _ in f)

    # -- writing -------------------------------------------------------------------------------
    def ingest(self, data: bytes, label: str, source: str = "upload") -> IngestResult:
        """Store `data` under `label`. Raises InvalidLabel, ImageError (not stored) or VolumeFull.

        Idempotent by content hash: the same bytes under the same label -> "duplicate"; under a
        new label -> moved ("relabelled"). The result names the label in its NFC form.
        """
        name = check_label(label)
        info = probe_image(data, self.max_pixels)
        decode_image(data, self.max_pixels)  # a truncated file passes the header probe
        sha = sha256_of(data)
        with self._lock:
            self._recover()
            existing = self._find(sha)
            if existing is not None and existing.label == name:
                return IngestResult(sha, name, "duplicate")
            folder = self._ensure_folder(name)
            target = folder / f"{sha}.{info.extension}"
            if existing is not None:
                os.replace(existing.path, target)
                fsync_dir(folder)
                fsync_dir(existing.path.parent)
                self._append_ledger("relabelled", sha, name, existing.label, source)
                self._drop_if_empty(existing.path.parent)
                return IngestResult(sha, name, "relabelled")
            try:
                write_file_atomic(target, data, self.tmp)
                try:
                    self._append_ledger("added", sha, name, None, source)
                except VolumeFull:
                    target.unlink(missing_ok=True)
                    raise
            except BaseException:
                self._drop_if_empty(folder)
                raise
            return IngestResult(sha, name, "added")

    def delete(self, sha256: str, source: str = "api") -> bool:
        """Remove an image (and its cached thumbnail); -> whether there was one."""
        with self._lock:
            self._recover()
            item = self._find(sha256)
            if item is None:
                return False
            item.path.unlink()
            fsync_dir(item.path.parent)
            self._append_ledger("deleted", sha256, None, item.label, source)
            self._drop_if_empty(item.path.parent)
        with contextlib.suppress(OSError):
            (self.thumbnails / f"{sha256}.jpg").unlink(missing_ok=True)
        return True

    def rename_label(self, label: str, to: str, source: str = "api") -> LabelChange:
        """Give `label` the name `to` (every image moves; see the module docstring). Raises
        InvalidLabel (`to` breaks the rules), LabelNotFound, LabelExists (`to` has images:
        merge instead), InvalidLabelChange (the same name) and VolumeFull (nothing changed)."""
        return self._move_label("rename", label, to, source)

    def merge_label(self, label: str, into: str, source: str = "api") -> LabelChange:
        """Move every image of `label` under the existing label `into`; `label` is gone after.
        An image found under both ends up once. Raises InvalidLabel, LabelNotFound (either
        label), InvalidLabelChange (the same label) and VolumeFull (nothing changed)."""
        return self._move_label("merge", label, into, source)

    def _move_label(self, op: LabelOp, label: str, target: str, source: str) -> LabelChange:
        new = check_label(target)
        with self._lock:
            self._recover()
            items = self._label_items(label)
            old = items[0].label
            if new == old:
                raise InvalidLabelChange(f"cannot {op} label {old!r} into itself")
            present = len(self._images_of(new))
            if op == "rename" and present:
                raise LabelExists(
                    f"label {new!r} already exists ({present} images); to put the images of "
                    f"{old!r} under it, merge: POST /v1/dataset/labels/{quote(old, safe='')}"
                    f"/merge with {json.dumps({'into': new}, ensure_ascii=False)}")
            if op == "merge" and not present:
                raise LabelNotFound(f"no label {new!r} to merge {old!r} into; to give {old!r} "
                                    "a new name, rename it")
            folder = self._ensure_folder(new)
            event = "label_renamed" if op == "rename" else "label_merged"
            lines = _ledger_line(event, None, new, old, source, images=len(items)) + "".join(
                _ledger_line("relabelled", i.sha256, new, old, source, by=event)
                for i in items)
            plan = {"op": op, "label": new, "old_label": old, "folder": folder.name,
                    "lines": lines, "ledger_size": self._ledger_size(),
                    "moves": [[f"{i.path.parent.name}/{i.path.name}",
                               f"{folder.name}/{i.path.name}"] for i in items]}
            try:
                write_file_atomic(self.plan_path, json.dumps(plan).encode(), self.tmp)
            except BaseException:
                self._drop_if_empty(folder)
                raise
            try:
                self._append_lines(lines)  # the commit
            except BaseException:
                self._recover()  # undone, or finished if the lines made it after all
                raise
            self._finish(plan)
            total = len(_images_in(folder, new))
        log.info("label %r %s into %r: %d images", old, "renamed" if op == "rename" else
                 "merged", new, len(items))
        return LabelChange(op, old, new, len(items), total)

    def _finish(self, plan: dict[str, Any]) -> None:
        """Do a committed plan's moves (each only if not done yet: a plan finished after a crash
        repeats none), remove the emptied folder, then the plan."""
        touched: set[Path] = set()
        for src_rel, dst_rel in plan["moves"]:
            src, dst = self.root / src_rel, self.root / dst_rel
            touched.update((src.parent, dst.parent))
            if not src.exists():
                continue
            if dst.exists():  # the same bytes (same name) already there: keep one
                src.unlink()
            else:
                os.rename(src, dst)
        for folder in touched:
            if folder.is_dir():
                fsync_dir(folder)
        for folder in touched:
            self._drop_if_empty(folder)
        self.plan_path.unlink(missing_ok=True)
        fsync_dir(self.root)

    def _recover(self) -> None:
        """Settle a rename or merge a crash interrupted (module docstring); under the lock."""
        try:
            plan = json.loads(self.plan_path.read_text(encoding="utf-8"))
            lines = plan["lines"].encode()
            size = int(plan["ledger_size"])
            _ = [(str(a), str(b)) for a, b in plan["moves"]], str(plan["folder"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            broken = self.plan_path.with_name(f"{RELABEL_PLAN}.broken")
            os.replace(self.plan_path, broken)
            log.error("unreadable label rename/merge plan moved to %s: %s", broken, exc)
            return
        if self._ledger_tail(size, len(lines) + 1) == lines:
            log.warning("finishing an interrupted %s of label %r into %r", plan["op"],
                        plan["old_label"], plan["label"])
            self._finish(plan)
            return
        log.warning("undoing an interrupted %s of label %r into %r (not committed)",
                    plan["op"], plan["old_label"], plan["label"])
        if self._ledger_size() > size:
            os.truncate(self.ledger_path, size)
        self.plan_path.unlink()
        self._drop_if_empty(self.root / str(plan["folder"]))
        fsync_dir(self.root)

    def _settle(self) -> None:
        """Wait for (or settle) a rename or merge in progress, so a reader never sees one
        half done."""
        if self.plan_path.exists():
            with self._lock:
                self._recover()

    def _ensure_folder(self, name: str) -> Path:
        """The folder of label `name` (NFC), made with its `.label` when missing; under the
        lock. Raises InvalidLabel when another label holds it, VolumeFull."""
        folder = self.root / label_folder(name)
        if _is_plain(folder.name):
            folder.mkdir(exist_ok=True)
            return folder
        if folder.is_dir():
            current = folder_label(folder)
            if current == name:
                return folder
            if current is not None:
                raise InvalidLabel(f"label {name!r} cannot be stored: its folder "
                                   f"{folder.name!r} holds label {current!r} (their names "
                                   "hash alike); choose another name")
            # Its name record is gone (a crash while the emptied folder was being removed):
            # the folder name is this label's hash, so it is this label's.
            write_file_atomic(folder / LABEL_FILE, name.encode(), self.tmp)
            return folder
        # Built aside with its name, then renamed into place: never visible without it.
        self.tmp.mkdir(exist_ok=True)
        stage = self.tmp / f"{folder.name}.{os.getpid()}.{time.monotonic_ns()}"
        stage.mkdir()
        try:
            write_file_atomic(stage / LABEL_FILE, name.encode())
            os.rename(stage, folder)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return folder

    def _drop_if_empty(self, folder: Path) -> None:
        """Remove a label's folder that holds no image any more (its `.label` first); under the
        lock."""
        if folder.parent != self.root or folder_label(folder) is None:
            return
        try:
            if any(p.name != LABEL_FILE for p in folder.iterdir()):
                return
            (folder / LABEL_FILE).unlink(missing_ok=True)
            folder.rmdir()
            fsync_dir(self.root)
        except OSError as exc:  # gone already, or not empty after all
            log.debug("label folder %s kept: %s", folder, exc)

    def _ledger_size(self) -> int:
        return self.ledger_path.stat().st_size if self.ledger_path.exists() else 0

    def _ledger_tail(self, offset: int, n: int) -> bytes:
        """At most `n` bytes of the ledger from byte `offset` (none when it does not exist)."""
        try:
            with open(self.ledger_path, "rb") as f:
                f.seek(offset)
                return f.read(n)
        except FileNotFoundError:
            return b""

    def _append_ledger(self, event: str, sha: str, label: str | None, old: str | None,
                       source: str) -> None:
        self._append_lines(_ledger_line(event, sha, label, old, source))

    def _append_lines(self, lines: str) -> None:
        """Append ledger text (whole lines) with one write and fsync; under the lock."""
        size = self._ledger_size()
        try:
            with open(self.ledger_path, "a", encoding="utf-8") as f:
                f.write(lines)
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

        Under the store's lock (no ingest, relabel, delete, rename or merge meanwhile, and one
        a crash interrupted settled first): one hard link per image
        in `.snapshots/<job_id>/` (a copy where the filesystem has no hard links), then
        `snapshot.json`, written last and atomically, so a folder without it is unfinished. The
        ledger offset is read under the same lock: events after it are exactly the changes the
        job does not see. Writers wait for the links (metadata only: no bytes are copied); a
        copy would make them wait for the bytes. Anything left under this job id (an attempt
        that died) is replaced. Raises VolumeFull (nothing left behind) when the volume fills.
        """
        root = self.snapshots_root / check_snapshot_id(job_id)
        with self._lock:
            self._recover()
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            try:
                entries, copied = [], 0
                for item in self._items():
                    target = root / item.path.name
                    copied += _link_or_copy(item.path, target)
                    entries.append(Item(item.sha256, item.label, target))
                snap = Snapshot(job_id, root, self._ledger_lines(), time.time(),
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


def _imagefolder_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(file, label) of an ImageFolder tree, in the order `iter_imagefolder` reads them."""
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
                    yield f, label_dir.name


def iter_imagefolder(root: Path, exclude: Collection[str] = ()
                     ) -> Iterator[tuple[str, str, bytes]]:
    """Walk an ImageFolder tree (`root/<label>/<file>`, or `root/train|val|test/<label>/...`
    merged) -> (path, label, bytes), leaving out the paths in `exclude`. Labels come from
    folder names, validated by ingest."""
    for f, label in _imagefolder_files(root):
        if str(f) not in exclude:
            yield str(f), label, f.read_bytes()


def imagefolder_conflicts(root: Path) -> list[tuple[str, str]]:
    """The files of an ImageFolder tree whose image (the same bytes) is also filed under
    another label in the same tree -> [(path, reason)]. An image has one label; reading such a
    tree in order would keep whichever folder came last and count it as `relabelled`, a silent
    guess. So the importers skip every copy of such an image and report each, naming the other
    folder(s); the rest of the tree is imported. (The same image twice under one label, or in
    train/ and val/ of one label, is a plain duplicate, not a conflict.) Relabelling an image
    already in the dataset, from a later folder, is still allowed: that is a decision."""
    seen: dict[str, list[tuple[Path, str]]] = {}
    for f, label in _imagefolder_files(root):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        seen.setdefault(digest, []).append((f, label))
    out: list[tuple[str, str]] = []
    for copies in seen.values():
        labels = sorted({label for _, label in copies})
        if len(labels) < 2:
            continue
        for f, label in copies:
            others = [str(g.relative_to(root)) for g, other in copies if other != label]
            out.append((str(f), f"the same image is filed under {len(labels)} labels "
                                f"({', '.join(labels)}; also {', '.join(others)}); an image has "
                                "one label: keep it in one folder"))
    return sorted(out)


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
