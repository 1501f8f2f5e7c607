"""Batch inference over a folder with Ray Data: `predict_dir`.

    predict_dir(home, "photos/", "preds.jsonl", workers=2)    # or preds.csv

(`visionloop predict-dir` calls it; `training.batch_jobs` runs it as a job for the API.)

Flow: the driver lists the folder's files (recursively, hidden ones skipped), drops those the
output already answers (resume), and hands the rest as paths to `ray.data.from_items`;
`map_batches(VersionPredictor, compute=ActorPoolStrategy(size=workers))` runs a fixed pool of
actors (1 CPU each, or 1 GPU each with `gpu=True`), each of which loads the version ONCE
(`Registry.load`, which picks the version's engine: ONNX Runtime on a CPU where it won at
publish, else eager PyTorch) and then reads, decodes and classifies batch after batch. The
driver consumes the results as they stream out (`iter_batches`) and appends them to `out`.

Decisions:
- The same decisions as the served path (`service.classifier.Classifier`): bytes go through
  the safe decoder (`training.imageio.decode_image`: allow-listed formats only, pixel limit
  checked from the header, JPEG draft decoding to the preset's resize), then the version's
  `EvalPreset`, softmax, top-k (`classify`). The training package cannot import the service
  (the layering is service -> training), so the shared step lives here as `classify`; a test
  checks that predict-dir and the served classifier agree on the same images.
- One actor stage, not a decode stage of tasks plus an inference stage of actors: a decoded,
  normalised image is ~600 KB of float32 against ~50 KB of JPEG, and moving it through the
  object store between two stages costs more than it overlaps on a small machine. Actors read
  the files themselves, so the folder must be visible to every node (as VISIONLOOP_HOME is).
- Output: one record per file, `path` relative to the folder (POSIX separators), `label`,
  `score`, `top_k` ([{label, score}]), `version`; a file that cannot be classified (not an
  image, refused format, too large, unreadable) gets `error` ({code, message}) instead of a
  prediction: one bad file never stops the run. JSONL by default; `.csv` writes the columns
  path,label,score,top_k,version,error (top_k and error as JSON text).
- Resumable: every record is one line; each batch of lines is appended with one write and
  fsynced. A rerun with the same `out` first cuts a line a kill left unfinished, then skips
  every path that has a line (an error line counts as done: delete those lines to retry).
  Results stream out of order; the file is a set of lines, not a sorted list.
- One version per file: a rerun must answer with the version the file was started with (the
  resolved version is recorded on every line); another one is refused (`OutputVersionMismatch`)
  rather than mixing two models' answers in one file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, decode_image
from training.registry import LoadedModel, NoCurrentVersion, Registry

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "label", "score", "top_k", "version", "error")
DEFAULT_BATCH_SIZE = 16
DEFAULT_TOP_K = 5
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024


class InvalidBatchRequest(DomainError, ValueError):
    code = "invalid_batch_request"
    status = 400


class OutputVersionMismatch(DomainError, ValueError):
    """The output file was started with another model version."""

    code = "output_version_mismatch"
    status = 409


@dataclass
class BatchReport:
    """What one `predict_dir` call did. `files`: files in the folder; `skipped`: those the
    output already answered; `predicted` / `errors`: new lines this run (a prediction / an
    error line); `workers`: distinct actors that answered; `images_per_s`: new lines per second
    of the whole call (Ray start-up of the actor pool and model loads included)."""

    out: Path
    version: str
    files: int = 0
    skipped: int = 0
    predicted: int = 0
    errors: int = 0
    workers: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.predicted} predicted, {self.errors} errors, {self.skipped} already in "
                f"{self.out.name}; {self.images_per_s:.1f} images/s over {self.workers} "
                f"worker(s), {self.elapsed_s:.1f} s, model {self.version}")


def classify(loaded: LoadedModel, images: Sequence[Image.Image], top_k: int,
             device: torch.device | str = "cpu") -> list[list[tuple[str, float]]]:
    """RGB images -> per image its top-k (label, softmax probability), best first; one forward
    pass of `loaded.model` on `loaded.preset` of each image ((N, 3, crop, crop) float32,
    normalised). `top_k` is capped at the number of classes."""
    if not images:
        return []
    batch = torch.stack([loaded.preset(img) for img in images]).to(device)
    with torch.inference_mode():
        probs = torch.softmax(loaded.model(batch).float(), dim=1)
    k = max(1, min(top_k, len(loaded.classes)))
    scores, indices = probs.topk(k, dim=1)
    return [[(loaded.classes[i], float(s)) for i, s in zip(row_i, row_s, strict=True)]
            for row_i, row_s in zip(indices.tolist(), scores.tolist(), strict=True)]


def error_record(path: str, version: str, exc: BaseException) -> dict[str, Any]:
    code = exc.code if isinstance(exc, DomainError) else "unreadable_file"
    return {"path": path, "version": version,
            "error": {"code": code, "message": str(exc) or type(exc).__name__}}


class VersionPredictor:
    """The Ray Data callable class: one per actor, the version loaded once in `__init__`.

    Batch in: {"path": array of paths relative to `folder`}. Batch out: {"path", "record" (one
    JSON object per path), "worker" (this actor's id)}."""

    def __init__(self, home: str, version: str, folder: str, top_k: int, device: str,
                 threads: int, max_pixels: int, max_file_bytes: int):
        torch.set_num_threads(threads)  # before the load: ONNX Runtime's session takes it too
        self.device = torch.device(device)
        self.loaded = Registry(home).load(version, device=self.device)
        self.folder = Path(folder)
        self.top_k, self.max_pixels, self.max_file_bytes = top_k, max_pixels, max_file_bytes
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def _read(self, rel: str) -> Image.Image:
        path = self.folder / rel
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise ImageTooLarge(f"file is {size} bytes; the limit is {self.max_file_bytes}")
        return decode_image(path.read_bytes(), self.max_pixels,
                            draft_size=self.loaded.preset.resize)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        version = self.loaded.version
        records: list[dict[str, Any] | None] = [None] * len(paths)
        images, slots = [], []
        for i, rel in enumerate(paths):
            try:
                images.append(self._read(rel))
                slots.append(i)
            except (ImageError, OSError) as exc:
                records[i] = error_record(rel, version, exc)
        for i, top in zip(slots, classify(self.loaded, images, self.top_k, self.device),
                          strict=True):
            records[i] = {"path": paths[i], "label": top[0][0], "score": top[0][1],
                          "top_k": [{"label": lb, "score": s} for lb, s in top],
                          "version": version}
        return {"path": np.array(paths, dtype=object),
                "record": np.array([json.dumps(r) for r in records], dtype=object),
                "worker": np.array([self.worker] * len(paths), dtype=object)}


# -- the folder and the output file ---------------------------------------------------------------

def list_files(folder: Path, exclude: Path | None = None, confine: Path | None = None
               ) -> list[str]:
    """Every regular file under `folder` (recursively; names starting with '.' and what is
    under such folders skipped; `exclude` left out; with `confine`, a file whose real path is
    outside that folder, a symlink out, left out too), as sorted POSIX paths relative to
    `folder`."""
    root = confine.resolve() if confine is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if exclude is not None and path.resolve() == exclude:
                continue
            if root is not None and not path.resolve().is_relative_to(root):
                log.warning("%s: a link out of %s, left out", path, root)
                continue
            if path.is_file():
                out.append(path.relative_to(folder).as_posix())
    return sorted(out)


def output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise InvalidBatchRequest(f"output {out.name!r}: the extension says the format; use .jsonl "
                              "or .csv")


def _cut_unfinished_line(out: Path) -> None:
    """A kill mid-write can leave a last line without its newline: cut it, so the file holds
    whole lines only and that path is predicted again."""
    with open(out, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)
    log.warning("%s: cut an unfinished last line (a run was interrupted)", out)


def read_done(out: Path, fmt: str) -> tuple[set[str], set[str]]:
    """-> (paths the output already has a line for, versions named in it)."""
    done: set[str] = set()
    versions: set[str] = set()
    if not out.exists():
        return done, versions
    _cut_unfinished_line(out)
    with open(out, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            rows: Iterator[dict[str, Any]] = csv.DictReader(f)
        else:
            rows = (json.loads(line) for line in f if line.strip())
        try:
            for row in rows:
                done.add(str(row["path"]))
                if row.get("version"):
                    versions.add(str(row["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidBatchRequest(f"{out} exists but is not a predict-dir output "
                                      f"({type(exc).__name__}: {exc}); choose another --out"
                                      ) from None
    return done, versions


def whole_lines(out: Path, chunk_bytes: int = 1 << 16) -> Iterator[bytes]:
    """The bytes of `out` up to its last newline as it is now, in chunks: what a reader may
    take of a file a run is still appending to (a line being written is left out)."""
    if not out.exists():
        return
    with open(out, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(0)
        held = b""
        while end > 0:
            data = f.read(min(chunk_bytes, end))
            if not data:
                break
            end -= len(data)
            data = held + data
            nl = data.rfind(b"\n")
            held = data[nl + 1:]
            if nl >= 0:
                yield data[:nl + 1]


@dataclass
class OutputCounts:
    """The whole lines of an output: `lines` records, of which `errors` are error lines
    (`error_codes`: how many of each code)."""

    lines: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)

    @property
    def predicted(self) -> int:
        return self.lines - self.errors


def count_output(out: Path, fmt: str) -> OutputCounts:
    """Count the records of an output (whole lines only; the file is not changed)."""
    counts = OutputCounts()
    lines = (line for chunk in whole_lines(out)  # each chunk ends a line: decoded alone
             for line in chunk.decode("utf-8", errors="replace").splitlines(keepends=True))
    if fmt == "csv":
        rows: Iterator[dict[str, Any]] = csv.DictReader(lines)
        errors: Iterator[Any] = (json.loads(r["error"]) if r.get("error") else None
                                 for r in rows)
    else:
        errors = (json.loads(line).get("error") for line in lines if line.strip())
    for error in errors:
        counts.lines += 1
        if error:
            counts.errors += 1
            code = str(error.get("code", "error"))
            counts.error_codes[code] = counts.error_codes.get(code, 0) + 1
    return counts


def _csv_line(record: dict[str, Any]) -> str:
    buf = io.StringIO()
    row = {k: record.get(k, "") for k in CSV_COLUMNS}
    for k in ("top_k", "error"):
        row[k] = json.dumps(record[k]) if k in record else ""
    csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n").writerow(row)
    return buf.getvalue()


class OutputWriter:
    """Appends whole lines: each batch with one write, then fsync (see the module docstring)."""

    def __init__(self, out: Path, fmt: str):
        self.fmt = fmt
        new = not out.exists() or out.stat().st_size == 0
        self.fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new and fmt == "csv":
            self._write(",".join(CSV_COLUMNS) + "\n")

    def _write(self, text: str) -> None:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        if self.fmt == "csv":
            self._write("".join(_csv_line(r) for r in records))
        else:
            self._write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def close(self) -> None:
        os.close(self.fd)


# -- the run ------------------------------------------------------------------------------------

def resolve_version(registry: Registry, version: str | None) -> str:
    if version is None:
        current = registry.current()
        if current is None:
            raise NoCurrentVersion("no version is current and none was named; train or "
                                   "activate one, or pass a version")
        return current
    registry.version_dir(version)  # VersionNotFound (404) for one that is not there
    return version


def cluster_workers(gpu: bool) -> int:
    """Actors the cluster can run at once: its GPUs (gpu) or its logical CPUs, at least 1."""
    import ray

    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU" if gpu else "CPU", 0)))


def predict_dir(home: Path | str, folder: Path | str, out: Path | str,
                version: str | None = None, workers: int | None = None, *,
                gpu: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                top_k: int = DEFAULT_TOP_K, threads: int = 1,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, progress: bool = True,
                on_start: Callable[[BatchReport], None] | None = None,
                on_batch: Callable[[int], None] | None = None,
                confine: Path | None = None) -> BatchReport:
    """Classify every file under `folder` with `version` (default: CURRENT) into `out`
    (.jsonl or .csv), on `workers` Ray Data actors (default: every CPU of the cluster, or
    every GPU with `gpu`). Ray must be initialised by the caller, or a local cluster is
    started. `threads`: torch (and ONNX Runtime) threads per actor. `on_start(report)`: called
    once the folder is listed and the output read (`files`, `skipped`, `version` set), before
    any Ray work; `on_batch(n)`: called after each batch of n lines is on disk; either may
    raise to stop the run (the lines on disk stay whole). `confine`: files whose real path
    (symlinks followed) is outside it are left out (`list_files`). -> BatchReport.

    Raises InvalidBatchRequest (400: no such folder, bad extension or numbers, an `out` that
    is not a predict-dir output), VersionNotFound (404), NoCurrentVersion (409),
    OutputVersionMismatch (409)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    start = time.perf_counter()
    home, folder, out = Path(home).resolve(), Path(folder).resolve(), Path(out).resolve()
    if not folder.is_dir():
        raise InvalidBatchRequest(f"{folder} is not a directory")
    for name, value in (("batch_size", batch_size), ("top_k", top_k), ("threads", threads)):
        if value < 1:
            raise InvalidBatchRequest(f"{name} must be at least 1, not {value}")
    if workers is not None and workers < 1:
        raise InvalidBatchRequest(f"workers must be at least 1, not {workers}")
    fmt = output_format(out)
    registry = Registry(home)
    resolved = resolve_version(registry, version)
    done, versions = read_done(out, fmt)
    if versions - {resolved}:
        raise OutputVersionMismatch(
            f"{out.name} was started with model {sorted(versions)[0]}, not {resolved}: pass "
            f"version {sorted(versions)[0]!r} to finish it, or write to another file")
    files = list_files(folder, exclude=out, confine=confine)
    todo = [p for p in files if p not in done]
    report = BatchReport(out=out, version=resolved, files=len(files),
                         skipped=len(files) - len(todo))
    if on_start is not None:
        on_start(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = OutputWriter(out, fmt)
    try:
        if todo:
            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
            n_workers = workers or cluster_workers(gpu)
            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ds: Any = ray.data.from_items([{"path": p} for p in todo],
                                     override_num_blocks=max(1, min(len(todo) // batch_size,
                                                                    n_workers * 8)))
            resources: dict[str, Any] = {"num_gpus": 1} if gpu else {"num_cpus": threads}
            ds = ds.map_batches(
                VersionPredictor, batch_size=batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=n_workers),
                fn_constructor_kwargs={
                    "home": str(home), "version": resolved, "folder": str(folder),
                    "top_k": top_k, "device": "cuda" if gpu else "cpu", "threads": threads,
                    "max_pixels": max_pixels, "max_file_bytes": max_file_bytes},
                udf_modifying_row_count=False, **resources)
            report = _consume(ds, writer, report, len(todo), progress, on_batch)
    finally:
        writer.close()
    report.elapsed_s = time.perf_counter() - start
    new = report.predicted + report.errors
    report.images_per_s = new / report.elapsed_s if report.elapsed_s > 0 else 0.0
    log.info("predict-dir: %s", report.summary())
    return report


def _consume(ds: Any, writer: OutputWriter, report: BatchReport, total: int, progress: bool,
             on_batch: Callable[[int], None] | None) -> BatchReport:
    from tqdm import tqdm

    workers: set[str] = set()
    with tqdm(total=total, unit="img", disable=not progress, desc="predict-dir") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            records = [json.loads(r) for r in batch["record"]]
            writer.write(records)
            workers.update(str(w) for w in batch["worker"])
            for r in records:
                if "error" in r:
                    report.errors += 1
                    code = r["error"]["code"]
                    report.error_codes[code] = report.error_codes.get(code, 0) + 1
                else:
                    report.predicted += 1
            bar.update(len(records))
            if on_batch is not None:
                on_batch(len(records))
    report.workers = len(workers)
    return report
