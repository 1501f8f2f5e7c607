"""Data and models in and out: the dataset as a tar, imports, and a version as ONNX or `.pt2`.

Dataset export (`iter_export_tar`, `export_dataset`): a tar (PAX, so any label name survives)
holding an ImageFolder tree split the store's way, then the manifest twice:

    visionloop-dataset/<split>/<label>/<sha256>.<ext>    split: train | val | test
    visionloop-dataset/manifest.csv                       sha256,label,split,source,path
    visionloop-dataset/manifest.jsonl                     the same, one JSON object a line

`<label>` is the label's display name as is (`Golden Retriever`): the label rules
(`training.dataset.check_label`) already exclude `/`, control characters and a leading `.`, and
torchvision's `ImageFolder` reads the folder name as the class. `source` is where the image
came from (the ledger's `added` event: `upload`, `feedback`, `import`, ...). The manifest comes
last because the tar streams: an image deleted while the export runs is left out of both.

Import (`import_archive`, `import_csv`, `import_csv_uploads`) ends in `DatasetStore.ingest`,
like every other way in: labels are checked, images decoded by the safe decoder, duplicates
recognised by hash. A tar with `manifest.jsonl` is imported by it (each file's sha256 checked
against the manifest: a changed file is refused, not imported under a wrong name); a tar
without one is read as an ImageFolder tree (the label is each file's folder). A tar's members
are read, never extracted: no member name reaches a path. Splits need no import: they are a
function of each image's hash (`training.dataset.split_of`), so the same bytes land in the
same split on any volume, and each result says which.

Model downloads (`onnx_file`, `pt2_file`):
- ONNX: the version's own `model.onnx` when publishing kept it (checked against eager at
  publish and by its checksum at download); otherwise exported on demand into
  `cache/exports/<version>-<weights sha256 prefix>/` and checked against eager on a fixed random
  batch within `training.inference.ATOL` before it is offered (a failed check is refused with
  `ExportFailed`, nothing cached).
- `.pt2` (`torch.export`), a self-contained artifact that torch and torchvision alone load
  (`torch.export.load(path).module()`): the graph and the weights, with the normalisation
  inside, and `visionloop.json` (classes, preprocessing, input and output) among its extra
  files. Chosen over TorchScript: TorchScript is in maintenance mode in PyTorch 2.x while
  `torch.export` is the supported capture, with a dynamic batch dimension; the file needs no
  visionloop code to load. Checked against eager like the ONNX export.
Exports are made once per version (versions never change once published) under a file lock.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from filelock import FileLock
from torch import nn

from training.dataset import DatasetStore, Item, split_of
from training.errors import DomainError
from training.imageio import ImageError
from training.inference import ATOL, ONNX_FILE, OnnxModule, export_onnx
from training.registry import WEIGHTS, Registry, file_sha256

log = logging.getLogger(__name__)

EXPORT_ROOT = "visionloop-dataset"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_COLUMNS = ("sha256", "label", "split", "source", "path")
PT2_FILE = "model.pt2"
PT2_METADATA = "visionloop.json"
PT2_FORMAT = "visionloop-pt2/1"
EXPORTS_DIR = ("cache", "exports")
CHECK_BATCH = 4
MAX_MEMBER_BYTES = 64 * 1024 * 1024


class InvalidImport(DomainError, ValueError):
    """An archive or CSV that cannot be imported at all (not a tar, no images, a CSV without
    two columns); a bad file inside one is reported per file instead."""

    code = "invalid_import"
    status = 400


class ExportFailed(DomainError, RuntimeError):
    """A version that cannot be exported to the format asked for, or whose export does not
    match eager PyTorch within the tolerance."""

    code = "export_failed"
    status = 409


@dataclass(frozen=True)
class ManifestEntry:
    sha256: str
    label: str
    split: str
    source: str
    path: str  # the member path inside the tar, below EXPORT_ROOT


@dataclass(frozen=True)
class FileResult:
    """One imported file: `status` added | duplicate | relabelled, or `error` {code, message}
    (and no sha256 when it was never read)."""

    name: str
    sha256: str | None = None
    label: str | None = None
    split: str | None = None
    status: str | None = None
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def summarize(results: Iterable[FileResult]) -> dict[str, int]:
    counts = {"added": 0, "duplicate": 0, "relabelled": 0, "failed": 0}
    for r in results:
        counts["failed" if r.error else str(r.status)] += 1
    return counts


# -- export ---------------------------------------------------------------------------------------

def image_sources(store: DatasetStore) -> dict[str, str]:
    """sha256 -> the `source` of the ledger event that added it (the latest add after a
    delete); images the ledger does not explain get "unknown"."""
    out: dict[str, str] = {}
    try:
        with open(store.ledger_path, encoding="utf-8") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if event.get("event") == "added" and event.get("sha256"):
                    out[event["sha256"]] = str(event.get("source") or "unknown")
    except FileNotFoundError:
        pass
    return out


def _entry(item: Item, source: str) -> ManifestEntry:
    split = split_of(item.sha256)
    return ManifestEntry(item.sha256, item.label, split, source,
                         f"{split}/{item.label}/{item.path.name}")


class _Chunks(io.RawIOBase):
    """A write-only sink that keeps what is written until `take` (tarfile's stream mode)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(f"{EXPORT_ROOT}/{name}")
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def manifest_csv(entries: Iterable[ManifestEntry]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(asdict(e))
    return buf.getvalue().encode()


def manifest_jsonl(entries: Iterable[ManifestEntry]) -> bytes:
    return "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n"
                   for e in entries).encode()


def iter_export_tar(store: DatasetStore) -> Iterator[bytes]:
    """The dataset as a tar, in chunks (about one image each), for a streaming answer or a
    file. Images as they are when each is read; one deleted meanwhile is left out."""
    sources = image_sources(store)
    sink = _Chunks()
    entries: list[ManifestEntry] = []
    now = time.time()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for listed in store.items():
            found = store.read_image(listed.sha256)
            if found is None:  # deleted since the listing
                continue
            item, data = found
            entry = _entry(item, sources.get(item.sha256, "unknown"))
            _add(tar, entry.path, data, now)
            entries.append(entry)
            yield sink.take()
        _add(tar, MANIFEST_CSV, manifest_csv(entries), now)
        _add(tar, MANIFEST_JSONL, manifest_jsonl(entries), now)
    yield sink.take()


def export_dataset(store: DatasetStore, out: Path | str) -> int:
    """Write the dataset tar to `out` (temp file, fsync, rename: a reader never sees half a
    tar). -> the number of images in it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in iter_export_tar(store):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    with tarfile.open(out) as tar:
        f_manifest = tar.extractfile(f"{EXPORT_ROOT}/{MANIFEST_JSONL}")
        assert f_manifest is not None
        count = sum(1 for line in f_manifest if line.strip())
    return count


# -- import ---------------------------------------------------------------------------------------

def _ingest(store: DatasetStore, name: str, data: bytes, label: str, source: str,
            expected_sha: str | None = None) -> FileResult:
    from training.dataset import InvalidLabel, sha256_of

    if expected_sha is not None and sha256_of(data) != expected_sha:
        return FileResult(name, error={"code": "checksum_mismatch", "message": (
            f"{name}: its bytes do not match the manifest's sha256 {expected_sha[:12]}...")})
    try:
        r = store.ingest(data, label, source)
    except (ImageError, InvalidLabel) as exc:
        return FileResult(name, label=label, error={"code": exc.code,
                                                    "message": f"{name}: {exc}"})
    return FileResult(name, r.sha256, r.label, split_of(r.sha256), r.status)


def _error(name: str, code: str, message: str) -> FileResult:
    return FileResult(name, error={"code": code, "message": f"{name}: {message}"})


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes:
    if member.size > max_bytes:
        raise ValueError(f"{member.size} bytes; the limit is {max_bytes}")
    f = tar.extractfile(member)
    if f is None:
        raise ValueError("not a regular file")
    return f.read()


def _member_name(member: tarfile.TarInfo) -> str:
    """A member's name without leading "./" or "/" (a key to look members up by, never a
    path on this machine)."""
    name = member.name
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name


def _manifest_member(files: Mapping[str, tarfile.TarInfo]) -> tuple[str, str] | None:
    """-> (the member name of the shallowest manifest.jsonl, its folder prefix) or None."""
    names = sorted((n for n in files if n.rsplit("/", 1)[-1] == MANIFEST_JSONL),
                   key=lambda n: n.count("/"))
    if not names:
        return None
    prefix = names[0][: -len(MANIFEST_JSONL)]
    return names[0], prefix


def _open_tar(archive: Path | str | IO[bytes]) -> tarfile.TarFile:
    if isinstance(archive, str | Path):
        return tarfile.open(archive, mode="r:*")
    return tarfile.open(fileobj=archive, mode="r:*")


def import_archive(store: DatasetStore, archive: Path | str | IO[bytes],
                   source: str = "import:tar",
                   max_member_bytes: int = MAX_MEMBER_BYTES) -> list[FileResult]:
    """Import a dataset tar (any compression tarfile reads) -> one FileResult per file.
    With a `manifest.jsonl` (an export of this tool): its entries, by label and checked
    sha256. Without: an ImageFolder tree (`[<root>/][train|val|test/]<label>/<image>`).
    Raises InvalidImport when it is not a readable tar or holds no file to import."""
    try:
        tar = _open_tar(archive)
    except (tarfile.TarError, OSError, EOFError) as exc:
        # tarfile's own text lists every compression it tried ("method gz: ReadError(...)"):
        # the user needs what was expected, not that.
        raise InvalidImport(f"not a readable tar archive ({type(exc).__name__}): expected a "
                            "tar (plain, .gz, .bz2 or .xz) made by `visionloop export` or "
                            "holding <label>/<image> folders") from None
    with tar:
        try:
            files = {_member_name(m): m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidImport(f"the tar archive is damaged: {exc}") from None
        found = _manifest_member(files)
        if found is not None:
            results = _import_by_manifest(store, tar, files, found, source, max_member_bytes)
        else:
            results = _import_tree(store, tar, files, source, max_member_bytes)
    if not results:
        raise InvalidImport("the archive holds no images: expected an export of this tool "
                            "(with manifest.jsonl) or an ImageFolder tree <label>/<image>")
    return results


def _import_by_manifest(store: DatasetStore, tar: tarfile.TarFile,
                        files: Mapping[str, tarfile.TarInfo], found: tuple[str, str],
                        source: str, max_bytes: int) -> list[FileResult]:
    name, prefix = found
    try:
        raw = _read_member(tar, files[name], max_bytes)
        entries = [json.loads(line) for line in raw.decode("utf-8").splitlines()
                   if line.strip()]
        rows = [(str(e["path"]), str(e["label"]), str(e["sha256"])) for e in entries]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, tarfile.TarError) as exc:
        raise InvalidImport(f"{name} is not a manifest of this tool: {exc}") from None
    results = []
    for path, label, sha in rows:
        member = files.get(prefix + path)
        if member is None:
            results.append(_error(path, "missing_file", "listed in the manifest but not in "
                                  "the archive"))
            continue
        try:
            data = _read_member(tar, member, max_bytes)
        except (ValueError, tarfile.TarError, OSError) as exc:
            results.append(_error(path, "unreadable_file", str(exc)))
            continue
        results.append(_ingest(store, path, data, label, source, expected_sha=sha))
    return results


def _import_tree(store: DatasetStore, tar: tarfile.TarFile,
                 files: Mapping[str, tarfile.TarInfo], source: str,
                 max_bytes: int) -> list[FileResult]:
    results = []
    for name in sorted(files):
        parts = name.split("/")
        if any(p.startswith(".") for p in parts) or parts[-1] in (MANIFEST_CSV,):
            continue
        if len(parts) < 2:
            results.append(_error(name, "not_in_label_folder",
                                  "not in a label folder (<label>/<image>)"))
            continue
        try:
            data = _read_member(tar, files[name], max_bytes)
        except (ValueError, tarfile.TarError, OSError) as exc:
            results.append(_error(name, "unreadable_file", str(exc)))
            continue
        results.append(_ingest(store, name, data, parts[-2], source))
    return results


def parse_label_csv(text: str) -> list[tuple[str, str]]:
    """CSV `path,label` rows (a first row `path,label` is a header) -> (path, label) pairs.
    Raises InvalidImport when a row has not exactly two columns or there is no row."""
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise InvalidImport(f"CSV line {n} has {len(row)} columns; expected path,label")
        if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
            continue
        rows.append((row[0].strip(), row[1]))
    if not rows:
        raise InvalidImport("the CSV has no rows; expected path,label lines")
    return rows


def import_csv(store: DatasetStore, csv_path: Path | str, source: str = "import:csv",
               max_file_bytes: int = MAX_MEMBER_BYTES) -> list[FileResult]:
    """Import the images a `path,label` CSV names (paths relative to the CSV's folder, or
    absolute) -> one FileResult per row. Raises InvalidImport for an unreadable CSV."""
    csv_path = Path(csv_path)
    try:
        rows = parse_label_csv(csv_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidImport(f"cannot read {csv_path}: {exc}") from None
    results = []
    for path, label in rows:
        file = csv_path.parent / path
        try:
            if file.stat().st_size > max_file_bytes:
                raise ValueError(f"{file.stat().st_size} bytes; the limit is {max_file_bytes}")
            data = file.read_bytes()
        except (OSError, ValueError) as exc:
            results.append(_error(path, "unreadable_file", str(exc)))
            continue
        results.append(_ingest(store, path, data, label, source))
    return results


def import_csv_uploads(store: DatasetStore, csv_text: str, uploads: Mapping[str, bytes],
                       source: str = "import:csv") -> list[FileResult]:
    """The API's CSV import: `path,label` rows naming uploaded files by their file names ->
    one FileResult per row (a row naming no upload is reported, and an upload that no row
    names too)."""
    rows = parse_label_csv(csv_text)
    results = []
    named = set()
    for path, label in rows:
        named.add(path)
        data = uploads.get(path)
        if data is None:
            results.append(_error(path, "missing_file", "named in the CSV but not uploaded "
                                  "(send it as a 'files' part with this file name)"))
            continue
        results.append(_ingest(store, path, data, label, source))
    for name in sorted(set(uploads) - named):
        results.append(_error(name, "unlabelled_file", "uploaded but no CSV row names it"))
    return results


# -- model downloads ------------------------------------------------------------------------------

class NormalisedClassifier(nn.Module):
    """(N, 3, crop, crop) float32 RGB in [0, 1] -> (N, C) logits: the preset's normalisation,
    then the model."""

    def __init__(self, model: nn.Module, mean: Iterable[float], std: Iterable[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model((x - self.mean) / self.std)
        return out


def _export_dir(registry: Registry, version: str) -> Path:
    manifest = registry.manifest(version)
    sha = (manifest.get("checksums") or {}).get(WEIGHTS)
    if sha is None:
        sha = file_sha256(registry.weights_file(version)[0])
    folder = registry.home.joinpath(*EXPORTS_DIR) / f"{version}-{sha[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_batch(crop: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(CHECK_BATCH, 3, crop, crop, generator=g)


def onnx_file(registry: Registry, version: str) -> tuple[Path, dict[str, Any]]:
    """The version as ONNX (input: (N, 3, crop, crop) float32, normalised as the manifest's
    `preprocessing` says; output (N, C) logits) -> (file, check record {origin, max_abs_diff,
    atol}). Raises VersionNotFound, InvalidVersion (a file that fails its checksum),
    ExportFailed."""
    manifest = registry.manifest(version)
    published = registry.version_dir(version) / ONNX_FILE
    if published.is_file() and ONNX_FILE in (manifest.get("checksums") or {}):
        registry.verify_checksums(version, manifest)
        inference = manifest.get("inference") or {}
        return published, {"origin": "published", "atol": ATOL,
                           "max_abs_diff": inference.get("max_abs_diff")}
    folder = _export_dir(registry, version)
    return _cached_export(folder, ONNX_FILE, lambda tmp: _export_onnx(registry, version, tmp))


def _cached_export(folder: Path, name: str, make: Any) -> tuple[Path, dict[str, Any]]:
    target, record_path = folder / name, folder / f"{name}.check.json"
    with FileLock(str(folder / ".lock"), timeout=600):
        if target.is_file() and record_path.is_file():
            return target, json.loads(record_path.read_text())
        tmp = folder / f".tmp-{os.getpid()}-{name}"  # keeps the extension torch.export wants
        try:
            record = make(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        record_path.write_text(json.dumps(record))
    return target, record


def _checked(diff: float, version: str, fmt: str) -> dict[str, Any]:
    if not diff <= ATOL:
        raise ExportFailed(f"{version}: the {fmt} export differs from eager PyTorch by "
                           f"{diff:.2e} > {ATOL} on logits; not offered")
    return {"origin": "exported", "atol": ATOL, "max_abs_diff": diff}


def _export_onnx(registry: Registry, version: str, tmp: Path) -> dict[str, Any]:
    loaded = registry.load(version, engine="eager")
    crop = loaded.preset.crop
    try:
        export_onnx(loaded.model, tmp, crop)
        session = OnnxModule(tmp, threads=1)
    except Exception as exc:  # the exporter raises many types on architectures it cannot take
        raise ExportFailed(f"{version} cannot be exported as ONNX: {type(exc).__name__}: "
                           f"{exc}"[:500]) from None
    mean = torch.tensor(loaded.preset.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preset.std).view(1, 3, 1, 1)
    x = (_check_batch(crop) - mean) / std
    with torch.inference_mode():
        diff = float((session(x) - loaded.model(x)).abs().max())
    return _checked(diff, version, "ONNX")


def pt2_metadata(version: str, classes: list[str], preprocessing: dict[str, Any]
                 ) -> dict[str, Any]:
    crop, resize = preprocessing["crop"], preprocessing["resize"]
    return {
        "format": PT2_FORMAT, "version": version, "classes": classes,
        "preprocessing": preprocessing,
        "input": (f"(N, 3, {crop}, {crop}) float32 RGB in [0, 1]: resize the short side to "
                  f"{resize} ({preprocessing.get('interpolation', 'bilinear')}, antialias), "
                  f"centre-crop {crop}; the normalisation (mean, std) is inside the model"),
        "output": "(N, C) logits in the order of `classes`; softmax gives probabilities",
        "load": ("ep = torch.export.load(path, extra_files=(x := {'visionloop.json': ''})); "
                 "model = ep.module(); meta = json.loads(x['visionloop.json'])"),
    }


def _export_pt2(registry: Registry, version: str, tmp: Path) -> dict[str, Any]:
    loaded = registry.load(version, engine="eager")
    preset = loaded.preset
    module = NormalisedClassifier(loaded.model, preset.mean, preset.std).eval()
    x = _check_batch(preset.crop)
    meta = pt2_metadata(version, loaded.classes, preset.to_dict())
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
        with open(tmp, "wb") as f:
            torch.export.save(program, f, extra_files={PT2_METADATA: json.dumps(meta)})
        reloaded = torch.export.load(str(tmp)).module()
    except Exception as exc:  # torch.export raises many types on code it cannot capture
        raise ExportFailed(f"{version} cannot be exported with torch.export: "
                           f"{type(exc).__name__}: {exc}"[:500]) from None
    with torch.inference_mode():
        diff = float((reloaded(x) - module(x)).abs().max())
    return _checked(diff, version, ".pt2")


def pt2_file(registry: Registry, version: str) -> tuple[Path, dict[str, Any]]:
    """The version as a `torch.export` program (`.pt2`, module docstring) -> (file, check
    record). Raises VersionNotFound, InvalidVersion, ExportFailed."""
    registry.manifest(version)
    folder = _export_dir(registry, version)
    return _cached_export(folder, PT2_FILE, lambda tmp: _export_pt2(registry, version, tmp))
