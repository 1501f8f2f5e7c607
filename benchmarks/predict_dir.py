"""predict-dir (Ray Data) against the served path, on the same images in the same run.

    python -m benchmarks.predict_dir [--images 512] [--quick]

Everything on this machine: one local Ray cluster with all cores, the real service
(`tests.support.service.start_service`: efficientnet_lite0 v0, with the engine publishing chose)
and a folder of 640x480 photo-like JPEGs written to disk. In order:
1. served: `POST /v1/predict` over real HTTP, one image per request, 16 concurrent keep-alive
   clients (the load generator of `benchmarks.serving`), every image once, with the best served
   layout that benchmark measured on 2 cores (one replica per core x 1 thread, batch <= 8);
2. the service is stopped, then `predict_dir` classifies the same folder with one Ray Data
   actor per core (1 thread each, batches of 16) into a JSONL file.
Figures: images/s of each; for predict-dir both over the whole call (actor start-up and model
loads included) and in steady state (from the first batch written to the last); ratio =
predict-dir / served. (That the two paths give the same answers is tests/training/test_batch.py's
job, not this benchmark's.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import photo_jpegs, write_results
from benchmarks.serving import load
from service.app import serve_environment
from tests.support.service import start_service
from training.batch import predict_dir


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="128 images")
    args = ap.parse_args(argv)
    n = 128 if args.quick else args.images
    cpus = os.cpu_count() or 1
    import ray

    from service.cli import stop_serve

    jpegs = photo_jpegs(n, seed=11)
    serve_environment()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "photos"
            folder.mkdir()
            for i, data in enumerate(jpegs):
                (folder / f"{i:05d}.jpg").write_bytes(data)
            home = Path(tmp) / "home"
            service = start_service(home, classifier_replicas=cpus, classifier_threads=1,
                                    max_batch_size=8)
            served = load(service.url, jpegs, 16, requests=n)
            stop_serve()

            times: list[float] = []
            out = Path(tmp) / "preds.jsonl"
            report = predict_dir(home, folder, out, workers=cpus, threads=1, batch_size=16,
                                 progress=False, on_batch=lambda _: times.append(
                                     time.perf_counter()))
            records = [json.loads(line) for line in out.read_text().splitlines()]
            assert report.predicted == n and report.errors == 0, report
            first_batch = min(16, n)
            steady = ((n - first_batch) / (times[-1] - times[0])
                      if len(times) > 1 and times[-1] > times[0] else float("nan"))
            versions = {r["version"] for r in records}
    finally:
        ray.shutdown()
    served_ips = served["images_per_s"]
    table: list[dict[str, Any]] = [
        {"path": "served: POST /v1/predict, 16 clients, 1 image/request",
         "layout": f"{cpus} replicas x 1 thread, batch <= 8", "images": n,
         "images_per_s": round(served_ips, 1), "ratio": 1.0, "failed": served["failed"]},
        {"path": "predict-dir (Ray Data), whole call", "layout": f"{cpus} actors x 1 thread, "
         "batch 16", "images": n, "images_per_s": round(report.images_per_s, 1),
         "ratio": round(report.images_per_s / served_ips, 2), "failed": report.errors},
        {"path": "predict-dir (Ray Data), steady state", "layout": f"{cpus} actors x 1 thread, "
         "batch 16", "images": n - first_batch, "images_per_s": round(steady, 1),
         "ratio": round(steady / served_ips, 2), "failed": 0},
    ]
    write_results("predict_dir", {"images": n, "served": served,
                                  "predict_dir": {k: v for k, v in vars(report).items()
                                                  if k != "out"},
                                  "steady_images_per_s": steady, "versions": sorted(versions)},
                  table, notes=[
                      f"same {n} photo-like 640x480 JPEGs, same machine ({cpus} cores), same "
                      f"model version {sorted(versions)}; the load generator shares the cores",
                      "whole call: actor start-up and one model load per actor included "
                      f"({report.elapsed_s:.1f} s in all)"])


if __name__ == "__main__":
    main()
