"""One training job, end to end: the single code path behind `visionloop train` and
`POST /v1/train`.

    prepare_data (check the live dataset) -> take the job lock -> snapshot the dataset
    (`DatasetStore.snapshot`: the job's frozen images) -> prepare_data on the snapshot (the
    train / validation / test split by content hash) -> Ray Train TorchTrainer.fit() with one
    `LoopConfig` (train and validation only; a head fitted on cached features on one worker
    runs the same loop in this process instead, `runs_in_process`) -> best checkpoint by val
    accuracy -> publish:
    `judge` evaluates it, the current model and every other version with the same classes on
    the held-out test split -> models/v<N> -> promote to CURRENT if the `gate` passes ->
    `JobStore.finish` records the end -> the snapshot is removed.

Deletes and relabels while the job runs change the store, not the snapshot, and count as new
for the next job: the job record's `ledger_offset` is the snapshot's
(`service.controller.new_since_last_job` counts from it).

`resume_job` reruns a failed, cancelled or interrupted job under its id: the same config, its
dataset snapshot, and the same Ray Train run folder, so the workers carry on from its last
checkpoint (`plan_resume` says whether that is possible, and why not).

The caller owns Ray: `ray.init()` (local or `RAY_ADDRESS`) happens before `run_job`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from training.calibration import calibrate, choose_threshold, reference
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
from training.distributed import TorchSession, checkpoint_metrics, local_checkpoints
from training.engine import EpochStats, ImageFileDataset, evaluate
from training.features import (
    FeatureCache,
    cpu_extractor,
    ensure_resized,
    feature_key,
    graph_with_head,
    seed_graph,
)
from training.inference import choose_engine
from training.jobs import (
    ACTIVE,
    CANCELLED_ON_REQUEST,
    STAGE_EVALUATING,
    STAGE_PREPARING,
    STAGE_PUBLISHING,
    STAGE_STARTING_WORKERS,
    JobNotResumable,
    JobStore,
    error_text,
    new_job_id,
    progress_summary,
)
from training.loop import (
    CHECKPOINT_FILE,
    LoopConfig,
    Sample,
    cpu_share,
    run_worker,
    train_loop_per_worker,
)
from training.model import BackboneChoice, build_model, split_head
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


def held_out_logits(model: nn.Module, preset: EvalPreset, items: Sequence[Item],
                    class_index: dict[str, int], batch_size: int = 32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`model`'s logits on `items` with their labels, on the CPU: ((N, C) float32, (N,)
    int64)."""
    model.eval()
    return _logits_over(model, preset, items, class_index, batch_size)


def cached_logits(model: nn.Module, preset: EvalPreset, items: Sequence[Item],
                  class_index: dict[str, int], features: FeatureCache, batch_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`held_out_logits` for a model whose backbone is the frozen one `features` caches
    (feature-extract without augmentation): the backbone through the cache's CPU engine
    (`training.features.cpu_extractor`: ONNX Runtime where its outputs equal eager's), then the
    head, on the CPU; the same preprocessing as `held_out_logits`. The held-out split's
    features are computed here and not cached: the cache holds what the workers see."""
    extractor, head = split_head(model)
    engine = cpu_extractor(extractor.eval(), features, preset.crop)
    head.eval()
    return _logits_over(lambda x: head(engine(x).flatten(1)), preset, items, class_index,
                        batch_size)


def _logits_over(forward: Callable[[torch.Tensor], torch.Tensor], preset: EvalPreset,
                 items: Sequence[Item], class_index: dict[str, int], batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` over `items`' images (the eval preprocessing, decoded to the resize) ->
    (logits (N, C) float32, labels (N,) int64)."""
    samples = [(str(i.path), class_index[i.label]) for i in items]
    loader = DataLoader(ImageFileDataset(samples, preset, preset.resize), batch_size=batch_size)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            logits.append(forward(x).float())
            labels.append(y.long())
    if not logits:
        return torch.zeros(0, len(class_index)), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int
                      ) -> EpochStats:
    """What `evaluate` reports (mean cross-entropy, accuracy, confusion matrix, counts) from
    (N, C) logits and (N,) labels already computed: one pass over the test split serves both
    the gate and the calibration."""
    count = len(labels)
    confusion = torch.bincount(labels * num_classes + logits.argmax(1),
                               minlength=num_classes ** 2).view(num_classes, num_classes)
    correct = int(confusion.diag().sum())
    loss = float(nn.functional.cross_entropy(logits.float(), labels)) if count else 0.0
    return EpochStats(loss, correct / max(1, count), count, 0.0, confusion.tolist(), correct)


def answer_quality(classes: Sequence[str], logits: torch.Tensor, labels: torch.Tensor
                   ) -> dict[str, Any]:
    """The manifest's `calibration`, `threshold` and `reference` records from held-out (N, C)
    logits and (N,) labels (see `training.calibration` for why the test split serves)."""
    record = calibrate(logits, labels)
    probs = torch.softmax(logits.double() / record["temperature"], dim=1)
    conf, pred = probs.max(dim=1) if len(labels) else (torch.zeros(0), torch.zeros(0))
    return {"calibration": record,
            "threshold": choose_threshold(conf.tolist(), (pred == labels).tolist()),
            "reference": reference(classes, pred.long().tolist(), conf.tolist())}


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
    current_name: str | None = None  # what CURRENT named when judged (None: nothing served)

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
          cfg: GateConfig, test: EpochStats | None = None) -> Judgement:
    """Evaluate the candidate, the current model and every other version with the same
    classes on the held-out test split, then apply the `gate`. The versions are those that
    retention kept (`VISIONLOOP_KEEP_VERSIONS` bounds the cost: one CPU pass over the test
    split each).

    CURRENT is read once, without the registry lock (evaluating takes seconds to minutes, and
    an activate must not wait for it); the Judgement keeps its name (`current_name`), and the
    promotion (`Registry.publish_candidate`) happens only if CURRENT still names it then.
    `test`: the candidate's figures on the test split when the caller has them already."""
    if test is None:
        test = evaluate_model(candidate, preset, data.test, data.class_index,
                              len(data.classes))
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
                     reason, current_name)


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
    home = Path(home).resolve()
    store, jobs = DatasetStore(home), JobStore(home)
    prepare_data(store)  # the live dataset: refused before anything is written
    lock = jobs.acquire()
    try:
        record = jobs.get(job_id) if job_id else None  # the controller's queued record
        return _train(home, cfg, job_id or new_job_id(), source, record, None, keep_versions,
                      on_started, pending_timeout_s)
    finally:
        lock.release()


def _train(home: Path, cfg: TrainConfig, job_id: str, source: str,
           record: dict[str, Any] | None, resume: ResumePlan | None,
           keep_versions: int | None, on_started: Callable[[str], None] | None,
           pending_timeout_s: float) -> dict[str, Any]:
    """`run_job` and `resume_job` with the job lock held: snapshot, record, fit, publish.

    A resume (`resume` set) trains on the job's own snapshot (or a new one of a dataset with
    the same images), under the same Ray Train run (`RunConfig(name=job_id,
    storage_path=runs/)`: Ray Train restores its checkpoint manager from
    `runs/<job_id>/checkpoint_manager_snapshot.json`, so `ray.train.get_checkpoint()` in the
    workers is the last checkpoint reported, and the loop carries on from its epoch). A resume
    refused here leaves the record and the snapshot as they were. The epochs run under Ray
    Train (`_fit_on_ray`) or, for a head fitted on cached features, in this process
    (`runs_in_process`)."""
    store, registry, jobs = DatasetStore(home), Registry(home), JobStore(home)
    snapshot: Snapshot | None = None
    started = False
    try:
        # With the job lock held no other job runs on this volume: other snapshots are of jobs
        # that died, kept while they can be resumed. This job's own is kept, so a job resumed
        # under its id sees the same data.
        store.prune_snapshots(keep=snapshots_to_keep(home, jobs, job_id))
        snapshot = store.open_snapshot(job_id) or store.snapshot(job_id)
        data = prepare_data(snapshot)  # deletes since the check above may make it too small
        if resume is not None:
            expected = (resume.record.get("dataset") or {}).get("images_sha256")
            if expected and data.fingerprint["images_sha256"] != expected:
                raise JobNotResumable(
                    f"job {job_id} cannot be resumed: its dataset snapshot is gone and the "
                    "dataset changed while the resume started; start a new job "
                    "(POST /v1/train, or `visionloop train`)")
            if resume.discard_run:  # a run state Ray cannot restore: start the run afresh
                log.warning("job %s: runs/%s holds no usable checkpoint; resuming from the "
                            "start", job_id, job_id)
                shutil.rmtree(run_dir(home, job_id), ignore_errors=True)
            record = jobs.begin_resume(job_id, source, resume.from_epoch, cfg.epochs)
        elif record is None:
            record = jobs.create(cfg.model_dump(), source, job_id=job_id)
        started = True
        jobs.set_stage(job_id, STAGE_PREPARING)
        if on_started:
            on_started(job_id)
        registry.ensure_v0(cfg.backbone)
        choice = registry.resolve_backbone(cfg.backbone)
        jobs.update(job_id, status="running", started_at=record.get("started_at") or time.time(),
                    backbone=choice.name, ledger_offset=snapshot.ledger_offset,
                    dataset=data.fingerprint,
                    runner=RUNNER_IN_PROCESS if runs_in_process(cfg) else RUNNER_RAY_TRAIN)
        loop = loop_config(home, jobs, job_id, cfg, choice, data)
        features = (FeatureCache(loop.feature_cache_root, loop.feature_key)
                    if loop.uses_feature_cache else None)
        if features is not None:
            seed_extractor_graph(registry, choice, loop.preset, features)
        try:
            if runs_in_process(cfg):  # its stages come from the loop (the progress file)
                state = None if jobs.cancel_requested(job_id) else fit_in_process(home, loop,
                                                                                  job_id)
            else:
                ended, state = _fit_on_ray(home, cfg, loop, jobs, job_id, pending_timeout_s)
                if ended is not None:  # cancelled or timed out before any worker started
                    return ended
            if jobs.cancel_requested(job_id):
                return jobs.finish(job_id, "cancelled", CANCELLED_ON_REQUEST,
                                   metrics=jobs.progress_metrics(job_id))
            if state is None:
                raise RuntimeError("training produced no checkpoint")
            return publish(registry, jobs, job_id, cfg, choice, data, state, keep_versions,
                           features=features)
        except Exception as exc:
            log.exception("training job %s failed", job_id)
            return jobs.finish(job_id, "failed", "error", error=error_text(exc),
                               metrics=jobs.progress_metrics(job_id))
    finally:
        # A resume refused before it started keeps the snapshot it came to use.
        if snapshot is not None and (started or resume is None):
            store.remove_snapshot(snapshot.job_id)


# -- where the epochs run ------------------------------------------------------------------------

RUNNER_IN_PROCESS = "in-process"  # the record's `runner`: where the epochs ran
RUNNER_RAY_TRAIN = "ray-train"


def runs_in_process(cfg: TrainConfig) -> bool:
    """Whether the job's epochs run in this process (`fit_in_process`) rather than under Ray
    Train: feature-extract without augmentation on the feature cache (a linear head fitted on
    cached (N, D) features), one worker, no GPU.

    Why: such a fit is a few seconds of one process's CPU, while starting Ray Train's worker
    group (its controller actor, a worker actor importing torch, the process group, the run's
    storage) costs many times that on a small machine and buys nothing here: one worker has
    nobody to synchronise with, and the work is too small to be worth another node. The
    product's loop runs unchanged (`training.loop.run_worker` under a `TorchSession` on
    `runs/<job_id>/`), so the job keeps its semantics: a checkpoint per epoch
    (`checkpoints_to_keep` best by val accuracy, the latest always kept), the best one
    published, progress and cancel through the same files, resume from the last checkpoint
    (`latest_checkpoint_epoch` reads either layout; a job always resumes on the runner it
    started on, as the choice is a function of its config). What it gives up is Ray Train's
    restart of a failed worker group (`max_failures`): an error fails the job, which can then
    be resumed. It uses the cores of the process running the job (the controller's or the
    CLI's), which Ray does not account for: the fit and the backbone pass over new images
    take `threads` cores (default: every core this process may use) for seconds.

    Finetune, partial, augmentation, several workers and GPUs stay on Ray Train."""
    return (cfg.strategy == "feature-extract" and not cfg.augment and cfg.use_feature_cache
            and cfg.workers == 1 and not cfg.gpu)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """This process's torch intra-op threads set to `n` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_in_process(home: Path, loop: LoopConfig, job_id: str) -> dict[str, Any] | None:
    """Run the job's epochs in this process (see `runs_in_process`) -> the best checkpoint's
    state (by val accuracy), or None when none was saved (cancelled before the first epoch
    ended). Checkpoints go to `runs/<job_id>/checkpoint_NNNNNN/` (`TorchSession`), where a
    resume finds the last one."""
    cfg = loop.train_config
    session = TorchSession(run_dir(home, job_id), torch.device("cpu"),
                           num_to_keep=cfg.checkpoints_to_keep)
    with torch_threads(cfg.threads or cpu_share(1)):
        run_worker(loop, session)
    best = session.best_checkpoint()
    if best is None:
        return None
    state: dict[str, Any] = torch.load(best / CHECKPOINT_FILE, map_location="cpu",
                                       weights_only=True)
    return state


def _fit_on_ray(home: Path, cfg: TrainConfig, loop: LoopConfig, jobs: JobStore, job_id: str,
                pending_timeout_s: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The job's epochs under Ray Train -> (the final record when it ended before any worker
    started, else None; the best checkpoint's state by val accuracy, or None)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.as_train_loop_config(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            storage_path=str(home / "runs"), name=job_id,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    ended = wait_for_resources(cfg, jobs, job_id, pending_timeout_s)
    if ended is not None:
        return ended, None
    jobs.set_stage(job_id, STAGE_STARTING_WORKERS)
    result = trainer.fit()
    if jobs.cancel_requested(job_id):
        return None, None
    best = result.get_best_checkpoint("val_accuracy", "max") if result.best_checkpoints \
        else None
    if best is None:
        return None, None
    with best.as_directory() as d:
        state: dict[str, Any] = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu",
                                           weights_only=True)
    return None, state


# -- resume ------------------------------------------------------------------------------------

# Ray Train 2.60 (Train V2) keeps the state of a run's checkpoint manager in this file of the
# run's folder (`ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME`): the
# checkpoints kept, each with the metrics reported with it, and `latest_checkpoint_result`. A
# new `TorchTrainer` with the same `RunConfig(name, storage_path)` loads it, and what
# `ray.train.get_checkpoint()` gives the workers is that latest checkpoint (read in Ray's
# source: `CheckpointManager._maybe_load_state_from_storage`, `before_init_train_context`).
# It is read here (plain JSON, no Ray import) to know the epoch a resume starts from before
# anything runs; a file Ray cannot read back would make `fit()` fail, so a resume removes it.
RUN_STATE_FILE = "checkpoint_manager_snapshot.json"
RESUMABLE = ("failed", "cancelled")


def run_dir(home: Path, job_id: str) -> Path:
    """Ray Train's folder of job `job_id`: `runs/<job_id>` (its checkpoints and state)."""
    return Path(home) / "runs" / job_id


def latest_checkpoint_epoch(run: Path) -> int | None:
    """The epoch of the checkpoint Ray Train would restore in `run` (its run folder): the last
    one reported whose files are there, from `RUN_STATE_FILE`; None when there is none or the
    state cannot be read. A job that ran in process (`fit_in_process`) has no Ray state: there
    it is the epoch of the last `TorchSession` checkpoint folder."""
    if not (run / RUN_STATE_FILE).exists():
        found = local_checkpoints(run)
        if not found or not (found[-1] / CHECKPOINT_FILE).is_file():
            return None
        epoch = checkpoint_metrics(found[-1]).get("epoch")
        return int(epoch) if epoch is not None else None
    try:
        state = json.loads((run / RUN_STATE_FILE).read_text())
        latest = state["latest_checkpoint_result"]
        if latest is None:
            return None
        name = str(latest["checkpoint_dir_name"])
        if Path(name).name != name or not (run / name / CHECKPOINT_FILE).is_file():
            return None
        return int(latest["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def snapshots_to_keep(home: Path, jobs: JobStore, job_id: str) -> set[str]:
    """The dataset snapshots a new job must leave: its own, and those of interrupted jobs
    (left active by a process that died, or marked `interrupted`) that have a checkpoint to
    resume from. They go with their run folder (`prune_runs` bounds those) or when the
    resumed job ends."""
    keep = {job_id}
    for r in jobs.list():
        other = r["job_id"]
        if other == job_id or not (r.get("status") in ACTIVE
                                   or r.get("reason") == "interrupted"):
            continue
        if latest_checkpoint_epoch(run_dir(home, other)) is not None:
            keep.add(other)
    return keep


@dataclass(frozen=True)
class ResumePlan:
    """What a resume of one job would do (`plan_resume`). `cfg`: the job's own config, its
    backbone the one it resolved to; `from_epoch`: the epoch of the checkpoint it continues
    from (None: from the start); `snapshot`: its dataset snapshot is on the volume (else the
    live dataset has exactly its images and a new snapshot stands in); `discard_run`: its run
    folder holds a state Ray cannot restore, removed before it runs."""

    record: dict[str, Any]
    cfg: TrainConfig
    from_epoch: int | None
    snapshot: bool
    discard_run: bool


def plan_resume(home: Path, job_id: str, lock_held: bool = False) -> ResumePlan:
    """Whether and how job `job_id` can be resumed. Raises JobNotFound; JobRunning when the
    job is still running (unless `lock_held`: the caller holds the job lock, so a record left
    active is one whose process died); JobNotResumable (409), saying why, when it succeeded,
    its config is no longer valid, it has neither a checkpoint nor its dataset snapshot, or
    its snapshot is gone and the dataset changed since it started (its checkpoint would go on
    training on other images). Failed (interrupted included) and cancelled jobs can be
    resumed. Writes nothing."""
    home = Path(home).resolve()
    jobs, store = JobStore(home), DatasetStore(home)
    record = jobs.get(job_id)
    status = record.get("status")
    if status in ACTIVE:
        if not lock_held and jobs.is_locked():
            raise jobs.job_running_error()
    elif status == "succeeded":
        raise JobNotResumable(
            f"job {job_id} succeeded (it published {record.get('version')}): there is nothing "
            "to resume; start a new job (POST /v1/train, or `visionloop train`)")
    elif status not in RESUMABLE:
        raise JobNotResumable(f"job {job_id} has status {status!r}; only failed or cancelled "
                              "jobs can be resumed")
    try:
        cfg = TrainConfig.model_validate(record["config"])
    except (ValidationError, KeyError, TypeError) as exc:
        raise JobNotResumable(f"job {job_id} cannot be resumed: its training configuration is "
                              f"not valid any more ({exc}); start a new job") from None
    if record.get("backbone"):
        cfg = cfg.model_copy(update={"backbone": record["backbone"]})
    run = run_dir(home, job_id)
    from_epoch = latest_checkpoint_epoch(run)
    snapshot = store.open_snapshot(job_id) is not None
    ended = f"it ended {status}" + (f" ({record['reason']})" if record.get("reason") else "")
    if from_epoch is None and not snapshot:
        raise JobNotResumable(
            f"job {job_id} cannot be resumed: it has no checkpoint (runs/{job_id} holds none: "
            "it stopped before its first epoch was saved, or retention removed it) and its "
            f"dataset snapshot is gone ({ended}); start a new job (POST /v1/train, or "
            "`visionloop train`)")
    if not snapshot:
        expected = (record.get("dataset") or {}).get("images_sha256")
        if expected is None or expected != _digest(store.items()):
            raise JobNotResumable(
                f"job {job_id} cannot be resumed: its dataset snapshot was removed when "
                f"{ended}, and the dataset has changed since, so its checkpoint of epoch "
                f"{from_epoch} would go on training on other images; start a new job "
                "(POST /v1/train, or `visionloop train`)")
    discard = from_epoch is None and (run / RUN_STATE_FILE).exists()
    return ResumePlan(record, cfg, from_epoch, snapshot, discard)


def resume_job(home: Path, job_id: str, source: str = "cli", keep_versions: int | None = None,
               on_started: Callable[[str], None] | None = None,
               pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S) -> dict[str, Any]:
    """Rerun job `job_id` under its id from its last checkpoint, with its config and dataset
    snapshot, to its end; -> the final record (status, `resumed_from_epoch`, `resumes`, the
    metrics of every epoch, those before the checkpoint included). `source`: who resumed it
    (api, cli, restart), recorded in `resumes`; the record's `source` stays who started it.

    Raises JobNotFound, JobRunning (the job lock is held: the message names that job) and
    JobNotResumable (`plan_resume`), each before anything is written; a failure once it runs
    ends the record `failed` with the error, as `run_job` does. `on_started(job_id)` is called
    once the record is back to `queued`. The caller owns Ray, as for `run_job`."""
    home = Path(home).resolve()
    jobs = JobStore(home)
    jobs.get(job_id)  # an unknown id is 404 whatever runs
    lock = jobs.acquire()
    try:
        plan = plan_resume(home, job_id, lock_held=True)
        log.info("resuming job %s from epoch %s of %d (%s)", job_id, plan.from_epoch,
                 plan.cfg.epochs, "its snapshot" if plan.snapshot else "a new snapshot")
        try:
            return _train(home, plan.cfg, job_id, source, plan.record, plan, keep_versions,
                          on_started, pending_timeout_s)
        except Exception as exc:
            if jobs.get(job_id).get("status") in ACTIVE:  # it had started: end it, as run_job's
                jobs.finish(job_id, "failed", "error", error=error_text(exc),  # callers do
                            metrics=jobs.progress_metrics(job_id))
            raise
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
            keep_versions: int | None, judged: Judgement | None = None,
            features: FeatureCache | None = None) -> dict[str, Any]:
    """The best checkpoint's `state` -> judged on the held-out test split (`judge`; or
    `judged`, when the caller judged it already), published as models/v<N> with its data list,
    and promoted to CURRENT if it passes the gate, the promotion policy is automatic and CURRENT
    is still the version it was judged against, all decided under the registry lock
    (`Registry.publish_candidate`): a version activated or pinned meanwhile stays, and the
    reason says why the candidate was not promoted. The job finishes `succeeded`. -> the final
    record.

    The manifest's validation figures (`best_val_accuracy`, the confusion matrix and plot) are
    the workers' evaluation of the best epoch, the one that chose it; `metrics.test` and
    `promotion` hold the held-out figures the gate used. `calibration` (temperature scaling and
    ECE before/after), `threshold` (the score below which an answer is `unknown`) and
    `reference` (predicted-label and confidence shares, what drift compares live traffic
    with) come from the candidate's logits on the same test split (`answer_quality`): one pass
    over the test split for both, through the feature cache's CPU engine when `features`
    holds the candidate's frozen backbone (`cached_logits`)."""
    jobs.set_stage(job_id, STAGE_EVALUATING)
    progress = jobs.read_progress(job_id) or {}
    preset = EvalPreset.for_size(cfg.image_size)
    candidate = build_model(choice.name, num_classes=len(data.classes), pretrained=False)
    candidate.load_state_dict(state["model"])
    candidate.eval()
    if features is not None:
        with torch_threads(cfg.threads or cpu_share(1)):
            logits, labels = cached_logits(candidate, preset, data.test, data.class_index,
                                           features)
    else:
        logits, labels = held_out_logits(candidate, preset, data.test, data.class_index)
    judged = judged or judge(registry, candidate, preset, data, cfg.gate,
                             test=stats_from_logits(logits, labels, len(data.classes)))
    promotion = judged.record(data, cfg.gate)

    # The progress file has every epoch; the best checkpoint only the epochs up to itself.
    history = list(progress.get("metrics") or state["history"])
    best_epoch = int(state["epoch"])
    best = next(m for m in state["history"] if int(m["epoch"]) == best_epoch)
    val_confusion = state["confusion"]
    test = judged.test
    quality = answer_quality(data.classes, logits, labels)
    jobs.set_stage(job_id, STAGE_PUBLISHING)
    version, staging = registry.allocate()
    try:
        inference = (engine_as_measured(registry, choice, preset, candidate, staging, features)
                     if features is not None else None) \
            or choose_engine(candidate, staging, preset.crop)
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
            "promotion": promotion, **quality,
            "parent": promotion["current_version"], "job_id": job_id,
            "created_at": time.time(),
            "software": software_versions(), "plots": ["curves", "confusion"],
            "inference": inference,
        }
        promotion = registry.publish_candidate(version, staging, state["model"], manifest,
                                               data.data_list(), judged.current_name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    promoted, reason = bool(promotion["promoted"]), str(promotion["reason"])
    log.info("job %s: %s published, %s (%s)", job_id, version,
             "promoted" if promoted else "not promoted", reason)
    if keep_versions:
        registry.prune(keep_versions)
    return jobs.finish(job_id, "succeeded", reason, version=version,
                       promoted=promoted, metrics=history,
                       progress={**progress_summary(progress, cfg.epochs), "fraction": 1.0,
                                 "eta_s": 0},
                       resumed_from_epoch=progress.get("resumed_from_epoch"),
                       val_accuracy=best["val_accuracy"], test_accuracy=test.accuracy,
                       current_test_accuracy=promotion["current_test_accuracy"],
                       promotion=promotion)


FROZEN_BACKBONE_STRATEGIES = ("pretrained", "feature-extract")  # the backbone is the weights'


def seed_extractor_graph(registry: Registry, choice: BackboneChoice, preset: EvalPreset,
                         features: FeatureCache) -> bool:
    """Give the feature cache its backbone graph from the newest published version whose ONNX
    graph has the same frozen backbone (v0, or a feature-extract version of the same backbone,
    weights and preprocessing; `training.features.seed_graph`), so the first job on a volume
    needs no export. -> whether the cache has a graph now."""
    if features.graph_path.exists():
        return True
    from training.inference import ONNX_FILE

    for version in reversed(registry.versions()):
        try:
            manifest = registry.manifest(version)
            folder = registry.version_dir(version)
        except (VersionNotFound, InvalidVersion):
            continue
        if (manifest.get("backbone"), manifest.get("weights_origin"),
                manifest.get("preprocessing")) == (choice.name, choice.weights_origin,
                                                   preset.to_dict()) \
                and manifest.get("strategy") in FROZEN_BACKBONE_STRATEGIES \
                and (folder / ONNX_FILE).is_file():
            return seed_graph(features, folder / ONNX_FILE)
    return False


def engine_as_measured(registry: Registry, choice: BackboneChoice, preset: EvalPreset,
                       candidate: nn.Module, staging: Path, features: FeatureCache
                       ) -> dict[str, Any] | None:
    """The manifest's `inference` record of a feature-extract candidate without timing the
    engines again, or None (then `choose_engine` measures).

    Why: the engines' speeds are those of the backbone (the head is one matrix product), and a
    candidate of feature-extract has the frozen backbone of every version with the same
    backbone, weights and preprocessing; the newest such version whose engines were measured
    (`eager_images_per_s` and `onnxruntime_images_per_s` in its record; v0 has them) decided
    for this one. The ONNX graph is the feature cache's extractor graph plus this head
    (`graph_with_head`: no second export), and is checked like an exported one: outputs
    within `ATOL` of eager on random inputs, else None. `measured_for` names the version
    whose measurement decided."""
    from training.inference import ATOL, CHECK_BATCH, ONNX_FILE, OnnxModule

    measured = None
    for version in reversed(registry.versions()):
        try:
            manifest = registry.manifest(version)
        except (VersionNotFound, InvalidVersion):
            continue
        record = manifest.get("inference") or {}
        if (manifest.get("backbone"), manifest.get("weights_origin"),
                manifest.get("preprocessing")) == (choice.name, choice.weights_origin,
                                                   preset.to_dict()) \
                and record.get("engine") in ("eager", "onnxruntime") \
                and record.get("eager_images_per_s") and record.get("onnxruntime_images_per_s"):
            measured = (record.get("measured_for") or version, record)
            break
    if measured is None:
        return None
    source, record = measured
    out: dict[str, Any] = {
        "engine": record["engine"], "device": "cpu", "threads": torch.get_num_threads(),
        "eager_images_per_s": record["eager_images_per_s"],
        "onnxruntime_images_per_s": record["onnxruntime_images_per_s"],
        "measured_for": source}
    if record["engine"] == "eager":
        return {**out, "reason": f"eager PyTorch measured faster for {source} (the same "
                                 "backbone, weights and preprocessing)"}
    path = staging / ONNX_FILE
    x = torch.randn(CHECK_BATCH, 3, preset.crop, preset.crop,
                    generator=torch.Generator().manual_seed(0))
    try:
        _, head = split_head(candidate)
        graph_with_head(features, head, path)
        with torch.inference_mode():
            diff = float((OnnxModule(path)(x) - candidate(x)).abs().max())
    except Exception as exc:
        log.warning("inference engine: the cached extractor graph plus the head failed "
                    "(%s: %s); measuring", type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return None
    if diff > ATOL:
        log.warning("inference engine: the cached extractor graph plus the head differs from "
                    "eager by %.2e; measuring", diff)
        path.unlink(missing_ok=True)
        return None
    ratio = record["onnxruntime_images_per_s"] / record["eager_images_per_s"]
    log.info("inference engine: onnxruntime, as measured for %s", source)
    return {**out, "max_abs_diff": diff,
            "reason": f"measured {ratio:.2f}x eager PyTorch for {source} (the same backbone, "
                      "weights and preprocessing); outputs equal within tolerance"}


def _per_class(confusion: list[list[int]], classes: list[str]) -> dict[str, float | None]:
    """class -> recall from a (true, predicted) confusion matrix; None for a class with no
    image."""
    return {c: (row[k] / sum(row) if sum(row) else None)
            for k, (c, row) in enumerate(zip(classes, confusion, strict=True))}
