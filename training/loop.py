"""The Ray Train per-worker loop: glue in numbered steps. The work is in `training.engine`.

Each worker: (1) seeds and threads, (2) data loaders (the train loader sharded by Ray's
DistributedSampler; every worker validates on the whole validation split, so val metrics are
exact and identical on every rank), (3) the model, wrapped by `prepare_model` (DDP when there is
more than one worker), (4) resume from `ray.train.get_checkpoint()` when Ray restarted the group
after a failure, (5) per epoch: train, reduce train metrics across workers, validate, report
(rank 0 attaches the checkpoint). Rank 0 also writes the job's progress file, which the CLI and
the service read while the job runs. A cancel file is polled every step and agreed on by all
ranks (all-reduce), so the group stops together.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from training.config import TrainConfig
from training.dataset import write_file_atomic
from training.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    make_datasets,
    prepare_model,
    train_one_epoch,
    warmup_steps,
)

CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class ProgressWriter:
    """Rank 0 writes `jobs/<job_id>.progress.json`, at most every `interval` seconds per step."""

    def __init__(self, path: Path, epochs: int, interval: float = 0.5):
        self.path = path
        self.epochs = epochs
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0
        self.state: dict[str, Any] = {"pid": os.getpid(), "resumed_from_epoch": None,
                                      "metrics": []}

    def step(self, epoch: int, step: int, steps: int, first_epoch: int, force: bool = False
             ) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        done = (epoch + step / max(1, steps)) / self.epochs
        done_here = done - first_epoch / self.epochs  # this attempt's share, for the ETA
        elapsed = now - self.start
        eta = elapsed / done_here * (1 - done) if done_here > 0 else None
        self.state.update({"epoch": epoch + (1 if step else 0), "epochs": self.epochs,
                           "step": step, "steps": steps, "fraction": round(done, 4),
                           "eta_s": None if eta is None else round(eta, 1),
                           "updated_at": time.time()})
        write_file_atomic(self.path, json.dumps(self.state).encode())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cancel_path = Path(config["cancel_path"])

    # 1. Seeds and threads: each worker gets its own share of the node's cores.
    torch.manual_seed(cfg.seed + rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # 2. Data.
    train_ds, val_ds, _ = make_datasets(config["train_samples"], config["val_samples"], cfg)
    def loader(ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle,
                          num_workers=cfg.num_data_workers,
                          persistent_workers=cfg.num_data_workers > 0)

    train_loader = ray.train.torch.prepare_data_loader(loader(train_ds, True))
    val_loader = ray.train.torch.prepare_data_loader(loader(val_ds, False),
                                                     add_dist_sampler=False)
    num_classes = len(config["classes"])

    # 3. Model.
    model, backbone_params, head_params = prepare_model(
        cfg, config["backbone"], num_classes, cache_dir=Path(config["cache_dir"]))
    device = ray.train.torch.get_device()
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(backbone_params, head_params, cfg)
    steps = len(train_loader)
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, steps), cfg.epochs * steps)

    # 4. Resume.
    start_epoch, history = 0, []
    progress = ProgressWriter(Path(config["progress_path"]), cfg.epochs) if rank == 0 else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device,
                               weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if progress is not None:
            progress.state["resumed_from_epoch"] = start_epoch
            progress.state["metrics"] = history

    # 5. Epochs.
    for epoch in range(start_epoch, cfg.epochs):
        cancelled = False

        def on_step(step: int, steps: int, loss: float, epoch: int = epoch) -> None:
            nonlocal cancelled
            cancelled = _all_reduce_sum([float(cancel_path.exists())])[0] > 0
            if progress is not None:
                progress.step(epoch, step, steps, start_epoch)
            if cancelled:
                raise _Cancelled

        try:
            tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                                 cfg.amp, channels_last, on_step)
        except _Cancelled:
            return
        loss_sum, correct, count = _all_reduce_sum(
            [tr.loss * tr.count, tr.accuracy * tr.count, float(tr.count)])
        va = evaluate(unwrap(model), val_loader, criterion, device, num_classes, cfg.amp,
                      channels_last)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count,
                   "train_accuracy": correct / count, "val_loss": va.loss,
                   "val_accuracy": va.accuracy, "epoch_seconds": tr.seconds,
                   "train_images_per_s": count / max(tr.seconds, 1e-9)}
        history.append(metrics)
        if progress is not None:
            progress.state["metrics"] = history
            progress.step(epoch, steps, steps, start_epoch, force=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": unwrap(model).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                            "history": history, "confusion": va.confusion},
                           Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


class _Cancelled(Exception):
    pass
