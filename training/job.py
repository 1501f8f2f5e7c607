"""One training job, end to end: the single code path behind `visionloop train` and
`POST /v1/train`.

    validate the dataset -> take the job lock -> Ray Train TorchTrainer.fit() ->
    best checkpoint by val accuracy -> evaluate it and the current model on the same validation
    split -> publish models/v<N> -> promote to CURRENT if the gate passes -> record everything.

The caller owns Ray: `ray.init()` (local or `RAY_ADDRESS`) happens before `run_job`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.config import GateConfig, TrainConfig
from training.dataset import DatasetStore, DatasetTooSmall, Item
from training.engine import EpochStats, ImageFileDataset, evaluate
from training.features import ensure_resized, feature_key
from training.inference import choose_engine
from training.jobs import JobStore
from training.loop import CHECKPOINT_FILE, train_loop_per_worker
from training.model import build_model
from training.plots import plot_confusion, plot_curves
from training.presets import EvalPreset
from training.registry import InvalidVersion, Registry, VersionNotFound, software_versions

log = logging.getLogger(__name__)

MIN_IMAGES_PER_LABEL = 2


@dataclass
class PreparedData:
    classes: list[str]
    train: list[Item]
    val: list[Item]
    fingerprint: dict[str, Any]


def prepare_data(store: DatasetStore, val_fraction: float = 0.2) -> PreparedData:
    """Split and check the dataset; raise DatasetTooSmall saying what to add."""
    train, val = store.split(val_fraction)
    counts = store.counts()
    classes = sorted(counts)
    if len(classes) < 2:
        have = f"only {classes[0]!r}" if classes else "no labelled images"
        raise DatasetTooSmall(f"training needs at least 2 labels; the dataset has {have}. "
                              "Add labelled images of at least one more label.")
    few = {c: n for c, n in counts.items() if n < MIN_IMAGES_PER_LABEL}
    if few:
        raise DatasetTooSmall(f"each label needs at least {MIN_IMAGES_PER_LABEL} images; add "
                              + ", ".join(f"{MIN_IMAGES_PER_LABEL - n} more of {c!r}"
                                          for c, n in few.items()))
    train_labels = {i.label for i in train}
    missing = [c for c in classes if c not in train_labels]
    if missing:
        raise DatasetTooSmall(
            f"labels {missing} have no image in the training split (the split is by content "
            "hash); add more images of them")
    if len(val) < 2:
        raise DatasetTooSmall(
            f"the validation split has {len(val)} image(s) of {len(train) + len(val)} "
            f"(about {val_fraction:.0%} go there, chosen by content hash); add more labelled "
            "images so it holds at least 2")
    pairs = sorted((i.sha256, i.label) for i in train + val)
    digest = hashlib.sha256("\n".join(f"{s} {lab}" for s, lab in pairs).encode()).hexdigest()
    fingerprint = {"label_counts": counts, "images_sha256": digest, "train_count": len(train),
                   "val_count": len(val), "val_fraction": val_fraction}
    return PreparedData(classes, train, val, fingerprint)


def evaluate_model(model: nn.Module, preset: EvalPreset, items: list[Item],
                   class_index: dict[str, int], num_classes: int, batch_size: int = 32
                   ) -> EpochStats:
    """Accuracy of `model` on `items` (labels mapped through `class_index`), on the CPU."""
    samples = [(str(i.path), class_index[i.label]) for i in items]
    loader = DataLoader(ImageFileDataset(samples, preset, preset.resize), batch_size=batch_size)
    return evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), num_classes)


def gate(candidate_acc: float, current_acc: float | None, comparable: bool,
         cfg: GateConfig) -> tuple[bool, str]:
    """-> (promote?, reason)."""
    if candidate_acc < cfg.min_val_accuracy:
        return False, (f"val accuracy {candidate_acc:.4f} is below the minimum "
                       f"{cfg.min_val_accuracy:.4f}")
    if not comparable or current_acc is None:
        return True, (f"val accuracy {candidate_acc:.4f} >= minimum {cfg.min_val_accuracy:.4f}; "
                      "the current model has other classes, so only the minimum applies")
    if candidate_acc + cfg.max_regression < current_acc:
        return False, (f"val accuracy {candidate_acc:.4f} is worse than the current model's "
                       f"{current_acc:.4f} on the same validation split")
    return True, (f"val accuracy {candidate_acc:.4f} >= current model's {current_acc:.4f} "
                  f"(allowed regression {cfg.max_regression:.4f}) and >= minimum "
                  f"{cfg.min_val_accuracy:.4f}")


def read_progress(jobs: JobStore, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((jobs.root / f"{job_id}.progress.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_job(home: Path, cfg: TrainConfig, job_id: str | None = None, source: str = "cli",
            keep_versions: int | None = None,
            on_started: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one job to its end; -> the final job record. Raises JobRunning (lock held) and
    DatasetTooSmall (before anything starts) to the caller; other failures end in a record with
    status `failed` and the error."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    home = Path(home).resolve()
    store, registry, jobs = DatasetStore(home), Registry(home), JobStore(home)
    data = prepare_data(store)  # fails before any worker starts
    lock = jobs.acquire()
    try:
        record = jobs.get(job_id) if job_id else jobs.create(cfg.model_dump(), source)
        job_id = record["job_id"]
        if on_started:
            on_started(job_id)
        registry.ensure_v0(cfg.backbone)
        choice = registry.resolve_backbone(cfg.backbone)
        ledger_offset = store.ledger_length()
        jobs.update(job_id, status="running", started_at=time.time(),
                    backbone=choice.name, ledger_offset=ledger_offset,
                    dataset=data.fingerprint)
        class_index = {c: i for i, c in enumerate(data.classes)}
        cancel_path = jobs.cancel_path(job_id)
        progress_path = jobs.root / f"{job_id}.progress.json"
        preset = EvalPreset.for_size(cfg.image_size)
        files = ensure_resized(data.train + data.val, home / "cache", preset.resize)
        loop_config = {
            "train": cfg.model_dump(), "backbone": choice.name, "classes": data.classes,
            "train_samples": [(str(files[i.sha256]), class_index[i.label]) for i in data.train],
            "val_samples": [(str(files[i.sha256]), class_index[i.label]) for i in data.val],
            "train_shas": [i.sha256 for i in data.train],
            "val_shas": [i.sha256 for i in data.val],
            "preset": preset.to_dict(),
            "feature_key": feature_key(choice.name, choice.weights_origin, preset),
            "feature_cache_root": str(home / "cache"),
            "cache_dir": str(home / "cache" / "torch"), "cancel_path": str(cancel_path),
            "progress_path": str(progress_path),
        }
        resources = {"CPU": 1, **({"GPU": 1} if cfg.gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                storage_path=str(home / "runs"), name=job_id,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.checkpoints_to_keep,
                    checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        try:
            result = trainer.fit()
            progress = read_progress(jobs, job_id) or {}
            if cancel_path.exists():
                return jobs.update(job_id, status="cancelled", finished_at=time.time(),
                                   reason="cancelled on request",
                                   metrics=progress.get("metrics", []))
            best = result.get_best_checkpoint("val_accuracy", "max") if result.best_checkpoints \
                else None
            if best is None:
                raise RuntimeError("training produced no checkpoint")
            with best.as_directory() as d:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu",
                                   weights_only=True)
            record = _publish(home, registry, jobs, job_id, cfg, choice, data, state, progress,
                              keep_versions)
            return record
        except Exception as exc:
            log.exception("training job %s failed", job_id)
            progress = read_progress(jobs, job_id) or {}
            return jobs.update(job_id, status="failed", finished_at=time.time(),
                               error=f"{type(exc).__name__}: {exc}"[:2000],
                               reason="error", metrics=progress.get("metrics", []))
        finally:
            cancel_path.unlink(missing_ok=True)
    finally:
        lock.release()


def _publish(home: Path, registry: Registry, jobs: JobStore, job_id: str, cfg: TrainConfig,
             choice: Any, data: PreparedData, state: dict[str, Any], progress: dict[str, Any],
             keep_versions: int | None) -> dict[str, Any]:
    class_index = {c: i for i, c in enumerate(data.classes)}
    preset = EvalPreset.for_size(cfg.image_size)
    candidate = build_model(choice.name, num_classes=len(data.classes), pretrained=False)
    candidate.load_state_dict(state["model"])
    candidate.eval()
    cand_stats = evaluate_model(candidate, preset, data.val, class_index, len(data.classes))

    current = registry.current()
    current_acc, comparable = None, False
    if current is not None:
        try:
            loaded = registry.load(current)
            comparable = loaded.classes == data.classes
            if comparable:
                current_acc = evaluate_model(loaded.model, loaded.preset, data.val, class_index,
                                             len(data.classes)).accuracy
        except (VersionNotFound, InvalidVersion) as exc:
            log.warning("current model %s cannot be evaluated (%s); gate uses the minimum only",
                        current, exc)
    promote, reason = gate(cand_stats.accuracy, current_acc, comparable, cfg.gate)

    # The progress file has every epoch; the best checkpoint only the epochs up to itself.
    history = list(progress.get("metrics") or state["history"])
    best_epoch = int(state["epoch"])
    version, staging = registry.allocate()
    try:
        inference = choose_engine(candidate, staging, preset.crop)
        plot_curves(history, staging / "curves.png")
        plot_confusion(cand_stats.confusion, data.classes, staging / "confusion.png")
        manifest = {
            "backbone": choice.name, "weights_origin": choice.weights_origin,
            "backbone_reason": choice.reason, "classes": data.classes,
            "preprocessing": preset.to_dict(), "training_config": cfg.model_dump(),
            "strategy": cfg.strategy, "data_fingerprint": data.fingerprint,
            "metrics": {
                "epochs": history, "best_epoch": best_epoch,
                "best_val_accuracy": cand_stats.accuracy, "val_loss": cand_stats.loss,
                "per_class_accuracy": dict(zip(data.classes, cand_stats.per_class_accuracy(),
                                               strict=True)),
                "confusion_matrix": cand_stats.confusion,
            },
            "promotion": {"promoted": promote, "reason": reason,
                          "candidate_val_accuracy": cand_stats.accuracy,
                          "current_version": current, "current_val_accuracy": current_acc,
                          "gate": cfg.gate.model_dump()},
            "parent": current, "job_id": job_id, "created_at": time.time(),
            "software": software_versions(), "plots": ["curves", "confusion"],
            "inference": inference,
        }
        data_list = {"train": [[i.sha256, i.label] for i in data.train],
                     "val": [[i.sha256, i.label] for i in data.val]}
        registry.publish(version, staging, state["model"], manifest, data_list)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if promote:
        registry.set_current(version)
    log.info("job %s: %s published, %s (%s)", job_id, version,
             "promoted" if promote else "not promoted", reason)
    if keep_versions:
        registry.prune(keep_versions)
    return jobs.update(job_id, status="succeeded", finished_at=time.time(), version=version,
                       promoted=promote, reason=reason, metrics=history,
                       progress={**progress_summary(progress, cfg.epochs), "fraction": 1.0,
                                 "eta_s": 0},
                       resumed_from_epoch=progress.get("resumed_from_epoch"),
                       val_accuracy=cand_stats.accuracy, current_val_accuracy=current_acc)


def progress_summary(progress: dict[str, Any] | None, epochs: int) -> dict[str, Any]:
    """The API's progress shape from a progress file (or nothing yet)."""
    p = progress or {}
    return {"epoch": p.get("epoch", 0), "epochs": p.get("epochs", epochs),
            "step": p.get("step", 0), "steps": p.get("steps", 0),
            "fraction": p.get("fraction", 0.0), "eta_s": p.get("eta_s")}


def job_view(jobs: JobStore, job_id: str) -> dict[str, Any]:
    """A job record with live progress and metrics merged in while it runs."""
    record = jobs.get(job_id)
    if record["status"] == "running":
        p = read_progress(jobs, job_id)
        if p:
            record["progress"] = progress_summary(p, record["progress"].get("epochs", 0))
            record["metrics"] = p.get("metrics", [])
            record["resumed_from_epoch"] = p.get("resumed_from_epoch")
    return record
