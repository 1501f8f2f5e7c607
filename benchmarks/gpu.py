"""GPU benchmark: the product's own training loop and the served classifier, with no Ray.

    bash benchmarks/gpu.sh                  on the GPU machine (PyTorch there, no Ray)
    python -m benchmarks.gpu --smoke        a dry run anywhere; without CUDA it says so and
                                            runs on the CPU under gloo, at toy sizes

1. Training: `training.loop.run_worker`, the body every Ray Train worker runs, under
   `training.distributed.TorchSession` in a real process group: NCCL on a GPU (world size 1:
   NCCL refuses two ranks on one GPU, and one rank already rejects a CPU tensor), gloo
   without one. resnet18, random init (no model hub there), 224 px, finetune, on shapes
   (4 classes: disc, box, triangle, cross; random colours, sizes, places, noise) written as
   JPEGs to a temporary folder. Two settings, both through that loop:
   - `tutorial`: PyTorch's transfer-learning tutorial's setting (batch 4, SGD lr 0.001 and
     momentum 0.9 on every layer, fp32, no label smoothing, 4 loader workers; its StepLR is
     our cosine schedule);
   - `product`: the product's GPU defaults (AMP: bf16, or fp16 with a GradScaler;
     channels_last; pinned memory; loader workers by core count) at batch 128.
   Reported per setting: train images/s (epochs after the first: the first pays for cuDNN's
   search and the loader processes' start), seconds from the loop's start until the
   validation accuracy first reaches the target (validation and checkpoints included), best
   validation accuracy, epochs run. A setting stops at its time budget through the product's
   own cancel file, as `DELETE /v1/train/{id}` does.
2. Serving: the model the product setting trained, published as a version in a temporary
   registry, served by `service.classifier.Classifier` on the same device: `predict_bytes`
   (JPEG decode + preprocessing on the CPU + forward, what `@serve.batch` hands a replica)
   at batch 1, 8, 32 and 64, and the model alone in fp32 and in AMP + channels_last.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from benchmarks.common import write_results

log = logging.getLogger("benchmarks.gpu")

CLASSES = ("box", "cross", "disc", "triangle")
TARGET_ACCURACY = 0.9


@dataclass(frozen=True)
class Sizes:
    """One run's scale: images per class (train, val), crop size, epochs, seconds per
    setting."""

    train_per_class: int
    val_per_class: int
    image_size: int
    product_epochs: int
    tutorial_epochs: int
    budget_s: float
    product_batch: int


FULL = Sizes(1500, 100, 224, 15, 6, 150.0, 128)
SMOKE = Sizes(8, 4, 64, 2, 1, 120.0, 8)


def shape_jpeg(kind: str, seed: int, side: int) -> bytes:
    """One side x side JPEG: a `kind` shape of random colour, size and place on a noisy
    gradient background of another brightness (so the shape, not the colour, is the class)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = rng.uniform(30, 225, 3)
    bg = base + rng.uniform(-30, 30, 3) * xx[..., None] + rng.uniform(-30, 30, 3) * yy[..., None]
    img = Image.fromarray(np.clip(bg + rng.normal(0, 8, bg.shape), 0, 255).astype(np.uint8))
    colour = rng.integers(0, 256, 3)
    while abs(float(colour.mean()) - float(base.mean())) < 70:
        colour = rng.integers(0, 256, 3)
    fill = tuple(int(c) for c in colour)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.38) * side
    cx, cy = rng.uniform(r, side - r, 2)
    if kind == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "box":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_one(job: tuple[Path, int, str, int, int]) -> tuple[str, int, str]:
    folder, label, kind, seed, side = job
    data = shape_jpeg(kind, seed, side)
    sha = hashlib.sha256(data).hexdigest()
    path = folder / f"{sha}.jpg"
    path.write_bytes(data)
    return str(path), label, sha


def write_shapes(folder: Path, per_class: int, side: int, seed: int) -> list[Any]:
    """-> training.loop.Sample per image written (labels index CLASSES); one process per
    core draws and encodes them."""
    from concurrent.futures import ProcessPoolExecutor

    from training.loop import Sample

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, label, kind, seed * 1_000_003 + label * 100_000 + i, side)
            for label, kind in enumerate(CLASSES) for i in range(per_class)]
    with ProcessPoolExecutor() as pool:
        done = list(pool.map(_write_one, jobs, chunksize=64))
    return [Sample(Path(path), label, sha) for path, label, sha in done]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class SettingResult:
    row: dict[str, Any]  # the table's row
    curve: list[dict[str, Any]]  # per epoch: seconds since the start, accuracies, images/s
    checkpoint: Path | None  # the last checkpoint's file


def train_setting(name: str, overrides: dict[str, Any], sizes: Sizes, data: tuple[list, list],
                  work: Path, device: torch.device) -> SettingResult:
    """Run the product's loop once, under `TorchSession` in the process group of `main`."""
    from training.config import TrainConfig
    from training.distributed import TorchSession
    from training.engine import precision_for
    from training.loop import CHECKPOINT_FILE, LoopConfig, run_worker
    from training.presets import EvalPreset

    cfg = TrainConfig(**{"backbone": "resnet18", "strategy": "finetune",
                         "image_size": sizes.image_size, **overrides})
    folder = work / name
    folder.mkdir()
    loop = LoopConfig(
        train_config=cfg, classes=CLASSES, train_samples=tuple(data[0]),
        val_samples=tuple(data[1]), preset=EvalPreset.for_size(sizes.image_size),
        feature_key=f"resnet18-random-{sizes.image_size}", feature_cache_root=folder / "cache",
        torch_cache_dir=folder / "torch", cancel_path=folder / "cancel",
        progress_path=folder / "progress.json", pretrained=False)
    session = TorchSession(folder / "run", device)
    # The budget ends a setting the way a user's cancel does: every rank stops at a step.
    timer = threading.Timer(sizes.budget_s, loop.cancel_path.touch)
    timer.start()
    start = time.time()
    try:
        run_worker(loop, session)
    finally:
        timer.cancel()
    sync()
    wall = time.time() - start
    epochs = session.metrics()
    rates = [m["train_images_per_s"] for m in epochs]
    steady = rates[1:] or rates
    reached = [m["reported_at"] - start for m in epochs if m["val_accuracy"] >= TARGET_ACCURACY]
    layout = " + channels_last" if cfg.channels_last and device.type == "cuda" else ""
    row = {"section": "training",
           "what": f"{name}: batch {cfg.batch_size}, {precision_for(device, cfg.amp)}{layout}",
           "images_per_s": round(sum(steady) / len(steady), 1) if steady else None,
           f"s_to_val_acc_{TARGET_ACCURACY}": round(reached[0], 1) if reached else None,
           "best_val_acc": round(max((m["val_accuracy"] for m in epochs), default=0.0), 4),
           "epochs": len(epochs), "wall_s": round(wall, 1),
           "stopped_by_budget": loop.cancel_path.exists()}
    log.info("%s", row)
    curve = [{"epoch": m["epoch"], "elapsed_s": round(m["reported_at"] - start, 2),
              "train_accuracy": round(m["train_accuracy"], 4),
              "val_accuracy": round(m["val_accuracy"], 4),
              "train_images_per_s": round(m["train_images_per_s"], 1)} for m in epochs]
    checkpoints = session.checkpoints()
    return SettingResult(row, curve, checkpoints[-1] / CHECKPOINT_FILE if checkpoints else None)


def publish_for_serving(home: Path, checkpoint: Path, image_size: int) -> None:
    """The trained weights as the first version of a fresh registry, made CURRENT."""
    from training.presets import EvalPreset
    from training.registry import Registry

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    registry = Registry(home)
    version, staging = registry.allocate()
    manifest = {"backbone": "resnet18", "weights_origin": "random init (benchmark)",
                "classes": list(CLASSES),
                "preprocessing": EvalPreset.for_size(image_size).to_dict(),
                "inference": {"engine": "eager"}, "strategy": "finetune"}
    registry.publish(version, staging, state["model"], manifest)
    registry.set_current(version)


def model_rate(model: torch.nn.Module, batch: int, side: int, device: torch.device,
               amp: bool, iters: int) -> float:
    """images/s of the model alone on a (batch, 3, side, side) float32 input on `device`."""
    from training.engine import precision_for

    precision = precision_for(device, amp)
    x = torch.randn(batch, 3, side, side, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), precision.autocast():
        for _ in range(3):
            model(x)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    return batch * iters / (time.perf_counter() - t)


def classifier_rows(home: Path, device: torch.device, jpegs: Sequence[bytes], smoke: bool
                    ) -> list[dict[str, Any]]:
    from service.classifier import Classifier

    clf = Classifier(home, device=str(device))
    clf.sync()
    model, side = clf.loaded.model, clf.loaded.preset.crop
    rows: list[dict[str, Any]] = []
    for batch in (1, 8) if smoke else (1, 8, 32, 64):
        items = [(jpegs[i % len(jpegs)], 1) for i in range(batch)]
        clf.predict_bytes(items)  # warm-up: cuDNN picks its kernels for this shape
        rounds = 2 if smoke else max(4, 256 // batch)
        sync()
        t = time.perf_counter()
        for _ in range(rounds):
            clf.predict_bytes(items)
        sync()
        e2e = batch * rounds / (time.perf_counter() - t)
        iters = 2 if smoke else 30
        fp32 = model_rate(model, batch, side, device, amp=False, iters=iters)
        model.to(memory_format=torch.channels_last)
        amp = model_rate(model, batch, side, device, amp=True, iters=iters)
        model.to(memory_format=torch.contiguous_format)
        rows.append({"section": "classifier", "what": "Classifier.predict_bytes (decode, "
                     "CPU preprocessing, fp32 forward)", "batch": batch,
                     "images_per_s": round(e2e, 1), "model_fp32_images_per_s": round(fp32, 1),
                     "model_amp_channels_last_images_per_s": round(amp, 1)})
        log.info("%s", rows[-1])
    return rows


def init_group(store: Path, device: torch.device) -> str:
    """A one-process group, as torchrun would leave it -> its backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    return backend


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes: check the wiring")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds per training setting (default: 150, smoke 120)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = SMOKE if args.smoke else FULL
    if args.budget_s is not None:
        sizes = replace(sizes, budget_s=args.budget_s)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    notes = []
    if not cuda:
        notes.append("no CUDA here: fell back to the CPU with gloo; these are no GPU figures")
    if args.smoke:
        notes.append(f"smoke sizes: {sizes}")
    tutorial = {"batch_size": 4, "lr": 0.001, "backbone_lr": 0.001, "momentum": 0.9,
                "weight_decay": 0.0, "warmup_epochs": 0, "label_smoothing": 0.0, "amp": False,
                "channels_last": False, "num_data_workers": 4 if cuda else 0,
                "epochs": sizes.tutorial_epochs}
    # Random init: every layer at the head's rate, after a warm-up (no pretrained features
    # to protect with the smaller backbone rate).
    product = {"batch_size": sizes.product_batch, "lr": 0.05, "backbone_lr": 0.05,
               "warmup_epochs": 1, "epochs": sizes.product_epochs}
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        side = round(sizes.image_size * 256 / 224)  # the eval preset's resize: no draft scaling
        t = time.perf_counter()
        data = (write_shapes(work / "train", sizes.train_per_class, side, seed=0),
                write_shapes(work / "val", sizes.val_per_class, side, seed=1))
        notes.append(f"data: {len(data[0])} train + {len(data[1])} val JPEGs, {side} px, "
                     f"{len(CLASSES)} classes, written in {time.perf_counter() - t:.1f} s")
        # Asked only now: the name starts a CUDA context, which the writers above, forked
        # processes, must not inherit.
        notes.insert(0, f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch "
                        f"{torch.__version__}; {os.cpu_count()} cores")
        backend = init_group(work / "store", device)
        notes.append(f"process group: {backend}, world size {dist.get_world_size()}")
        try:
            checkpoint = None
            for name, overrides in (("product", product), ("tutorial", tutorial)):
                try:
                    result = train_setting(name, overrides, sizes, data, work, device)
                except Exception as exc:
                    log.exception("%s setting failed", name)
                    notes.append(f"{name} setting failed: {type(exc).__name__}: {exc}"[:400])
                    continue
                rows.append(result.row)
                curves[name] = result.curve
                checkpoint = checkpoint or result.checkpoint
        finally:
            dist.destroy_process_group()
        if checkpoint is not None:
            home = work / "home"
            publish_for_serving(home, checkpoint, sizes.image_size)
            jpegs = [p.path.read_bytes() for p in data[1][:64]]
            rows += classifier_rows(home, device, jpegs, args.smoke)
        else:
            notes.append("serving skipped: no checkpoint was trained")
    notes.append("tutorial: batch 4, SGD lr 0.001 momentum 0.9 on all layers, fp32, cosine "
                 "instead of its StepLR; product: the product's GPU defaults at batch "
                 f"{product['batch_size']}, SGD lr {product['lr']} on all layers after "
                 f"{product['warmup_epochs']} warm-up epoch (random init), label smoothing 0.1")
    write_results("gpu", {"target_val_accuracy": TARGET_ACCURACY, "sizes": asdict(sizes),
                          "curves": curves},
                  rows, notes)


if __name__ == "__main__":
    main()
