"""The pure-PyTorch training engine: data, optimiser, schedule, one epoch, evaluation.

No Ray here (the GPU benchmark machine has none): `training/loop.py` wraps these functions for
Ray Train (or plain torch.distributed), and `fit_plain` runs them in one process (the tutorial's
loop, for baselines).

Mixed precision (`Precision`): on a GPU, bf16 autocast where the GPU supports it, else fp16
autocast with a `GradScaler` (fp16's narrow exponent underflows small gradients without loss
scaling); fp32 on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeAlias

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
    """One pass: mean loss, accuracy in [0, 1], images seen, wall seconds, the (true,
    predicted) confusion matrix (evaluation only; num_classes x num_classes counts) and the
    number of correct predictions (an exact count, for reducing across workers)."""

    loss: float
    accuracy: float
    count: int
    seconds: float = 0.0
    confusion: list[list[int]] = field(default_factory=list)
    correct: int = 0

    def per_class_accuracy(self) -> list[float | None]:
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]


StepCallback = Callable[[int, int], None]  # (steps done, steps in the epoch)


@dataclass(frozen=True)
class Precision:
    """Autocast dtype on one device type: None = fp32. fp16 needs a GradScaler."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only; a disabled scaler passes the loss and the step through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)

    def __str__(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def choose_precision(device_type: str, amp: bool, bf16_supported: bool) -> Precision:
    """amp on a GPU: bf16 where supported (same exponent range as fp32: no loss scaling),
    else fp16 (with a GradScaler). The CPU trains in fp32 (autocast there is slower)."""
    if not amp or device_type != "cuda":
        return Precision(device_type)
    return Precision(device_type, torch.bfloat16 if bf16_supported else torch.float16)


def precision_for(device: torch.device, amp: bool) -> Precision:
    """`choose_precision` with this machine's answer to "does the GPU do bf16?" (natively:
    before Ampere bf16 only runs emulated, slower than fp16)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_precision(device.type, amp, bf16)


Amp: TypeAlias = bool | Precision  # True: `precision_for(device, True)`


def _precision(device: torch.device, amp: Amp) -> Precision:
    return amp if isinstance(amp, Precision) else precision_for(device, amp)


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
                    device: torch.device, amp: Amp = False, channels_last: bool = False,
                    on_step: StepCallback | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> EpochStats:
    """One pass over `loader` ((N, 3, H, W) float32 normalised images, (N,) int64 labels).
    Returns this process's sums (callers reduce across workers).

    `scaler`: the run's GradScaler (it adapts its scale across epochs, and is checkpointed);
    with fp16 and none given, one lives for this epoch. Loss and accuracy accumulate on the
    device, so a step waits for the GPU only where `on_step` does.
    """
    set_train_mode(model)
    precision = _precision(device, amp)
    if scaler is None:
        scaler = precision.grad_scaler()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    steps = len(loader)
    for step, batch in enumerate(loader):
        x, y = _to_device(batch, device, channels_last)
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        count += n
        if on_step is not None:
            on_step(step + 1, steps)
    n_correct = int(correct)
    return EpochStats(float(loss_sum) / max(1, count), n_correct / max(1, count), count,
                      time.perf_counter() - start, correct=n_correct)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, criterion: nn.Module, device: torch.device,
             num_classes: int, amp: Amp = False, channels_last: bool = False) -> EpochStats:
    """Loss, accuracy and the (true, predicted) confusion matrix over `loader`."""
    model.eval()
    precision = _precision(device, amp)
    start = time.perf_counter()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch in loader:
        x, y = _to_device(batch, device, channels_last)
        with precision.autocast():
            logits = model(x)
        loss_sum += criterion(logits.float(), y).double() * y.shape[0]
        count += y.shape[0]
        confusion += torch.bincount(y * num_classes + logits.argmax(1),
                                    minlength=num_classes**2)
    matrix = confusion.view(num_classes, num_classes).cpu()
    correct = int(matrix.diag().sum())
    return EpochStats(float(loss_sum) / max(1, count), correct / max(1, count), count,
                      time.perf_counter() - start, matrix.tolist(), correct)


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
    precision = precision_for(device, cfg.amp)
    scaler = precision.grad_scaler()
    history: list[dict] = []
    best, best_state, images, seconds = -1.0, {}, 0, 0.0
    cl = cfg.channels_last and device.type == "cuda"
    for epoch in range(cfg.epochs):
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                             precision, cl, scaler=scaler)
        va = evaluate(model, val_loader, criterion, device, num_classes, precision, cl)
        images += tr.count
        seconds += tr.seconds
        history.append({"epoch": epoch + 1, "train_loss": tr.loss, "train_accuracy": tr.accuracy,
                        "val_loss": va.loss, "val_accuracy": va.accuracy})
        if va.accuracy > best:
            best = va.accuracy
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return PlainFitResult(history, best, best_state, images / max(seconds, 1e-9))
