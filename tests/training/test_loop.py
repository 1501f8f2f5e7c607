"""The per-worker loop without Ray: under real gloo process groups (world size 1 in this
process, 2 in processes started by torch.multiprocessing), through `TorchSession`.

What broke on a GPU (issue 11) shows here on a CPU: collectives handed tensors off the training
device, a shuffle that never changed between epochs, validation repeated on every rank, bf16
chosen without asking the GPU. NCCL's refusal of a CPU tensor cannot be caused on this machine
(gloo takes tensors on either device), so the tests read the device of every tensor the loop
hands to a collective through `_recording_collectives`, which records and then calls the real
function, and check it is the session's training device.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.support.images import labelled_set
from tests.support.waiting import wait_for
from training.config import TrainConfig
from training.distributed import ShardSampler, TorchSession, reduce_across_processes
from training.engine import Precision, choose_precision, evaluate, train_one_epoch
from training.loop import (
    CHECKPOINT_FILE,
    LoopConfig,
    Sample,
    build_loaders,
    loader_workers,
    run_worker,
    validate,
)
from training.presets import EvalPreset

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "reduce", "barrier")


# -- helpers -------------------------------------------------------------------------------------

def _init_group(store: Path, rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)


def _recording_collectives(device: torch.device, log: list[str]) -> Callable[[], None]:
    """Wrap torch.distributed's collectives: each call appends "<name> <tensor device>" to `log`
    and fails unless the tensor is on `device`, then runs the real collective. -> undo."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            log.append(f"{name} {tensor.device}")
            assert tensor.device == device, f"{name} got a tensor on {tensor.device}"
            return real(tensor, *args, **kwargs)
        return recording

    for name, real in originals.items():
        setattr(dist, name, wrap(name, real))

    def undo() -> None:
        for name, real in originals.items():
            setattr(dist, name, real)
    return undo


def _write_images(folder: Path, per_label: int = 8, size: int = 40) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    classes = ["blue", "red"]
    samples = []
    for label, data in labelled_set(classes, per_label, size=size):
        sha = hashlib.sha256(data).hexdigest()
        path = folder / f"{sha}.png"
        path.write_bytes(data)
        samples.append(Sample(path, classes.index(label), sha))
    return samples


def _loop(tmp: Path, samples: list[Sample], **cfg: Any) -> LoopConfig:
    """resnet18 with random init at 32 px, batch 4: the real loop, small and offline."""
    base: dict[str, Any] = {"backbone": "resnet18", "strategy": "finetune", "epochs": 2,
                            "batch_size": 4, "image_size": 32, "lr": 0.05, "threads": 1,
                            "warmup_epochs": 0}
    return LoopConfig(
        train_config=TrainConfig(**{**base, **cfg}), classes=("blue", "red"),
        train_samples=tuple(s for i, s in enumerate(samples) if i % 4),
        val_samples=tuple(s for i, s in enumerate(samples) if not i % 4),
        preset=EvalPreset.for_size(32), feature_key="resnet18-random", pretrained=False,
        feature_cache_root=tmp / "cache", torch_cache_dir=tmp / "torch",
        cancel_path=tmp / "cancel", progress_path=tmp / "progress.json")


class _RecordingSession(TorchSession):
    """TorchSession that also keeps, on every rank, the metrics each rank reported."""

    def __init__(self, root: Path, reports: Path):
        super().__init__(root, CPU)
        self.reports = reports

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        with open(self.reports / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        super().report(metrics, checkpoint_dir)


def _small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _val_set(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one: this process."""
    _init_group(tmp_path / "store", 0, 1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- precision (e) -----------------------------------------------------------------------------

def test_precision_is_bf16_where_the_gpu_has_it_else_fp16_with_a_scaler() -> None:
    bf16 = choose_precision("cuda", amp=True, bf16_supported=True)
    fp16 = choose_precision("cuda", amp=True, bf16_supported=False)
    assert (bf16.dtype, bf16.needs_scaler) == (torch.bfloat16, False)
    assert (fp16.dtype, fp16.needs_scaler) == (torch.float16, True)
    assert not bf16.grad_scaler().is_enabled()  # (a CUDA scaler is off here anyway: no CUDA)
    for off in (choose_precision("cuda", False, True), choose_precision("cpu", True, True)):
        assert off.dtype is None and not off.needs_scaler and str(off) == "fp32"


def test_fp16_steps_go_through_the_grad_scaler() -> None:
    """fp16 autocast with loss scaling, on the CPU (autocast and GradScaler both run there):
    the scaler the caller passes is the one that scales, and the step still learns."""
    net = _small_bn_net()
    data = _val_set(32)
    batches = [(data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]) for i in range(0, 32, 8)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fp16 = Precision("cpu", torch.float16)
    scaler = fp16.grad_scaler()
    before = [p.detach().clone() for p in net.parameters()]
    stats = train_one_epoch(net, batches, nn.CrossEntropyLoss(), opt, None, CPU, fp16,
                            scaler=scaler)
    assert stats.count == 32 and 0 <= stats.correct <= 32
    assert scaler.get_scale() > 1  # loss scaling was on (a disabled scaler reports 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in net.parameters())


# -- collectives on the training device (a) ----------------------------------------------------

def test_reduce_builds_its_tensor_on_the_device_it_is_given() -> None:
    """No process group: the values come back, on the requested device. `meta` stands for a
    device that is not the CPU (this machine has no GPU)."""
    t = reduce_across_processes([1.0, 2.0], torch.device("meta"))
    assert t.device.type == "meta" and t.dtype == torch.float64 and t.shape == (2,)
    assert reduce_across_processes([1.0, 2.5], CPU).tolist() == [1.0, 2.5]


def test_collectives_are_made_only_in_training_distributed() -> None:
    """One place builds the tensors handed to collectives; a collective called elsewhere in
    training/ would escape the device rule checked above."""
    pattern = re.compile(r"\b(dist|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")
    offenders = [p.name for p in (ROOT / "training").glob("*.py")
                 if p.name != "distributed.py" and pattern.search(p.read_text())]
    assert offenders == []


# -- shuffling (b) -----------------------------------------------------------------------------

def test_each_epoch_has_its_own_order_and_ranks_split_it() -> None:
    ds = TensorDataset(torch.arange(32), torch.arange(32))
    val = TensorDataset(torch.arange(5), torch.arange(5))

    def orders(rank: int) -> list[list[int]]:
        loaders = build_loaders(ds, val, batch_size=4, seed=7, rank=rank, world_size=2,
                                device=CPU, workers=0)
        return [[int(i) for x, _ in loaders.train_epoch(epoch) for i in x]
                for epoch in (0, 1, 0)]

    r0, r1 = orders(0), orders(1)
    assert r0[0] != r0[1] and r1[0] != r1[1]  # reshuffled per epoch
    assert r0[0] == r0[2]  # an epoch's order depends on (seed, epoch) only: resumes repeat it
    for epoch in (0, 1):
        assert sorted(r0[epoch] + r1[epoch]) == list(range(32))  # disjoint, covering


def test_validation_shards_are_disjoint_and_not_padded() -> None:
    shards = [list(ShardSampler(23, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(23))
    assert [len(s) for s in shards] == [8, 8, 7]


def test_loader_workers_and_pinned_memory_on_a_gpu_only() -> None:
    assert loader_workers(0, "cpu", cpus=16) == 0
    assert loader_workers(0, "cuda", cpus=16) == 8
    assert loader_workers(0, "cuda", cpus=1) == 1
    assert loader_workers(3, "cuda", cpus=16) == 3
    ds = TensorDataset(torch.arange(4), torch.arange(4))
    gpu = build_loaders(ds, ds, batch_size=2, seed=0, rank=0, world_size=1,
                        device=torch.device("cuda"), workers=2)
    assert gpu.train.pin_memory and gpu.val.pin_memory and gpu.train.num_workers == 2
    assert not build_loaders(ds, ds, batch_size=2, seed=0, rank=0, world_size=1, device=CPU,
                             workers=0).train.pin_memory


# -- sharded validation (c) ----------------------------------------------------------------------

def _validate_rank(rank: int, world_size: int, tmp: str) -> None:
    torch.set_num_threads(1)
    _init_group(Path(tmp) / "store", rank, world_size)
    log: list[str] = []
    undo = _recording_collectives(CPU, log)
    try:
        net = _small_bn_net()
        if rank:  # as after DDP training: each rank's running statistics saw its own batches
            for name, buf in net.named_buffers():
                if name.endswith("running_mean"):
                    buf.add_(0.5)
                elif name.endswith("running_var"):
                    buf.mul_(3.0)
        ds = _val_set()
        loader = DataLoader(ds, batch_size=4, sampler=ShardSampler(len(ds), rank, world_size))
        stats = validate(net, loader, nn.CrossEntropyLoss(), CPU, 3)
    finally:
        undo()
        dist.destroy_process_group()
    (Path(tmp) / f"val{rank}.json").write_text(json.dumps(
        {"loss": stats.loss, "accuracy": stats.accuracy, "count": stats.count,
         "confusion": stats.confusion, "correct": stats.correct, "collectives": log}))


@pytest.mark.slow  # spawns two processes that each import torch
def test_sharded_validation_over_two_ranks_equals_one_process_on_the_whole_set(
        tmp_path: Path) -> None:
    mp.spawn(_validate_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    whole = evaluate(_small_bn_net(), DataLoader(_val_set(), batch_size=4),
                     nn.CrossEntropyLoss(), CPU, 3)
    results = [json.loads((tmp_path / f"val{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["count"] == whole.count == 23
        assert r["correct"] == whole.correct and r["accuracy"] == whole.accuracy
        assert r["confusion"] == whole.confusion
        assert r["loss"] == pytest.approx(whole.loss, rel=1e-6)
        assert r["collectives"] and all(c.endswith(" cpu") for c in r["collectives"])
    assert results[0] == results[1]  # identical on every rank, to the last bit


# -- the whole loop under torch.distributed (d) --------------------------------------------------

def _loop_rank(rank: int, world_size: int, tmp: str, loop: LoopConfig) -> None:
    _init_group(Path(tmp) / "store", rank, world_size)
    log: list[str] = []
    undo = _recording_collectives(CPU, log)
    try:
        run_worker(loop, _RecordingSession(Path(tmp) / "run", Path(tmp)))
    finally:
        undo()
        dist.destroy_process_group()
    (Path(tmp) / f"collectives{rank}.json").write_text(json.dumps(log))


@pytest.mark.slow  # spawns two processes that each import torch
def test_two_ranks_train_under_gloo_without_ray(tmp_path: Path) -> None:
    loop = _loop(tmp_path, _write_images(tmp_path / "images", per_label=8))
    assert len(loop.train_samples) == 12 and len(loop.val_samples) == 4
    mp.spawn(_loop_rank, args=(2, str(tmp_path), loop), nprocs=2, join=True)

    session = TorchSession(tmp_path / "run", CPU)
    assert [p.name for p in session.checkpoints()] == ["checkpoint_000000", "checkpoint_000001"]
    state = torch.load(session.checkpoints()[-1] / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 2 and state["train_config"]["backbone"] == "resnet18"
    reported = session.metrics()
    assert [m["epoch"] for m in reported] == [1, 2]
    per_rank = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text()
                 .splitlines()] for r in (0, 1)]
    for a, b in zip(*per_rank, strict=True):  # the same validation figures on both ranks
        assert (a["val_loss"], a["val_accuracy"]) == (b["val_loss"], b["val_accuracy"])
    progress = json.loads(loop.progress_path.read_text())
    assert progress["fraction"] == 1.0 and len(progress["metrics"]) == 2
    for r in (0, 1):
        log = json.loads((tmp_path / f"collectives{r}.json").read_text())
        # 2 epochs x 2 steps (6 images per rank, batch 4): the cancel check every step, the
        # train sums, the BatchNorm broadcast and the validation counts, all on the device.
        assert sum(c.startswith("all_reduce") for c in log) == 2 * (2 + 2)
        assert any(c.startswith("broadcast") for c in log)
        assert all(c.endswith(" cpu") for c in log)


def test_feature_cache_resume_and_cancel_in_one_process(tmp_path: Path, group: None) -> None:
    """World size 1 in this process: feature-extract on cached features (the cache barrier is a
    collective too), then a restart that resumes, then a cancel that stops before a step."""
    log: list[str] = []
    undo = _recording_collectives(CPU, log)
    try:
        loop = _loop(tmp_path, _write_images(tmp_path / "images", per_label=6),
                     strategy="feature-extract", augment=False, epochs=1, batch_size=8)
        assert loop.uses_feature_cache
        run_worker(loop, TorchSession(tmp_path / "run", CPU))
        assert len(list((tmp_path / "cache" / "features" / "resnet18-random").iterdir())) == 12

        loop = replace(loop, train_config=loop.train_config.model_copy(update={"epochs": 2}))
        run_worker(loop, TorchSession(tmp_path / "run", CPU))
        progress = json.loads(loop.progress_path.read_text())
        assert progress["resumed_from_epoch"] == 1
        assert [m["epoch"] for m in progress["metrics"]] == [1, 2]

        loop.cancel_path.touch()
        loop = replace(loop, train_config=loop.train_config.model_copy(update={"epochs": 3}))
        run_worker(loop, TorchSession(tmp_path / "run", CPU))
        assert len(TorchSession(tmp_path / "run", CPU).checkpoints()) == 2  # nothing new
    finally:
        undo()
    assert log and all(c.endswith(" cpu") for c in log)


# -- without Ray ---------------------------------------------------------------------------------

NO_RAY = "import sys; sys.modules['ray'] = None; "


def test_the_loop_imports_without_ray() -> None:
    code = NO_RAY + "import training.loop, training.distributed, benchmarks.gpu"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py --smoke with no CUDA and Ray made unimportable: the product's loop
    under gloo, the classifier on the CPU, results written, the fallback said."""
    code = NO_RAY + ("from benchmarks.gpu import main; main(['--smoke']); import json; "
                     "print(json.dumps([m for m in sys.modules if sys.modules[m]]))")
    env = {**os.environ, "VISIONLOOP_BENCH_OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no CUDA here: fell back to the CPU with gloo" in (tmp_path / "gpu.md").read_text()
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {row["section"] for row in result["table"]} == {"training", "classifier"}
    assert set(result["curves"]) == {"product", "tutorial"}
    assert not any(m.startswith("ray") for m in json.loads(out.stdout.splitlines()[-1]))


def test_a_resume_with_every_epoch_done_reads_as_done_at_once(tmp_path: Path) -> None:
    """A job stopped after its last checkpoint but before it was published (the process died
    in between) is resumed with no epoch left: no step runs, and the progress file says at once
    where it stands (epoch 2/2, resumed from 2, the metrics of both epochs) instead of 0/2."""
    loop = _loop(tmp_path, _write_images(tmp_path / "images", per_label=4), epochs=2)
    run_worker(loop, TorchSession(tmp_path / "run", CPU))
    first = json.loads(loop.progress_path.read_text())
    run_worker(loop, TorchSession(tmp_path / "run", CPU))
    again = json.loads(loop.progress_path.read_text())
    assert (again["epoch"], again["epochs"], again["fraction"]) == (2, 2, 1.0)
    assert again["resumed_from_epoch"] == 2 and again["metrics"] == first["metrics"]
    assert [a["resumed_from_epoch"] for a in again["attempts"]] == [None, 2]
    assert len(TorchSession(tmp_path / "run", CPU).checkpoints()) == 2  # nothing trained


KILLED_LOOP = NO_RAY + textwrap.dedent("""
    import pickle
    from pathlib import Path

    import torch

    from training.distributed import TorchSession
    from training.loop import run_worker

    loop = pickle.loads(Path(sys.argv[1]).read_bytes())
    run_worker(loop, TorchSession(Path(sys.argv[2]), torch.device("cpu")))
""")


@pytest.mark.slow  # spawns a process that imports torch
def test_a_loop_killed_mid_job_resumes_from_its_last_checkpoint_without_ray(
        tmp_path: Path) -> None:
    """The loop under `TorchSession` in a process of its own (Ray unimportable), SIGKILLed once
    two checkpoints are written; run again on the same folder, it starts from the last complete
    checkpoint and keeps the metrics of the epochs before it."""
    epochs = 12
    loop = _loop(tmp_path, _write_images(tmp_path / "images", per_label=8), epochs=epochs)
    (tmp_path / "loop.pickle").write_bytes(pickle.dumps(loop))
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LOOP, str(tmp_path / "loop.pickle"),
                             str(root)], cwd=ROOT)
    try:
        def two_checkpoints() -> bool:
            assert proc.poll() is None, "the loop ended before it could be killed"
            return len(TorchSession(root, CPU).checkpoints()) >= 2

        wait_for(two_checkpoints, timeout=300, interval=0.01, what="two checkpoints")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    session = TorchSession(root, CPU)
    last = session.checkpoints()[-1]
    state = torch.load(last / CHECKPOINT_FILE, weights_only=True)
    done = int(state["epoch"])
    assert 2 <= done < epochs and len(session.checkpoints()) == done

    run_worker(loop, session)
    progress = json.loads(loop.progress_path.read_text())
    assert progress["resumed_from_epoch"] == done
    assert [m["epoch"] for m in progress["metrics"]] == list(range(1, epochs + 1))
    assert progress["metrics"][:done] == state["history"]  # the epochs before, as they were
    assert progress["fraction"] == 1.0
    assert [a["resumed_from_epoch"] for a in progress["attempts"]] == [None, done]
    assert len(session.checkpoints()) == epochs
