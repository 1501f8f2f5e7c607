"""One training job, end to end: the single code path behind `visionloop train` and
`POST /v1/train`.

    prepare_data (check the live dataset) -> take the job lock -> snapshot the dataset
    (`DatasetStore.snapshot`: the job's frozen images) -> prepare_data on the snapshot (the
    train / validation / test split by content hash) -> Ray Train TorchTrainer.fit() with one
    `LoopConfig` (train and validation only) -> best checkpoint by val accuracy -> publish:
    `judge` evaluates it, the current model and every other version with the same classes on
    the held-out test split -> models/v<N> -> promote to CURRENT if the `gate` passes ->
    `JobStore.finish` records the end -> the snapshot is removed.

Deletes and relabels while the job runs change the store, not the snapshot, and count as new
for the next job: the job record's `ledger_offset` is the snapshot's
(`service.controller.new_since_last_job` counts from it).

The caller owns Ray: `ray.init()` (local or `RAY_ADDRESS`) happens before `run_job`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.config import GateConfig, TrainConfig
from training.dataset import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    DatasetStore,
    DatasetTooSmall,
    Item,
    Snapshot,
    split_items,
)
from training.engine import EpochStats, ImageFileDataset, evaluate
from training.features import ensure_resized, feature_key
from training.inference import choose_engine
from training.jobs import (
    CANCELLED_ON_REQUEST,
    JobStore,
    error_text,
    new_job_id,
    progress_summary,
)
from training.loop import CHECKPOINT_FILE, LoopConfig, Sample, train_loop_per_worker
from training.model import BackboneChoice, build_model
from training.plots import plot_confusion, plot_curves
from training.presets import EvalPreset
from training.registry import (
    DATA,
    InvalidVersion,
    Registry,
    VersionNotFound,
    software_versions,
)
from training.resources import DEFAULT_PENDING_TIMEOUT_S, wait_for_resources, worker_resources

log = logging.getLogger(__name__)

MIN_IMAGES_PER_LABEL = 2
# Per held-out split: with one image, every epoch (validation) or every model (test) scores
# 0 or 1, which tells nothing apart.
MIN_HELD_OUT_IMAGES = 2
# Accuracies are k/n and minimums products of floats: equal in exact arithmetic must pass.
ACCURACY_TOLERANCE = 1e-9


def _pairs(items: Sequence[Item]) -> list[list[str]]:
    return [[i.sha256, i.label] for i in items]


def _digest(items: Sequence[Item]) -> str:
    pairs = sorted((i.sha256, i.label) for i in items)
    return hashlib.sha256("\n".join(f"{s} {lab}" for s, lab in pairs).encode()).hexdigest()


@dataclass
class PreparedData:
    """A checked three-way split of one dataset (a job's snapshot; or the live store, to
    refuse early): `train` trains, `val` picks the best epoch, `test` is held out for the
    promotion gate alone. Items keep the store's order (label, then sha256)."""

    classes: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    fingerprint: dict[str, Any]

    @property
    def class_index(self) -> dict[str, int]:
        """label -> its index in `classes` (the model's output order)."""
        return {c: i for i, c in enumerate(self.classes)}

    def data_list(self) -> dict[str, Any]:
        """models/v<N>/data.json: the (sha256, label) pairs of each split, and the split."""
        return {"train": _pairs(self.train), "val": _pairs(self.val), "test": _pairs(self.test),
                "split": {"by": "sha256", "val_fraction": self.fingerprint["val_fraction"],
                          "test_fraction": self.fingerprint["test_fraction"]}}


def prepare_data(source: DatasetStore | Snapshot, val_fraction: float = DEFAULT_VAL_FRACTION,
                 test_fraction: float = DEFAULT_TEST_FRACTION) -> PreparedData:
    """Split and check a dataset; raise DatasetTooSmall saying what to add.

    Needs: 2 labels or more, MIN_IMAGES_PER_LABEL images of each, every label in the training
    split, and MIN_HELD_OUT_IMAGES in each of the validation and test splits. An image's split
    is fixed by its hash, so an empty held-out split fills only with new images; the message
    says about how many (the shortfall over the split's share, rounded up)."""
    items = source.items()
    train, val, test = split_items(items, val_fraction, test_fraction)
    tally = Counter(i.label for i in items)
    counts = {label: tally[label] for label in sorted(tally)}
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
    short = [(name, len(split), fraction) for name, split, fraction in
             (("validation", val, val_fraction), ("test", test, test_fraction))
             if len(split) < MIN_HELD_OUT_IMAGES]
    if short:
        more = max(math.ceil((MIN_HELD_OUT_IMAGES - n) / f) for _, n, f in short)
        splits = " and ".join(f"the {name} split has {n} image(s) (about {f:.0%} of images go "
                              "there)" for name, n, f in short)
        raise DatasetTooSmall(
            f"{splits}, of {len(items)} in all; each held-out split needs at least "
            f"{MIN_HELD_OUT_IMAGES}, and an image's split is fixed by its content hash, so only "
            f"new images fill it: add about {more} more labelled images (any label)")
    fingerprint: dict[str, Any] = {
        "label_counts": counts, "images_sha256": _digest(items), "train_count": len(train),
        "val_count": len(val), "test_count": len(test), "val_fraction": val_fraction,
        "test_fraction": test_fraction, "test_sha256": _digest(test)}
    if isinstance(source, Snapshot):
        fingerprint["ledger_offset"] = source.ledger_offset
    return PreparedData(classes, train, val, test, fingerprint)


def evaluate_model(model: nn.Module, preset: EvalPreset, items: Sequence[Item],
                   class_index: dict[str, int], num_classes: int, batch_size: int = 32
                   ) -> EpochStats:
    """Accuracy of `model` on `items` (labels mapped through `class_index`), on the CPU."""
    samples = [(str(i.path), class_index[i.label]) for i in items]
    loader = DataLoader(ImageFileDataset(samples, preset, preset.resize), batch_size=batch_size)
    return evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), num_classes)


def majority_baseline(test: Sequence[Item]) -> float:
    """The no-information rate of `test`: the accuracy of always answering its most frequent
    label. No model that ignores the image does better (a constant answer scores its label's
    share; a random one, on average, at most the largest share), so a candidate is held to
    beat it. 0.0 for an empty split."""
    counts = Counter(i.label for i in test)
    return max(counts.values(), default=0) / max(1, len(test))


@dataclass(frozen=True)
class VersionScore:
    """A published version judged on a candidate's test split. `accuracy` None: not compared,
    `note` says why. `trained_on_test`: images of this test split that its own data list has
    under "train" (only versions published before the three-way split have any; their score
    is optimistic)."""

    version: str
    accuracy: float | None
    note: str | None = None
    trained_on_test: int = 0


def gate(candidate_acc: float, baseline: float, test_count: int, current: VersionScore | None,
         best: VersionScore | None, cfg: GateConfig) -> tuple[bool, str]:
    """-> (promote?, reason). Every accuracy is on the same held-out test split of
    `test_count` images; `baseline` is its majority-class baseline.

    Promote when the candidate reaches `cfg.minimum(baseline)` and, when the current model was
    compared (`current.accuracy` set), is at most `cfg.max_regression` below it. `best` (the
    best other version with these classes) is named in the reason but never decides: CURRENT
    may be a person's choice (a rollback), and refusing a candidate that beats CURRENT because
    of a version nobody serves would keep the worse model serving; a better earlier version is
    one `activate` away, and the reason says so."""
    minimum = cfg.minimum(baseline)
    by_baseline = baseline + cfg.min_error_reduction * (1 - baseline)
    why_min = (f"the minimum {minimum:.4f} (the configured floor)"
               if cfg.min_accuracy > by_baseline else
               f"the minimum {minimum:.4f} (majority-class baseline {baseline:.4f} plus "
               f"{cfg.min_error_reduction:.0%} of its errors)")
    failed, passed = [], []
    if candidate_acc + ACCURACY_TOLERANCE < minimum:
        failed.append(f"below {why_min}")
    else:
        passed.append(f">= {why_min}")
    compared = current is not None and current.accuracy is not None
    if current is not None and current.accuracy is not None:
        allowed = (f" (allowed regression {cfg.max_regression:.4f})"
                   if cfg.max_regression else "")
        if candidate_acc + cfg.max_regression + ACCURACY_TOLERANCE < current.accuracy:
            failed.append(f"worse than the current model {current.version}'s "
                          f"{current.accuracy:.4f} on the same test split{allowed}")
        else:
            passed.append(f"not worse than the current model {current.version}'s "
                          f"{current.accuracy:.4f} on the same test split{allowed}")
    verdict = f"test accuracy {candidate_acc:.4f} on {test_count} held-out image(s) " + (
        "is " + " and ".join(failed) if failed else " and ".join(passed))
    notes = [verdict]
    if current is not None and not compared:
        notes.append(f"the current model {current.version} is not compared: {current.note}")
    if best is not None and best.accuracy is not None:
        if best.accuracy > candidate_acc + ACCURACY_TOLERANCE:
            notes.append(f"the best version so far is {best.version} with {best.accuracy:.4f} "
                         "on the same test split, better than this candidate (POST "
                         f"/v1/models/{best.version}/activate serves it)")
        else:
            notes.append(f"the best earlier version, {best.version}, has {best.accuracy:.4f} "
                         "on the same test split")
    elif not compared:
        notes.append("no earlier version has these classes")
    for score in {s.version: s for s in (current, best) if s is not None}.values():
        if score.trained_on_test:
            notes.append(f"{score.version} trained on {score.trained_on_test} of these test "
                         "images (published before the three-way split), so its score is "
                         "optimistic")
    return not failed, "; ".join(notes)


def _trained_on(registry: Registry, version: str, shas: set[str]) -> int:
    """How many of `shas` the version's data list has under "train" (0 when it has none)."""
    try:
        data = json.loads((registry.version_dir(version) / DATA).read_text())
        return sum(1 for sha, _ in data.get("train") or [] if sha in shas)
    except (OSError, ValueError, TypeError, VersionNotFound):
        return 0


def score_version(registry: Registry, version: str, data: PreparedData, is_current: bool
                  ) -> VersionScore | None:
    """`version` evaluated on `data.test` with its own preprocessing, as it is served. A
    version with other classes, or one that cannot be loaded, is not scored: -> a score with a
    note for the current model, None for any other."""
    try:
        classes = list(registry.manifest(version).get("classes") or [])
        if classes != data.classes:
            note = (f"it predicts other classes ({len(classes)} of them; the candidate has "
                    f"{len(data.classes)})")
            return VersionScore(version, None, note) if is_current else None
        loaded = registry.load(version)
        accuracy = evaluate_model(loaded.model, loaded.preset, data.test, data.class_index,
                                  len(data.classes)).accuracy
    except (VersionNotFound, InvalidVersion) as exc:  # removed by retention, or corrupt
        log.warning("version %s cannot be evaluated for the gate: %s", version, exc)
        return VersionScore(version, None, f"it cannot be evaluated: {exc}") \
            if is_current else None
    return VersionScore(version, accuracy,
                        trained_on_test=_trained_on(registry, version,
                                                    {i.sha256 for i in data.test}))


@dataclass
class Judgement:
    """What the gate saw and decided for one candidate (`judge`)."""

    test: EpochStats  # the candidate on the test split
    baseline: float
    minimum: float
    current: VersionScore | None
    best: VersionScore | None
    scores: list[VersionScore]  # every version evaluated, oldest first
    promote: bool
    reason: str

    def record(self, data: PreparedData, cfg: GateConfig) -> dict[str, Any]:
        """The manifest's and the job record's `promotion`: the split that judged and the
        numbers."""
        cur, best = self.current, self.best
        return {
            "promoted": self.promote, "reason": self.reason, "judged_on": "test",
            "test_count": len(data.test), "test_sha256": data.fingerprint["test_sha256"],
            "candidate_test_accuracy": self.test.accuracy, "candidate_test_loss": self.test.loss,
            "baseline_accuracy": self.baseline, "minimum_accuracy": self.minimum,
            "current_version": cur.version if cur else None,
            "current_test_accuracy": cur.accuracy if cur else None,
            "current_note": cur.note if cur else None,
            "best_version": best.version if best else None,
            "best_test_accuracy": best.accuracy if best else None,
            "compared": [{"version": s.version, "test_accuracy": s.accuracy,
                          "trained_on_test": s.trained_on_test} for s in self.scores],
            "gate": cfg.model_dump(),
        }


def judge(registry: Registry, candidate: nn.Module, preset: EvalPreset, data: PreparedData,
          cfg: GateConfig) -> Judgement:
    """Evaluate the candidate, the current model and every other version with the same
    classes on the held-out test split, then apply the `gate`. The versions are those that
    retention kept (`VISIONLOOP_KEEP_VERSIONS` bounds the cost: one CPU pass over the test
    split each)."""
    test = evaluate_model(candidate, preset, data.test, data.class_index, len(data.classes))
    baseline = majority_baseline(data.test)
    current_name = registry.current()
    current: VersionScore | None = None
    scores: list[VersionScore] = []
    for version in registry.versions():
        score = score_version(registry, version, data, version == current_name)
        if score is None:
            continue
        if version == current_name:
            current = score
        if score.accuracy is not None:
            scores.append(score)
    others = [s for s in scores if s.version != current_name]
    best = max(reversed(others), key=lambda s: s.accuracy or 0.0) if others else None
    promote, reason = gate(test.accuracy, baseline, len(data.test), current, best, cfg)
    return Judgement(test, baseline, cfg.minimum(baseline), current, best, scores, promote,
                     reason)


def run_job(home: Path, cfg: TrainConfig, job_id: str | None = None, source: str = "cli",
            keep_versions: int | None = None,
            on_started: Callable[[str], None] | None = None,
            pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S) -> dict[str, Any]:
    """Run one job to its end; -> the final job record. Raises JobRunning (lock held) and
    DatasetTooSmall (before any worker starts; a record is created only once the job's
    snapshot passes) to the caller; other failures end in a record with status `failed` and
    the error. The job trains and is judged on its dataset snapshot, removed when it ends.
    Before `fit()` it waits at most `pending_timeout_s` for the workers' resources
    (`training.resources.wait_for_resources`: reason `pending`; a cancel meanwhile ends the
    job at once)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    home = Path(home).resolve()
    store, registry, jobs = DatasetStore(home), Registry(home), JobStore(home)
    prepare_data(store)  # the live dataset: refused before anything is written
    lock = jobs.acquire()
    snapshot: Snapshot | None = None
    try:
        record = jobs.get(job_id) if job_id else None  # the controller's queued record
        job_id = job_id or new_job_id()
        # With the job lock held no other job runs on this volume: other snapshots are of jobs
        # that died. This job's own is kept, so a job resumed under its id sees the same data.
        store.prune_snapshots(keep={job_id})
        snapshot = store.open_snapshot(job_id) or store.snapshot(job_id)
        data = prepare_data(snapshot)  # deletes since the check above may make it too small
        if record is None:
            record = jobs.create(cfg.model_dump(), source, job_id=job_id)
        if on_started:
            on_started(job_id)
        registry.ensure_v0(cfg.backbone)
        choice = registry.resolve_backbone(cfg.backbone)
        jobs.update(job_id, status="running", started_at=time.time(),
                    backbone=choice.name, ledger_offset=snapshot.ledger_offset,
                    dataset=data.fingerprint)
        loop = loop_config(home, jobs, job_id, cfg, choice, data)
        resources = worker_resources(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop.as_train_loop_config(),
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
            ended = wait_for_resources(cfg, jobs, job_id, pending_timeout_s)
            if ended is not None:  # cancelled or timed out before any worker started
                return ended
            result = trainer.fit()
            if jobs.cancel_requested(job_id):
                return jobs.finish(job_id, "cancelled", CANCELLED_ON_REQUEST,
                                   metrics=jobs.progress_metrics(job_id))
            best = result.get_best_checkpoint("val_accuracy", "max") if result.best_checkpoints \
                else None
            if best is None:
                raise RuntimeError("training produced no checkpoint")
            with best.as_directory() as d:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu",
                                   weights_only=True)
            return publish(registry, jobs, job_id, cfg, choice, data, state, keep_versions)
        except Exception as exc:
            log.exception("training job %s failed", job_id)
            return jobs.finish(job_id, "failed", "error", error=error_text(exc),
                               metrics=jobs.progress_metrics(job_id))
    finally:
        try:
            if snapshot is not None:
                store.remove_snapshot(snapshot.job_id)
        finally:
            lock.release()


def loop_config(home: Path, jobs: JobStore, job_id: str, cfg: TrainConfig,
                choice: BackboneChoice, data: PreparedData) -> LoopConfig:
    """What the workers get: `cfg` with its backbone resolved, the train and validation samples
    (training reads resized copies in `cache/` where the originals are large; the test split
    never reaches the workers), the preset, the feature key and the paths."""
    class_index = data.class_index
    preset = EvalPreset.for_size(cfg.image_size)
    files = ensure_resized(data.train + data.val, home / "cache", preset.resize)

    def samples(items: list[Item]) -> tuple[Sample, ...]:
        return tuple(Sample(files[i.sha256], class_index[i.label], i.sha256) for i in items)

    return LoopConfig(
        train_config=cfg.model_copy(update={"backbone": choice.name}),
        classes=tuple(data.classes),
        train_samples=samples(data.train), val_samples=samples(data.val),
        preset=preset, feature_key=feature_key(choice.name, choice.weights_origin, preset),
        feature_cache_root=home / "cache", torch_cache_dir=home / "cache" / "torch",
        cancel_path=jobs.cancel_path(job_id), progress_path=jobs.progress_path(job_id))


def publish(registry: Registry, jobs: JobStore, job_id: str, cfg: TrainConfig,
            choice: BackboneChoice, data: PreparedData, state: dict[str, Any],
            keep_versions: int | None) -> dict[str, Any]:
    """The best checkpoint's `state` -> judged on the held-out test split (`judge`), published
    as models/v<N> with its data list, promoted if it passes the gate; the job finishes
    `succeeded`. -> the final record.

    The manifest's validation figures (`best_val_accuracy`, the confusion matrix and plot) are
    the workers' evaluation of the best epoch, the one that chose it; `metrics.test` and
    `promotion` hold the held-out figures the gate used."""
    progress = jobs.read_progress(job_id) or {}
    preset = EvalPreset.for_size(cfg.image_size)
    candidate = build_model(choice.name, num_classes=len(data.classes), pretrained=False)
    candidate.load_state_dict(state["model"])
    candidate.eval()
    judged = judge(registry, candidate, preset, data, cfg.gate)
    promotion = judged.record(data, cfg.gate)

    # The progress file has every epoch; the best checkpoint only the epochs up to itself.
    history = list(progress.get("metrics") or state["history"])
    best_epoch = int(state["epoch"])
    best = next(m for m in state["history"] if int(m["epoch"]) == best_epoch)
    val_confusion = state["confusion"]
    test = judged.test
    version, staging = registry.allocate()
    try:
        inference = choose_engine(candidate, staging, preset.crop)
        plot_curves(history, staging / "curves.png")
        plot_confusion(val_confusion, data.classes, staging / "confusion.png")
        manifest = {
            "backbone": choice.name, "weights_origin": choice.weights_origin,
            "backbone_reason": choice.reason, "classes": data.classes,
            "preprocessing": preset.to_dict(), "training_config": cfg.model_dump(),
            "strategy": cfg.strategy, "data_fingerprint": data.fingerprint,
            "metrics": {
                "epochs": history, "best_epoch": best_epoch,
                "best_val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
                "per_class_accuracy": _per_class(val_confusion, data.classes),
                "confusion_matrix": val_confusion,
                "test": {"accuracy": test.accuracy, "loss": test.loss, "count": test.count,
                         "per_class_accuracy": _per_class(test.confusion, data.classes),
                         "confusion_matrix": test.confusion},
            },
            "promotion": promotion,
            "parent": promotion["current_version"], "job_id": job_id,
            "created_at": time.time(),
            "software": software_versions(), "plots": ["curves", "confusion"],
            "inference": inference,
        }
        registry.publish(version, staging, state["model"], manifest, data.data_list())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if judged.promote:
        registry.set_current(version)
    log.info("job %s: %s published, %s (%s)", job_id, version,
             "promoted" if judged.promote else "not promoted", judged.reason)
    if keep_versions:
        registry.prune(keep_versions)
    return jobs.finish(job_id, "succeeded", judged.reason, version=version,
                       promoted=judged.promote, metrics=history,
                       progress={**progress_summary(progress, cfg.epochs), "fraction": 1.0,
                                 "eta_s": 0},
                       resumed_from_epoch=progress.get("resumed_from_epoch"),
                       val_accuracy=best["val_accuracy"], test_accuracy=test.accuracy,
                       current_test_accuracy=promotion["current_test_accuracy"],
                       promotion=promotion)


def _per_class(confusion: list[list[int]], classes: list[str]) -> dict[str, float | None]:
    """class -> recall from a (true, predicted) confusion matrix; None for a class with no
    image."""
    return {c: (row[k] / sum(row) if sum(row) else None)
            for k, (c, row) in enumerate(zip(classes, confusion, strict=True))}
