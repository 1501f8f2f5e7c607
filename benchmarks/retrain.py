"""Time to a new model: from `POST /v1/train` to the first predict the new version answers,
stage by stage, on the real service.

    python -m benchmarks.retrain [--quick] [--images 300] [--epochs 3] [--no-baseline]

What runs: a local Ray cluster and the whole service (`tests.support.service.start_service`,
as `benchmarks.serving` does) on a temporary volume; ~300 generated images in 3 classes
(`tests.support.images.labelled_set`, 128 px JPEGs) labelled through `POST /v1/labels`; then
one `POST /v1/train` (feature-extract without augmentation, so the head trains on cached
backbone features; `--epochs` epochs, 1 worker) while a client polls
`GET /v1/train/{id}` every 0.1 s and, once the job has ended, `POST /v1/predict` until the
answer names the new version. Every label is new to this volume, so the backbone runs on every
image once (a first retrain with an empty feature cache: the slowest case of this path).

Stages, in order, each the seconds from the previous one:
- submit: the POST answered;
- started: the record `running` (the job lock taken, the dataset snapshot made);
- workers ready: where the training code first ran (`workers` in the record; under Ray Train
  the worker group has started);
- epochs: the first and the last epoch's metrics in the record (the first includes computing
  the backbone features of every image);
- published: the record `succeeded` (evaluation on the test split, calibration, the engine
  choice, the manifest, the gate and the promotion);
- answered: the first predict answered by the new version (the replicas' reload).
Where the record also lists `stages` (name and time of each step, written by the job), they
are reported as they are.

The baseline is the same measurement of the tree at HEAD (`git archive HEAD`, run with this
interpreter in a subprocess before the working tree's run): one run, two trees, the same
machine and images. `--no-baseline` measures the working tree only. `--quick`: 90 images.
A full run takes about 4 minutes on 2 cores (the HEAD tree's job is the slow half).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red", "green", "blue"]
POLL_S = 0.1


def measure(images: int, epochs: int) -> dict[str, Any]:
    """One timed retrain on a fresh volume in this process's tree -> the timeline."""
    import ray

    from service.app import serve_environment
    from tests.support.images import labelled_set
    from tests.support.service import start_service

    serve_environment()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            svc = start_service(Path(tmp) / "home")
            with svc.client(timeout=120) as c:
                per_label = max(1, images // len(CLASSES))
                pairs = labelled_set(CLASSES, per_label, size=128, fmt="JPEG", seed=7)
                for label in CLASSES:
                    files = [("files", (f"{label}{i}.jpg", data, "image/jpeg"))
                             for i, (lab, data) in enumerate(pairs) if lab == label]
                    for k in range(0, len(files), 50):
                        r = c.post("/v1/labels", data={"label": label}, files=files[k:k + 50])
                        r.raise_for_status()
                probe = pairs[0][1]
                before = c.post("/v1/predict", files=[("files", ("p.jpg", probe,
                                                                 "image/jpeg"))])
                before.raise_for_status()
                old_version = before.json()["model_version"]
                return _timed_job(c, probe, old_version, epochs)
    finally:
        ray.shutdown()


def _timed_job(c: Any, probe: bytes, old_version: str, epochs: int) -> dict[str, Any]:
    """POST /v1/train, then poll; -> marks (seconds after the POST was sent) and the record."""
    t0 = time.perf_counter()
    r = c.post("/v1/train", json={"strategy": "feature-extract", "augment": False,
                                  "epochs": epochs, "workers": 1})
    r.raise_for_status()
    marks: dict[str, float] = {"submit": time.perf_counter() - t0}
    job_id = r.json()["job_id"]
    posted_at = time.time() - marks["submit"]
    progress_seen: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    while True:
        record = c.get(f"/v1/train/{job_id}").json()
        now = time.perf_counter() - t0
        if record["status"] != "queued":
            marks.setdefault("started", now)
        if record.get("workers"):
            marks.setdefault("workers ready", now)
        n = len(record.get("metrics") or [])
        if n >= 1:
            marks.setdefault("first epoch", now)
        if n >= epochs:
            marks.setdefault("last epoch", now)
        p = record.get("progress") or {}
        seen = {"t": round(now, 2), "stage": record.get("stage"), "epoch": p.get("epoch"),
                "fraction": p.get("fraction"), "status": record["status"]}
        if not progress_seen or {k: v for k, v in seen.items() if k != "t"} != \
                {k: v for k, v in progress_seen[-1].items() if k != "t"}:
            progress_seen.append(seen)
        if record["status"] not in ("queued", "running"):
            marks["published"] = now
            break
        if now > 900:
            raise TimeoutError(f"job {job_id} still {record['status']} after 900 s")
        time.sleep(POLL_S)
    if record["status"] != "succeeded" or not record.get("promoted"):
        raise RuntimeError(f"job {job_id} ended {record['status']} "
                           f"({record.get('reason')}; {record.get('error')})")
    while True:
        a = c.post("/v1/predict", files=[("files", ("p.jpg", probe, "image/jpeg"))])
        now = time.perf_counter() - t0
        if a.status_code == 200 and a.json()["model_version"] == record["version"]:
            marks["answered"] = now
            break
        if now > 900:
            raise TimeoutError("the new version never answered")
        time.sleep(POLL_S)
    stages = [{"stage": s["stage"], "at_s": round(float(s["at"]) - posted_at, 2)}
              for s in record.get("stages") or []]
    return {"marks": {k: round(v, 2) for k, v in marks.items()}, "stages": stages,
            "progress_seen": progress_seen, "old_version": old_version,
            "version": record["version"], "val_accuracy": record.get("val_accuracy"),
            "test_accuracy": record.get("test_accuracy"),
            "runner": record.get("runner"), "job_id": job_id}


ORDER = ["submit", "started", "workers ready", "first epoch", "last epoch", "published",
         "answered"]


def _rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    marks = result["marks"]
    rows, prev = [], 0.0
    for stage in ORDER:
        if stage not in marks:
            continue
        rows.append({"tree": name, "stage": stage, "at_s": marks[stage],
                     "stage_s": round(marks[stage] - prev, 2)})
        prev = marks[stage]
    return rows


def head_tree(dest: Path) -> str:
    """The tree at HEAD unpacked into `dest` (`git archive`, which changes nothing in the
    repository) -> its commit."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = dest / "head.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                       stdout=f)
    with tarfile.open(archive) as t:
        t.extractall(dest / "tree", filter="data")
    return commit


def run_tree(tree: Path, images: int, epochs: int) -> dict[str, Any]:
    """`measure` in a subprocess whose imports come from `tree`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        # -P: not this script's folder first on sys.path (its training.py would shadow the
        # package of the same name)
        subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--measure", out.name,
                        "--images", str(images), "--epochs", str(epochs)],
                       cwd=tree, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="90 images")
    ap.add_argument("--no-baseline", action="store_true",
                    help="measure the working tree only, not the tree at HEAD")
    ap.add_argument("--baseline-from", metavar="FILE",
                    help="the HEAD tree's timeline from an earlier run (the JSON a --measure "
                         "of that tree wrote, with its `commit`) instead of measuring it now")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one tree's run -> FILE
    args = ap.parse_args()
    images = 90 if args.quick else args.images
    if args.measure:
        Path(args.measure).write_text(json.dumps(measure(images, args.epochs)))
        return

    from benchmarks.common import write_results

    results: dict[str, Any] = {"images": images, "epochs": args.epochs, "classes": CLASSES}
    rows: list[dict[str, Any]] = []
    if args.baseline_from:
        results["baseline"] = {**json.loads(Path(args.baseline_from).read_text()),
                               "measured": "in an earlier run of this benchmark"}
        rows += _rows(f"HEAD {results['baseline']['commit'][:7]}", results["baseline"])
    elif not args.no_baseline:
        with tempfile.TemporaryDirectory() as tmp:
            commit = head_tree(Path(tmp))
            results["baseline"] = {"commit": commit,
                                   **run_tree(Path(tmp) / "tree", images, args.epochs)}
        rows += _rows(f"HEAD {commit[:7]}", results["baseline"])
    results["current"] = run_tree(ROOT, images, args.epochs)
    rows += _rows("working tree", results["current"])
    total = results["current"]["marks"]["answered"]
    notes = [f"{images} labelled images (128 px JPEG) in {len(CLASSES)} classes, all new to the "
             f"volume (every backbone feature computed in the job); feature-extract without "
             f"augmentation (cached features), "
             f"{args.epochs} epochs, 1 worker; efficientnet_lite0",
             f"working tree: {total} s from POST /v1/train to the new version answering "
             f"(runner: {results['current'].get('runner') or 'n/a'})"]
    if "baseline" in results:
        base = results["baseline"]["marks"]["answered"]
        when = results["baseline"].get("measured", "in the same run")
        notes.append(f"HEAD ({results['baseline']['commit'][:7]}): {base} s, measured {when}"
                     f": {base / max(total, 1e-9):.1f}x the working tree's time")
    if results["current"]["stages"]:
        notes.append("the job's own stages (seconds after the POST): " + ", ".join(
            f"{s['stage']} {s['at_s']}" for s in results["current"]["stages"]))
    notes.append("a shared 2-core machine: figures vary by a few seconds between runs")
    write_results("retrain", results, rows, notes)


if __name__ == "__main__":
    main()
