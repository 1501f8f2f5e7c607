"""The Ray Train per-worker loop: glue in numbered steps. The work is in `training.engine`.

Each worker: (1) seeds and threads; (2) the model; (3) data loaders (the train loader sharded
by Ray's DistributedSampler; every worker validates on the whole validation split, so val
metrics are exact and identical on every rank) and the trained module wrapped by
`prepare_model` (DDP when there is more than one worker): the whole network, or in
feature-extract without augmentation only the head, trained on cached backbone features;
(4) resume from `ray.train.get_checkpoint()` when Ray restarted the group after a failure;
(5) per epoch: train, reduce train metrics across workers, validate, report (rank 0 attaches
the checkpoint). Rank 0 also writes the job's progress file, which the CLI and the service read
while the job runs. A cancel file is polled every step and agreed on by all ranks
(all-reduce), so the group stops together.
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
from torch.utils.data import DataLoader, Dataset, TensorDataset

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
from training.features import FeatureCache, compute_features
from training.model import head_module, split_head
from training.presets import EvalPreset

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

    # 2. Model.
    device = ray.train.torch.get_device()
    num_classes = len(config["classes"])
    full, backbone_params, head_params = prepare_model(
        cfg, config["backbone"], num_classes, cache_dir=Path(config["cache_dir"]))
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        full = full.to(memory_format=torch.channels_last)
    use_features = (cfg.strategy == "feature-extract" and not cfg.augment
                    and cfg.use_feature_cache)

    # 3. Data: image loaders, or (feature-extract without augmentation) the frozen backbone's
    # cached features, computed here for images not seen before, split across the workers.
    train_ds: Dataset
    val_ds: Dataset
    if use_features:
        train_ds, val_ds = _feature_datasets(config, full, device, channels_last, ctx)
        full.to(device)
        net = ray.train.torch.prepare_model(head_module(full))
        channels_last = False  # the head takes (N, D) features
    else:
        train_ds, val_ds, _ = make_datasets(config["train_samples"], config["val_samples"], cfg)
        net = ray.train.torch.prepare_model(full)

    def loader(ds: Dataset, shuffle: bool) -> DataLoader:
        workers = 0 if use_features else cfg.num_data_workers
        return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0)

    train_loader = ray.train.torch.prepare_data_loader(loader(train_ds, True))
    val_loader = ray.train.torch.prepare_data_loader(loader(val_ds, False),
                                                     add_dist_sampler=False)
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
        full.load_state_dict(state["model"])
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
            tr = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, device,
                                 cfg.amp, channels_last, on_step)
        except _Cancelled:
            return
        loss_sum, correct, count = _all_reduce_sum(
            [tr.loss * tr.count, tr.accuracy * tr.count, float(tr.count)])
        va = evaluate(unwrap(net), val_loader, criterion, device, num_classes, cfg.amp,
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
                torch.save({"model": full.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                            "history": history, "confusion": va.confusion},
                           Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


class _Cancelled(Exception):
    pass


def _feature_datasets(config: dict[str, Any], full: nn.Module, device: torch.device,
                      channels_last: bool, ctx: Any) -> tuple[TensorDataset, TensorDataset]:
    """Backbone features for the train and val samples, from the cache; each rank computes its
    share of the missing ones, then all ranks wait for each other (all-reduce as a barrier)."""
    cache = FeatureCache(Path(config["feature_cache_root"]), config["feature_key"])
    preset = EvalPreset.from_dict(config["preset"])
    files = {sha: Path(path) for (path, _), sha in zip(
        config["train_samples"] + config["val_samples"],
        config["train_shas"] + config["val_shas"], strict=True)}
    missing = cache.missing(sorted(files))
    mine = missing[ctx.get_world_rank()::ctx.get_world_size()]
    if mine:
        extractor, _ = split_head(full)
        compute_features(extractor.to(device), [(s, files[s]) for s in mine], preset, cache,
                         device, channels_last=channels_last)
        del extractor
    _all_reduce_sum([float(len(mine))])

    def tensors(samples: list, shas: list[str]) -> TensorDataset:
        return TensorDataset(cache.get_many(shas),
                             torch.tensor([label for _, label in samples], dtype=torch.long))

    return (tensors(config["train_samples"], config["train_shas"]),
            tensors(config["val_samples"], config["val_shas"]))
