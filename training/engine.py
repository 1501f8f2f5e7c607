"""The pure-PyTorch training engine: data, optimiser, schedule, one epoch, evaluation.

No Ray here (the GPU benchmark machine has none): `training/loop.py` wraps these functions for
Ray Train, and `fit_plain` runs them in one process (the tutorial's loop, for baselines).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from training.config import TrainConfig
from training.imageio import decode_image
from training.model import apply_strategy, build_model, set_train_mode
from training.presets import EvalPreset, TrainPreset


class ImageFileDataset(Dataset):
    """(path, class index) pairs -> (transform(image), index). Files are the store's originals."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 draft_size: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        image = decode_image(Path(path).read_bytes(), draft_size=self.draft_size)
        return self.transform(image), target


def make_datasets(train: Sequence[tuple[str, int]], val: Sequence[tuple[str, int]],
                  cfg: TrainConfig) -> tuple[ImageFileDataset, ImageFileDataset, EvalPreset]:
    eval_preset = EvalPreset.for_size(cfg.image_size)
    train_tf = TrainPreset.matching(eval_preset) if cfg.augment else eval_preset
    # JPEG draft decoding: never below the size the presets resize to.
    draft = eval_preset.resize
    return (ImageFileDataset(train, train_tf, draft), ImageFileDataset(val, eval_preset, draft),
            eval_preset)


def build_optimizer(backbone_params: list[nn.Parameter], head_params: list[nn.Parameter],
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, as in the tutorial; the backbone gets its own (smaller) rate."""
    groups = [{"params": head_params, "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.effective_backbone_lr})
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up to each group's rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    count: int
    seconds: float = 0.0
    confusion: list[list[int]] = field(default_factory=list)

    def per_class_accuracy(self) -> list[float | None]:
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]


StepCallback = Callable[[int, int, float], None]  # (step, steps, running loss)


def _autocast(device: torch.device, amp: bool):
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class Batches(Protocol):
    """What the loops read: a DataLoader, or any sized iterable of (images, labels) batches
    (a list of tensors in benchmarks/gpu.py)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: Batches, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    device: torch.device, amp: bool = False, channels_last: bool = False,
                    on_step: StepCallback | None = None) -> EpochStats:
    """One pass over `loader`. Returns this process's sums (callers reduce across workers)."""
    set_train_mode(model)
    start = time.perf_counter()
    loss_sum, correct, count = 0.0, 0, 0
    steps = len(loader)
    for step, batch in enumerate(loader):
        x, y = _to_device(batch, device, channels_last)
        with _autocast(device, amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        count += n
        if on_step is not None:
            on_step(step + 1, steps, loss_sum / count)
    return EpochStats(loss_sum / max(1, count), correct / max(1, count), count,
                      time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
             num_classes: int, amp: bool = False, channels_last: bool = False) -> EpochStats:
    """Loss, accuracy and the (true, predicted) confusion matrix over `loader`."""
    model.eval()
    start = time.perf_counter()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, count = 0.0, 0
    for batch in loader:
        x, y = _to_device(batch, device, channels_last)
        with _autocast(device, amp):
            logits = model(x)
        loss_sum += criterion(logits.float(), y).item() * y.shape[0]
        count += y.shape[0]
        pred = logits.argmax(1).cpu()
        confusion += torch.bincount(y.cpu() * num_classes + pred,
                                    minlength=num_classes**2).view(num_classes, num_classes)
    correct = int(confusion.diag().sum())
    return EpochStats(loss_sum / max(1, count), correct / max(1, count), count,
                      time.perf_counter() - start, confusion.tolist())


def prepare_model(cfg: TrainConfig, backbone: str, num_classes: int, pretrained: bool = True,
                  cache_dir: Path | None = None
                  ) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]:
    """Build the network, replace its head, apply the strategy."""
    model = build_model(backbone, num_classes=num_classes, pretrained=pretrained,
                        cache_dir=cache_dir)
    backbone_params, head_params = apply_strategy(model, cfg.strategy, cfg.unfreeze_stages)
    return model, backbone_params, head_params


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return int(cfg.warmup_epochs * steps_per_epoch)


@dataclass
class PlainFitResult:
    history: list[dict]
    best_val_accuracy: float
    best_state: dict[str, torch.Tensor]
    train_images_per_s: float


def fit_plain(model: nn.Module, backbone_params: list[nn.Parameter],
              head_params: list[nn.Parameter], train_loader: DataLoader, val_loader: DataLoader,
              cfg: TrainConfig, num_classes: int, device: torch.device) -> PlainFitResult:
    """The tutorial's loop in one process: train, validate, keep the best weights by val accuracy.
    Used where Ray is absent (benchmarks, GPU checks) and as the baseline Ray Train is held to."""
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(backbone_params, head_params, cfg)
    total = cfg.epochs * len(train_loader)
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, len(train_loader)), total)
    history: list[dict] = []
    best, best_state, images, seconds = -1.0, {}, 0, 0.0
    cl = cfg.channels_last and device.type == "cuda"
    for epoch in range(cfg.epochs):
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                             cfg.amp, cl)
        va = evaluate(model, val_loader, criterion, device, num_classes, cfg.amp, cl)
        images += tr.count
        seconds += tr.seconds
        history.append({"epoch": epoch + 1, "train_loss": tr.loss, "train_accuracy": tr.accuracy,
                        "val_loss": va.loss, "val_accuracy": va.accuracy})
        if va.accuracy > best:
            best = va.accuracy
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return PlainFitResult(history, best, best_state, images / max(seconds, 1e-9))
