"""Training speed: Ray Train vs the plain PyTorch loop, JPEG vs pre-decoded input, and the
feature cache for feature-extract retrains.

    python -m benchmarks.training [--images 96] [--size 160] [--skip-ray]

Sections (each baseline measured in this run; ratio = candidate / baseline):
1. ray-vs-plain: finetune efficientnet_lite0, the plain loop (1 process, all cores as torch
   threads) vs Ray Train with N CPU workers x 1 thread, same data, model and global batch
   (16 // N per worker); images/s over the epochs after the first; Ray's startup (ray.init,
   worker group) reported separately.
2. input: the plain loop reading JPEG files every epoch vs pre-decoded images held in memory
   (both still augment): is decoding the bottleneck?
3. feature-cache: a 5-epoch feature-extract retrain after 10% new images: cached features
   (backbone runs on the new 10% only) vs the backbone on every image every epoch; time and
   best val accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmarks.common import write_results
from tests.support.images import encode, noisy_picture
from training.config import TrainConfig
from training.dataset import DatasetStore
from training.engine import (
    build_optimizer,
    build_scheduler,
    fit_plain,
    make_datasets,
    prepare_model,
    train_one_epoch,
)
from training.features import FeatureCache, compute_features, feature_key
from training.model import head_module, split_head, weights_origin
from training.presets import EvalPreset

BACKBONE = "efficientnet_lite0"
COLOURS = [(200, 40, 40), (40, 40, 200), (40, 180, 40), (220, 220, 40)]


def make_store(home: Path, n: int, size: int, seed: int = 0) -> DatasetStore:
    store = DatasetStore(home)
    for i in range(n):
        k = i % len(COLOURS)
        store.ingest(encode(noisy_picture(COLOURS[k], seed * 10**6 + i, size), "JPEG",
                            quality=90), f"c{k}")
    return store


def samples(store: DatasetStore) -> tuple[list, list, list[str]]:
    classes = sorted(store.counts())
    idx = {c: i for i, c in enumerate(classes)}
    splits = store.split()  # the benchmark trains on train and measures on val, as jobs do
    train, val = splits.train, splits.val
    return ([(str(i.path), idx[i.label]) for i in train],
            [(str(i.path), idx[i.label]) for i in val], classes)


def plain_images_per_s(train: list, val: list, n_classes: int, cfg: TrainConfig,
                       predecoded: bool = False) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    tr_ds: Dataset[Any]
    tr_ds, _, _ = make_datasets(train, val, cfg)
    if predecoded:
        tr_ds = _InMemory(tr_ds)
    model, bb, head = prepare_model(cfg, BACKBONE, n_classes)
    crit = nn.CrossEntropyLoss()
    opt = build_optimizer(bb, head, cfg)
    loader = DataLoader(tr_ds, batch_size=cfg.batch_size, shuffle=True)
    sched = build_scheduler(opt, 0, cfg.epochs * len(loader))
    rates = []
    for _ in range(cfg.epochs):
        st = train_one_epoch(model, loader, crit, opt, sched, torch.device("cpu"))
        rates.append(st.count / st.seconds)
    return sum(rates[1:]) / len(rates[1:])  # the first epoch warms up


class _InMemory(Dataset):
    """Decoded RGB images kept in memory; the (random) transform still runs per access."""

    def __init__(self, ds: Any):
        from training.imageio import decode_image

        self.transform = ds.transform
        self.items = [(decode_image(Path(p).read_bytes(), draft_size=ds.draft_size), y)
                      for p, y in ds.samples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, y = self.items[i]
        return self.transform(img), y


def ray_section(home: Path, cfg: TrainConfig, workers: int) -> dict[str, Any]:
    import ray

    from training.pipeline import run_job

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        # The same global batch as the plain loop: `batch_size` is per worker in Ray Train.
        rec = run_job(home, cfg.model_copy(update={
            "workers": workers, "threads": 1,
            "batch_size": max(1, cfg.batch_size // workers)}))
        job_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    if rec["status"] != "succeeded":
        raise RuntimeError(f"ray job failed: {rec.get('error')}")
    rates = [m["train_images_per_s"] for m in rec["metrics"]][1:]
    epoch_s = sum(m["epoch_seconds"] for m in rec["metrics"])
    return {"images_per_s": sum(rates) / len(rates), "ray_init_s": init_s, "job_s": job_s,
            "epochs_s": epoch_s}


def feature_cache_section(home: Path, size: int, n: int, epochs: int = 5) -> list[dict]:
    """Retrain after 10% new images: cached features vs the backbone every epoch."""
    torch.set_num_threads(os.cpu_count() or 1)
    store = make_store(home, n, size, seed=1)
    cfg = TrainConfig(strategy="feature-extract", augment=False, epochs=epochs,
                      batch_size=32, lr=0.05, image_size=size, warmup_epochs=0)
    preset = EvalPreset.for_size(cfg.image_size)
    cache = FeatureCache(home / "cache", feature_key(BACKBONE, weights_origin(BACKBONE), preset))
    model, _, _ = prepare_model(cfg, BACKBONE, 4)
    extractor, _ = split_head(model)
    # Earlier retrains cached the first 90%.
    items = store.items()
    old = items[: int(len(items) * 0.9)]
    compute_features(extractor, [(i.sha256, i.path) for i in old], preset, cache,
                     torch.device("cpu"))
    train, val, _ = samples(store)
    sha_of = {str(i.path): i.sha256 for i in items}

    # Cached: features for the new images, then the head alone for `epochs` epochs.
    t = time.perf_counter()
    missing = cache.missing([i.sha256 for i in items])
    compute_features(extractor, [(s, store.find(s).path) for s in missing],  # type: ignore
                     preset, cache, torch.device("cpu"))
    xt = cache.get_many([sha_of[p] for p, _ in train])
    xv = cache.get_many([sha_of[p] for p, _ in val])
    yt = torch.tensor([y for _, y in train])
    yv = torch.tensor([y for _, y in val])
    torch.manual_seed(0)
    head_model = head_module(model)
    cached = fit_plain(head_model, [], list(head_model.parameters()),
                       DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
                       DataLoader(TensorDataset(xv, yv), batch_size=64), cfg, 4,
                       torch.device("cpu"))
    cached_s = time.perf_counter() - t

    # Uncached: the frozen backbone over every image, every epoch.
    t = time.perf_counter()
    torch.manual_seed(0)
    full, bb, head = prepare_model(cfg, BACKBONE, 4)
    tr_ds, va_ds, _ = make_datasets(train, val, cfg)
    plain = fit_plain(full, bb, head, DataLoader(tr_ds, batch_size=32, shuffle=True),
                      DataLoader(va_ds, batch_size=64), cfg, 4, torch.device("cpu"))
    plain_s = time.perf_counter() - t
    return [
        {"section": "feature-cache", "variant": "backbone every image every epoch",
         "seconds": round(plain_s, 1), "best_val_accuracy": round(plain.best_val_accuracy, 3),
         "ratio": 1.0},
        {"section": "feature-cache", "variant": f"cached features ({len(missing)} new)",
         "seconds": round(cached_s, 1), "best_val_accuracy": round(cached.best_val_accuracy, 3),
         "ratio": round(plain_s / cached_s, 1)},
    ]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--size", type=int, default=160, help="image_size (crop)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args(argv)
    cpus = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = make_store(home, args.images, 320)
        train, val, classes = samples(store)
        cfg = TrainConfig(backbone=BACKBONE, strategy="finetune", epochs=args.epochs,
                          batch_size=16, image_size=args.size, lr=0.01)
        plain = plain_images_per_s(train, val, len(classes), cfg)
        rows.append({"section": "ray-vs-plain", "variant": f"plain loop, 1 x {cpus} threads",
                     "images_per_s": round(plain, 1), "ratio": 1.0})
        if not args.skip_ray:
            ray_res = ray_section(home, cfg, cpus)
            results["ray"] = ray_res
            rows.append({"section": "ray-vs-plain",
                         "variant": f"Ray Train, {cpus} workers x 1 thread, "
                                    f"batch {max(1, 16 // cpus)} each",
                         "images_per_s": round(ray_res["images_per_s"], 1),
                         "ratio": round(ray_res["images_per_s"] / plain, 2),
                         "startup_s": round(ray_res["ray_init_s"], 1),
                         "job_overhead_s": round(ray_res["job_s"] - ray_res["epochs_s"], 1)})
        pre = plain_images_per_s(train, val, len(classes), cfg, predecoded=True)
        rows.append({"section": "input", "variant": "JPEG files, decoded every epoch",
                     "images_per_s": round(plain, 1), "ratio": 1.0})
        rows.append({"section": "input", "variant": "pre-decoded images in memory",
                     "images_per_s": round(pre, 1), "ratio": round(pre / plain, 2)})
        rows += feature_cache_section(Path(tmp) / "fc", args.size, max(args.images * 2, 200))
    write_results("training", results, rows, [
        f"finetune {BACKBONE} at {args.size}px, batch 16, {args.images} 320px JPEGs; "
        "images/s averaged over epochs 2..N",
        "Ray startup (ray.init) and job overhead (worker group start, publish, evaluation) are "
        "reported separately, not in images/s",
    ])


if __name__ == "__main__":
    main()
