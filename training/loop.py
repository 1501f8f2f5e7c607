"""The per-worker training loop: glue in numbered steps. The work is in `training.engine`.

`training.pipeline.run_job` builds one `LoopConfig` (typed, frozen, picklable: Ray sends it to
every worker) and hands it to `train_loop_per_worker`, Ray Train's entry point, which runs
`run_worker` with a `RaySession`. `run_worker` reaches its runner only through a
`training.distributed.WorkerSession`, so the same loop runs under plain torch.distributed with
no Ray installed (`TorchSession`; `benchmarks/gpu.py` does). Nothing here imports Ray.

Each worker: (1) seeds, threads; (2) the model and its precision (bf16 autocast on a GPU that
has it, else fp16 with a GradScaler; fp32 on a CPU); (3) data: the train split sharded by a
DistributedSampler, reshuffled every epoch (`set_epoch`); the validation split cut into disjoint
shards (`ShardSampler`), each rank evaluating its own; pinned memory and loader processes on a
GPU; and the trained module wrapped by the session (DDP when there is more than one worker): the
whole network, or in feature-extract without augmentation only the head, trained on cached
backbone features; (4) resume from the session's latest checkpoint: when the group was restarted
after a failure, or when the job itself is resumed (`training.pipeline.resume_job`: a new run
under the same Ray Train run name; under `TorchSession`, the same folder), the model, optimiser,
scheduler, scaler, epoch and the metrics history come from it, and the progress file says
`resumed_from_epoch` and starts at that epoch; (5) per epoch: train, reduce the train sums,
validate (rank 0's BatchNorm statistics first, then each shard; the loss sum, correct and image
counts and the confusion matrix are summed over ranks, so validation metrics are exact,
identical on every rank and equal to one process evaluating the whole split), report (rank 0
attaches the checkpoint). Rank 0 also writes the job's progress file, which the CLI and the
service read while the job runs. A cancel file is polled every step and agreed on by all ranks
(all-reduce), so the group stops together. Every collective goes through `training.distributed`,
on the training device.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from training.config import TrainConfig
from training.dataset import write_file_atomic
from training.distributed import (
    ShardSampler,
    WorkerSession,
    broadcast_buffers,
    gather_objects,
    reduce_across_processes,
)
from training.engine import (
    Amp,
    EpochStats,
    build_optimizer,
    build_scheduler,
    evaluate,
    make_datasets,
    precision_for,
    prepare_model,
    train_one_epoch,
    warmup_steps,
)
from training.features import FeatureCache, compute_features
from training.jobs import STAGE_FEATURES, STAGE_TRAINING
from training.model import AUTO, head_module, split_head
from training.presets import EvalPreset

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOOP_CONFIG_KEY = "loop"


@dataclass(frozen=True)
class Sample:
    """One image as the workers see it: the file to decode (a cached resized copy or the
    original), its class index into `LoopConfig.classes`, and its content hash (the key of its
    cached backbone features)."""

    path: Path
    label: int
    sha256: str


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs for one job. Built once by the pipeline; picklable.

    `train_config.backbone` is the resolved backbone (never `auto`); `preset` is the eval preset
    the feature cache is keyed on; the paths come from the volume (`cache/`, `cache/torch`) and
    from `JobStore` (the job's cancel and progress files).
    """

    train_config: TrainConfig
    classes: tuple[str, ...]
    train_samples: tuple[Sample, ...]
    val_samples: tuple[Sample, ...]
    preset: EvalPreset
    feature_key: str
    feature_cache_root: Path
    torch_cache_dir: Path
    cancel_path: Path
    progress_path: Path
    pretrained: bool = True  # False: random init (benchmarks/gpu.py, a machine with no hub)

    def __post_init__(self) -> None:
        if self.train_config.backbone == AUTO:
            raise ValueError(f"resolve the backbone before building a LoopConfig; got {AUTO!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def uses_feature_cache(self) -> bool:
        """Feature-extract without augmentation: the frozen backbone is a pure function of the
        image, so the head trains on cached features."""
        cfg = self.train_config
        return cfg.strategy == "feature-extract" and not cfg.augment and cfg.use_feature_cache

    def as_train_loop_config(self) -> dict[str, LoopConfig]:
        """Ray's `TorchTrainer(train_loop_config=...)` is typed and handled as a dict (Train v1
        deep-copies it into Tune's `param_space`), so the LoopConfig travels as its one value;
        `train_loop_per_worker` takes it back out."""
        return {LOOP_CONFIG_KEY: self}


def labelled_paths(samples: Sequence[Sample]) -> list[tuple[str, int]]:
    """-> (path, class index) pairs, what `training.engine.ImageFileDataset` reads."""
    return [(str(s.path), s.label) for s in samples]


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


MAX_AUTO_LOADER_WORKERS = 8


def loader_workers(requested: int, device_type: str, cpus: int) -> int:
    """DataLoader processes per training worker. As configured on a CPU (there they would take
    cores from the forward and backward passes); on a GPU, 0 (the default) means one per core
    of this worker's share `cpus` but one, at most MAX_AUTO_LOADER_WORKERS: decoding and
    augmenting images in the training process alone would leave the GPU waiting."""
    if requested or device_type != "cuda":
        return requested
    return max(1, min(MAX_AUTO_LOADER_WORKERS, cpus - 1))


def cpu_share(local_world_size: int) -> int:
    """Cores this process may use when `local_world_size` workers share the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


@dataclass
class Loaders:
    """This rank's train shard, handed out per epoch by `train_epoch`, and its validation
    shard `val`. Batches are ((B, 3, H, W) float32 images or (B, D) float32 features, (B,)
    int64 labels) on the CPU, pinned when training on a GPU."""

    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler

    def train_epoch(self, epoch: int) -> DataLoader:
        """The train loader, reshuffled for `epoch`: a DistributedSampler repeats one order
        every epoch unless told the epoch, so the loader is only handed out with it."""
        self.train_sampler.set_epoch(epoch)
        return self.train

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)


def build_loaders(train_ds: Dataset, val_ds: Dataset, *, batch_size: int, seed: int,
                  rank: int, world_size: int, device: torch.device, workers: int) -> Loaders:
    """The sampler is built here, with the same seed on every rank (they must agree on the
    permutation they split), for one worker too: so every runner shards the same way and the
    order of an epoch is a function of (seed, epoch), also after a resume."""
    train_sampler: DistributedSampler = DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    val_sampler = ShardSampler(len(val_ds), rank, world_size)  # type: ignore[arg-type]

    def loader(ds: Dataset, sampler: DistributedSampler | ShardSampler) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=device.type == "cuda")

    return Loaders(loader(train_ds, train_sampler), loader(val_ds, val_sampler), train_sampler)


def reduce_stats(stats: EpochStats, device: torch.device) -> EpochStats:
    """Sums over ranks (loss sum, correct, count, confusion matrix), in one all-reduce on the
    training device -> the stats of all ranks' batches together; seconds stay this rank's."""
    flat = [float(v) for row in stats.confusion for v in row]
    total = reduce_across_processes(
        [stats.loss * stats.count, float(stats.correct), float(stats.count), *flat],
        device).cpu().tolist()
    loss_sum, correct, count = total[0], round(total[1]), round(total[2])
    n = len(stats.confusion)
    confusion = [[round(v) for v in total[3 + i * n:3 + (i + 1) * n]] for i in range(n)]
    return EpochStats(loss_sum / max(1, count), correct / max(1, count), count, stats.seconds,
                      confusion, correct)


def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
             num_classes: int, amp: Amp = False, channels_last: bool = False) -> EpochStats:
    """Evaluate this rank's validation shard with rank 0's model, then sum the counts over
    ranks. `model` is the unwrapped module (no DDP: shards differ in length, and evaluation
    needs no gradient synchronisation)."""
    broadcast_buffers(model)
    stats = evaluate(model, loader, criterion, device, num_classes, amp, channels_last)
    return reduce_stats(stats, device)


def cancel_agreed(cancel_path: Path, device: torch.device) -> bool:
    """True on every rank when any rank sees the cancel file: the group stops together."""
    return bool(reduce_across_processes([float(cancel_path.exists())], device)[0] > 0)


class ProgressWriter:
    """Rank 0 writes the job's progress file (`JobStore.progress_path`), at most every
    `interval` seconds per step."""

    def __init__(self, path: Path, epochs: int, interval: float = 0.5):
        self.path = path
        self.epochs = epochs
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0
        earlier = self._earlier()
        self.state: dict[str, Any] = {
            "pid": os.getpid(), "resumed_from_epoch": None, "metrics": [], "workers": [],
            "attempts": list(earlier.get("attempts") or []),
            "stages": list(earlier.get("stages") or []),
            # where the job stood, until this attempt's first step says otherwise
            **{k: earlier[k] for k in ("epoch", "epochs", "step", "steps", "fraction")
               if k in earlier}}

    def _earlier(self) -> dict[str, Any]:
        """The progress file an earlier attempt (or `JobStore.begin_resume`) left: where its
        workers ran (a restart after a failure writes a new progress file; the history of
        placements and stages is kept in it) and where it stood."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def stage(self, name: str) -> None:
        """This attempt is now at stage `name` (`training.jobs.WORKER_STAGES`): `stage`, and
        an entry in `stages` with the time it began."""
        self.state["stage"] = name
        self.state["stages"].append({"stage": name, "at": time.time()})
        write_file_atomic(self.path, json.dumps(self.state).encode())

    def placed(self, workers: list[dict[str, Any]], resumed_from_epoch: int | None) -> None:
        """Record where this attempt's workers run: `workers` (rank, host, node_id, device)."""
        self.start = time.monotonic()  # the ETA counts from here, not from the features
        self.state["workers"] = workers
        self.state["attempts"].append({"workers": workers,
                                       "resumed_from_epoch": resumed_from_epoch,
                                       "started_at": time.time()})
        write_file_atomic(self.path, json.dumps(self.state).encode())

    def step(self, epoch: int, step: int, steps: int, first_epoch: int, force: bool = False
             ) -> None:
        """Epoch `epoch` (0-based) has done `step` of its `steps`. The file says the epoch in
        progress, 1-based (`epoch`: from its first step to its end, so epoch k of n spans
        the fractions (k-1)/n to k/n, never one ahead of the counter), `step`/`steps` within
        it, and `fraction`, the share of the job's steps done. The loop forces a write at the
        start and at the end of every epoch: a short epoch, all of whose steps fall inside
        `interval`, still shows."""
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        done = (epoch + step / max(1, steps)) / self.epochs
        done_here = done - first_epoch / self.epochs  # this attempt's share, for the ETA
        elapsed = now - self.start
        eta = elapsed / done_here * (1 - done) if done_here > 0 else None
        self.state.update({"epoch": min(epoch + 1, self.epochs), "epochs": self.epochs,
                           "step": step, "steps": steps, "fraction": round(done, 4),
                           "eta_s": None if eta is None else round(eta, 1),
                           "updated_at": time.time()})
        write_file_atomic(self.path, json.dumps(self.state).encode())


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry point on each worker; `config` is `LoopConfig.as_train_loop_config()`."""
    from training.distributed import RaySession

    run_worker(config[LOOP_CONFIG_KEY], RaySession())


def run_worker(loop: LoopConfig, session: WorkerSession) -> None:
    """One worker's whole job, under whichever runner `session` stands for."""
    cfg = loop.train_config
    rank, world_size, device = session.rank, session.world_size, session.device
    is_main = rank == 0  # logs, writes progress and checkpoints

    # 1. Seeds and threads: each worker gets its own share of the node's cores. Crops are one
    # size, so cuDNN may pick its fastest convolution once per shape.
    torch.manual_seed(cfg.seed + rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # 2. Model and precision.
    full, backbone_params, head_params = prepare_model(
        cfg, cfg.backbone, loop.num_classes, pretrained=loop.pretrained,
        cache_dir=loop.torch_cache_dir)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        full = full.to(memory_format=torch.channels_last)
    precision = precision_for(device, cfg.amp)
    scaler = precision.grad_scaler()
    workers = loader_workers(cfg.num_data_workers, device.type,
                             cpu_share(session.local_world_size))
    if is_main:
        log.info("training on %s x %d (%s), precision %s, channels_last %s, %d loader "
                 "workers", device, world_size, type(session).__name__, precision,
                 channels_last, workers)

    # 3. Data: image loaders, or (feature-extract without augmentation) the frozen backbone's
    # cached features, computed here for images not seen before, split across the workers.
    progress = ProgressWriter(loop.progress_path, cfg.epochs) if is_main else None
    train_ds: Dataset
    val_ds: Dataset
    if loop.uses_feature_cache:
        if progress is not None:
            progress.stage(STAGE_FEATURES)
        train_ds, val_ds = _feature_datasets(loop, full, device, channels_last, rank,
                                             world_size, workers)
        full.to(device)
        net = session.prepare_model(head_module(full))
        channels_last = False  # the head takes (N, D) features
        workers = 0  # features are in memory: nothing to decode
    else:
        train_ds, val_ds, _ = make_datasets(labelled_paths(loop.train_samples),
                                            labelled_paths(loop.val_samples), cfg)
        net = session.prepare_model(full)
    loaders = build_loaders(train_ds, val_ds, batch_size=cfg.batch_size, seed=cfg.seed,
                            rank=rank, world_size=world_size, device=device, workers=workers)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(backbone_params, head_params, cfg)
    steps = loaders.steps_per_epoch
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, steps), cfg.epochs * steps)

    # 4. Resume.
    start_epoch, history = 0, []
    with session.latest_checkpoint() as d:
        state = (None if d is None else
                 torch.load(d / CHECKPOINT_FILE, map_location=device, weights_only=True))
    if state is not None:
        full.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if progress is not None:
            progress.state["resumed_from_epoch"] = start_epoch
            progress.state["metrics"] = history
    placement = gather_objects({"rank": rank, "host": socket.gethostname(),
                                "node_id": session.node_id, "device": str(device)})
    if progress is not None:
        progress.placed(placement, start_epoch if state is not None else None)
        progress.stage(STAGE_TRAINING)
        progress.step(start_epoch, 0, steps, start_epoch, force=True)  # the first epoch starts

    # 5. Epochs.
    for epoch in range(start_epoch, cfg.epochs):
        if progress is not None and epoch > start_epoch:
            progress.step(epoch, 0, steps, start_epoch, force=True)  # epoch k starts

        def on_step(step: int, steps: int, epoch: int = epoch) -> None:
            cancelled = cancel_agreed(loop.cancel_path, device)
            if progress is not None:
                progress.step(epoch, step, steps, start_epoch)
            if cancelled:
                raise _Cancelled

        try:
            tr = train_one_epoch(net, loaders.train_epoch(epoch), criterion, optimizer,
                                 scheduler, device, precision, channels_last, on_step,
                                 scaler=scaler)
        except _Cancelled:
            return
        train = reduce_stats(tr, device)
        va = validate(unwrap(net), loaders.val, criterion, device, loop.num_classes,
                      precision, channels_last)
        metrics = {"epoch": epoch + 1, "train_loss": train.loss,
                   "train_accuracy": train.accuracy, "val_loss": va.loss,
                   "val_accuracy": va.accuracy, "epoch_seconds": tr.seconds,
                   "train_images_per_s": train.count / max(tr.seconds, 1e-9)}
        history.append(metrics)
        if progress is not None:
            progress.state["metrics"] = history
            progress.step(epoch, steps, steps, start_epoch, force=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if is_main:
                # The config travels with the weights, so a checkpoint explains itself.
                torch.save({"model": full.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "epoch": epoch + 1, "history": history, "confusion": va.confusion,
                            "train_config": cfg.model_dump(mode="json")},
                           Path(tmp) / CHECKPOINT_FILE)
                checkpoint = Path(tmp)
            session.report(metrics, checkpoint)


class _Cancelled(Exception):
    pass


def _feature_datasets(loop: LoopConfig, full: nn.Module, device: torch.device,
                      channels_last: bool, rank: int, world_size: int, workers: int
                      ) -> tuple[TensorDataset, TensorDataset]:
    """Backbone features ((N, D) float32) and labels ((N,) int64) for the train and val
    samples, from the cache; each rank computes its share of the missing ones, then all ranks
    wait for each other (an all-reduce as the barrier, on the training device)."""
    cache = FeatureCache(loop.feature_cache_root, loop.feature_key)
    files = {s.sha256: s.path for s in loop.train_samples + loop.val_samples}
    missing = cache.missing(sorted(files))
    mine = missing[rank::world_size]
    if mine:
        extractor, _ = split_head(full)
        compute_features(extractor.to(device), [(s, files[s]) for s in mine], loop.preset,
                         cache, device, channels_last=channels_last, num_workers=workers)
        del extractor
    reduce_across_processes([float(len(mine))], device)

    def tensors(samples: Sequence[Sample]) -> TensorDataset:
        return TensorDataset(cache.get_many([s.sha256 for s in samples]),
                             torch.tensor([s.label for s in samples], dtype=torch.long))

    return tensors(loop.train_samples), tensors(loop.val_samples)
