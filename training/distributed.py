"""Distributed helpers in one place, and the seam between the per-worker loop and its runner.

Helpers (as in torchvision's classification reference, `utils.py`): `get_rank`,
`get_world_size`, `is_main_process`, `reduce_across_processes` (every collective the loop makes
goes through here, on the training device), `broadcast_buffers`, and `ShardSampler` (a
validation shard per rank that neither pads nor repeats, so reduced counts are exact).

The seam: `training.loop.run_worker` talks to a `WorkerSession` only (rank, world size,
device, model wrapping, report, checkpoint restore), never to Ray, so the same loop runs

- under Ray Train: `RaySession` (imports Ray when built, on the worker), and
- under plain `torch.distributed` with no Ray installed: `TorchSession` (the process group is
  initialised by torchrun or by the caller; checkpoints and reported metrics go to a local
  folder). `benchmarks/gpu.py` runs the product's loop this way on a machine without Ray.

Why collectives take the training device: NCCL (Ray picks it when `use_gpu`) accepts CUDA
tensors only, and gloo accepts both, so a tensor built on the training device is right for
either backend, while a CPU tensor fails under NCCL on the first step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

CHECKPOINT_PREFIX = "checkpoint_"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_METRICS_FILE = "metrics.json"  # in each checkpoint folder: what was reported with it


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def reduce_across_processes(values: Sequence[float] | torch.Tensor, device: torch.device
                            ) -> torch.Tensor:
    """Sum `values` over every process of the group -> (len(values),) float64 on `device`.

    float64 keeps counts exact (integers up to 2**53) and is taken by both gloo and NCCL.
    Without a process group (one process) the values come back as they are.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device=device, dtype=torch.float64).flatten().clone()
    else:
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a group.
    Small things only (e.g. where each worker runs): it pickles through the process group."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank, in place.

    Under DDP each rank updates its running statistics with its own last batch, so before a
    sharded evaluation the ranks hold slightly different models; after this every rank holds
    the model rank 0 checkpoints. Buffers live on the training device, as NCCL needs.
    """
    if get_world_size() < 2:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... of a dataset of `length` items: disjoint shards
    that cover it exactly once (no padding, unlike DistributedSampler), in order."""

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class WorkerSession(Protocol):
    """What the per-worker loop needs from whatever runs it."""

    rank: int
    world_size: int
    local_world_size: int  # workers on this node: they share its cores
    device: torch.device   # the training device; every collective uses it
    node_id: str           # the node this worker runs on (Ray's node id, or the host name)

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """Move `module` to `device`; wrap it in DDP when there is more than one worker."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """One epoch's metrics, the same on every rank; rank 0 also hands over a folder to
        keep as the checkpoint (its contents are copied before this returns). Every rank
        calls it once per epoch."""
        ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the last checkpoint reported by an earlier attempt of this run, or
        None on a first start."""
        ...


class RaySession:
    """`WorkerSession` under Ray Train; built inside `train_loop_per_worker` on each worker."""

    def __init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()

    def prepare_model(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = (None if checkpoint_dir is None
                      else ray.train.Checkpoint.from_directory(str(checkpoint_dir)))
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is present (torchrun sets LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def local_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders a `TorchSession` left in `root`, oldest first."""
    return sorted(p for p in Path(root).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


def checkpoint_metrics(folder: Path) -> dict[str, Any]:
    """The metrics reported with the checkpoint in `folder` ({} when it has none)."""
    try:
        data = json.loads((folder / CHECKPOINT_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def best_local_checkpoint(root: Path, score_attribute: str) -> Path | None:
    """The checkpoint folder in `root` with the highest `score_attribute` (the earliest among
    equals), or None when there is none."""
    best, top = None, float("-inf")
    for p in local_checkpoints(root):
        value = checkpoint_metrics(p).get(score_attribute)
        if value is not None and (best is None or float(value) > top):
            best, top = p, float(value)
    return best


class TorchSession:
    """`WorkerSession` under plain torch.distributed (or one process with no group at all).

    The caller (or torchrun) has initialised the process group, if any; its backend must take
    tensors on `device` (NCCL: CUDA only). `root` is a folder every rank can read: rank 0
    copies each reported checkpoint to `root/checkpoint_<NNNNNN>/` and appends each report to
    `root/metrics.jsonl` (one JSON object per line, with `reported_at`, Unix seconds), so a
    restarted run resumes from the last checkpoint. Each checkpoint folder also holds the
    metrics reported with it (`CHECKPOINT_METRICS_FILE`). `num_to_keep`: as Ray Train's
    `CheckpointConfig`, the best that many by `score_attribute` (higher is better) are kept,
    and the latest always (a resume continues from it); None keeps every one.
    """

    def __init__(self, root: Path, device: torch.device | None = None,
                 num_to_keep: int | None = None, score_attribute: str = "val_accuracy"):
        self.root = Path(root)
        self.num_to_keep = num_to_keep
        self.score_attribute = score_attribute
        self.rank = get_rank()
        self.world_size = get_world_size()
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.device = device if device is not None else default_device()
        self.node_id = socket.gethostname()
        if is_dist_avail_and_initialized():
            backend = str(dist.get_backend())
            if backend == "nccl" and self.device.type != "cuda":
                raise ValueError(f"the {backend!r} process group takes CUDA tensors only; the "
                                 f"training device is {self.device}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.root.mkdir(parents=True, exist_ok=True)

    def prepare_model(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.world_size < 2:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return local_checkpoints(self.root)

    def best_checkpoint(self) -> Path | None:
        """The kept checkpoint with the highest `score_attribute` (the earliest among equals),
        or None when there is none."""
        return best_local_checkpoint(self.root, self.score_attribute)

    def _prune(self) -> None:
        found = self.checkpoints()
        if self.num_to_keep is None or len(found) <= self.num_to_keep:
            return
        def score(p: Path) -> float:
            return float(checkpoint_metrics(p).get(self.score_attribute, float("-inf")))
        ranked = sorted(found[:-1], key=score, reverse=True)  # the latest is always kept
        keep = set(ranked[:max(0, self.num_to_keep - 1)]) | {found[-1]}
        for p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.root / METRICS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.rank != 0:
            return
        if checkpoint_dir is not None:
            found = self.checkpoints()
            index = int(found[-1].name.removeprefix(CHECKPOINT_PREFIX)) + 1 if found else 0
            final = self.root / f"{CHECKPOINT_PREFIX}{index:06d}"
            # Copied under a name `checkpoints()` ignores, then renamed: a crash never leaves
            # a half-written folder that a restart would resume from.
            partial = self.root / f".partial-{final.name}"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            (partial / CHECKPOINT_METRICS_FILE).write_text(json.dumps(metrics))
            os.replace(partial, final)
            self._prune()
        with open(self.root / METRICS_FILE, "a") as f:
            f.write(json.dumps({**metrics, "reported_at": time.time()}) + "\n")

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None
