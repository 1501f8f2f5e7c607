"""A head fitted on cached features runs in the job's own process, with the job's semantics
(`training.pipeline.runs_in_process`): no Ray here at all, so these tests need no cluster.
Also the stages a job reports from its start, the progress file's epoch counter against its
fraction, and `TorchSession`'s checkpoint retention, which that runner relies on."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.images import labelled_set
from tests.support.waiting import wait_for
from training.config import TrainConfig
from training.dataset import DatasetStore
from training.distributed import (
    CHECKPOINT_METRICS_FILE,
    TorchSession,
    best_local_checkpoint,
    local_checkpoints,
)
from training.features import FeatureCache, cpu_extractor, graph_with_head, seed_graph
from training.inference import OnnxModule, export_onnx
from training.jobs import (
    STAGE_EVALUATING,
    STAGE_FEATURES,
    STAGE_PREPARING,
    STAGE_PUBLISHING,
    STAGE_QUEUED,
    STAGE_STARTING_WORKERS,
    STAGE_TRAINING,
    JobStore,
)
from training.loop import CHECKPOINT_FILE, ProgressWriter
from training.model import LITE0, BackboneChoice, build_model, split_head, weights_origin
from training.pipeline import (
    RUN_STATE_FILE,
    RUNNER_IN_PROCESS,
    engine_as_measured,
    evaluate_model,
    latest_checkpoint_epoch,
    prepare_data,
    resume_job,
    run_dir,
    run_job,
    runs_in_process,
)
from training.presets import EvalPreset
from training.registry import Registry


def _fill(home: Path, per_label: int = 14) -> None:
    store = DatasetStore(home)
    for label, data in labelled_set(["red", "blue"], per_label):
        store.ingest(data, label)


def _cfg(**kw: Any) -> TrainConfig:
    base = {"backbone": "efficientnet_lite0", "strategy": "feature-extract", "augment": False,
            "workers": 1, "epochs": 3, "batch_size": 8, "image_size": 64, "lr": 0.1,
            "threads": 1, "checkpoints_to_keep": 2}
    return TrainConfig(**{**base, **kw})


def test_only_a_one_worker_head_fit_on_cached_features_runs_in_process() -> None:
    assert runs_in_process(_cfg())
    assert not runs_in_process(_cfg(workers=2))
    assert not runs_in_process(_cfg(augment=True))
    assert not runs_in_process(_cfg(use_feature_cache=False))
    assert not runs_in_process(_cfg(gpu=True))
    assert not runs_in_process(_cfg(strategy="finetune"))
    assert not runs_in_process(_cfg(strategy="partial"))


@pytest.mark.slow
def test_a_feature_extract_job_runs_in_process_with_the_job_semantics(tmp_path: Path) -> None:
    _fill(tmp_path)
    record = run_job(tmp_path, _cfg(epochs=3))
    assert record["status"] == "succeeded", record
    assert record["runner"] == RUNNER_IN_PROCESS
    assert [m["epoch"] for m in record["metrics"]] == [1, 2, 3]
    assert (record["progress"]["epoch"], record["progress"]["fraction"]) == (3, 1.0)
    assert record["workers"][0]["rank"] == 0

    # The stages, in order, from the record's creation on (no Ray worker group to start).
    names = [s["stage"] for s in record["stages"]]
    assert names == [STAGE_QUEUED, STAGE_PREPARING, STAGE_FEATURES, STAGE_TRAINING,
                     STAGE_EVALUATING, STAGE_PUBLISHING], names
    times = [s["at"] for s in record["stages"]]
    assert times == sorted(times) and record["created_at"] <= times[0]
    assert times[-1] <= record["finished_at"]

    # Checkpoints: `checkpoints_to_keep` of them, the best by val accuracy and the latest.
    run = run_dir(tmp_path, record["job_id"])
    kept = local_checkpoints(run)
    assert len(kept) == 2 and not (run / RUN_STATE_FILE).exists()
    epochs_kept = [json.loads((p / CHECKPOINT_METRICS_FILE).read_text())["epoch"] for p in kept]
    assert epochs_kept[-1] == 3
    best_val = max(m["val_accuracy"] for m in record["metrics"])
    registry = Registry(tmp_path)
    manifest = registry.manifest(record["version"])
    assert manifest["metrics"]["best_val_accuracy"] == best_val == record["val_accuracy"]
    assert manifest["metrics"]["best_epoch"] in epochs_kept
    assert latest_checkpoint_epoch(run) == 3

    # The gate's figures came through the feature cache's engine: they are those of the
    # published model run on the test images.
    data = prepare_data(DatasetStore(tmp_path))
    loaded = registry.load(record["version"])
    direct = evaluate_model(loaded.model, EvalPreset.for_size(64), data.test, data.class_index,
                            len(data.classes))
    assert record["test_accuracy"] == direct.accuracy
    assert manifest["metrics"]["test"]["confusion_matrix"] == direct.confusion
    assert abs(manifest["metrics"]["test"]["loss"] - direct.loss) < 1e-3
    assert manifest["calibration"]["temperature"] > 0 and "threshold" in manifest


@pytest.mark.slow
def test_an_in_process_job_cancelled_mid_run_resumes_from_its_last_checkpoint(
        tmp_path: Path) -> None:
    _fill(tmp_path)
    jobs = JobStore(tmp_path)
    epochs = 40
    started: list[str] = []
    result: dict[str, Any] = {}
    cfg = _cfg(epochs=epochs, batch_size=2)
    thread = threading.Thread(target=lambda: result.update(
        run_job(tmp_path, cfg, on_started=started.append)))
    thread.start()
    try:
        job_id = wait_for(lambda: started[0] if started else None, timeout=60,
                          what="the job record")
        wait_for(lambda: len(jobs.view(job_id)["metrics"]) >= 2 or None, timeout=120,
                 interval=0.02, what="two epochs")
        jobs.request_cancel(job_id)
    finally:
        thread.join(timeout=120)
    assert result["status"] == "cancelled", result
    done = latest_checkpoint_epoch(run_dir(tmp_path, job_id))
    assert done is not None and 2 <= done < epochs

    record = resume_job(tmp_path, job_id)
    assert record["status"] == "succeeded", record
    assert record["resumed_from_epoch"] == done
    assert [m["epoch"] for m in record["metrics"]] == list(range(1, epochs + 1))
    assert [a["resumed_from_epoch"] for a in record["attempts"]] == [None, done]
    # a resume appends its own run of stages
    names = [s["stage"] for s in record["stages"]]
    assert names.count(STAGE_PREPARING) == 2 and names[-1] == STAGE_PUBLISHING


def test_the_record_has_a_stage_from_its_creation_and_merges_the_workers(
        tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    record = jobs.create(_cfg().model_dump(), "api")
    assert record["stage"] == STAGE_QUEUED and record["stages"][0]["stage"] == STAGE_QUEUED
    job_id = record["job_id"]
    jobs.set_stage(job_id, STAGE_PREPARING)
    jobs.update(job_id, status="running")
    assert jobs.view(job_id)["stage"] == STAGE_PREPARING
    jobs.set_stage(job_id, STAGE_STARTING_WORKERS)
    assert jobs.view(job_id)["stage"] == STAGE_STARTING_WORKERS

    # the workers write theirs in the progress file; the view shows them while they train
    writer = ProgressWriter(jobs.progress_path(job_id), epochs=3)
    writer.stage(STAGE_FEATURES)
    view = jobs.view(job_id)
    assert view["stage"] == STAGE_FEATURES
    assert [s["stage"] for s in view["stages"]] == [
        STAGE_QUEUED, STAGE_PREPARING, STAGE_STARTING_WORKERS, STAGE_FEATURES]
    writer.stage(STAGE_TRAINING)
    assert jobs.view(job_id)["stage"] == STAGE_TRAINING

    # once the pipeline moves on, its stage wins over the workers' last one
    jobs.set_stage(job_id, STAGE_EVALUATING)
    view = jobs.view(job_id)
    assert view["stage"] == STAGE_EVALUATING
    assert [s["stage"] for s in view["stages"]][-3:] == [
        STAGE_FEATURES, STAGE_TRAINING, STAGE_EVALUATING]
    final = jobs.finish(job_id, "failed", "error", error="x")
    assert final["stage"] == STAGE_EVALUATING  # where it was when it ended
    assert len(final["stages"]) == 6


def test_progress_never_runs_ahead_of_the_epoch_counter(tmp_path: Path) -> None:
    """Epoch k of n (1-based, the one in progress) spans fractions (k-1)/n .. k/n, at the
    start of an epoch too (a write is forced there), and at the end of a resume's epochs."""
    epochs, steps = 3, 4
    writer = ProgressWriter(tmp_path / "p.json", epochs=epochs, interval=0.0)
    seen = []
    for epoch in range(epochs):
        for step in range(steps + 1):
            writer.step(epoch, step, steps, 0, force=True)
            p = json.loads((tmp_path / "p.json").read_text())
            seen.append((p["epoch"], p["fraction"]))
            # fractions are rounded to 4 places
            assert (p["epoch"] - 1) / epochs - 1e-4 <= p["fraction"] <= p["epoch"] / epochs + 1e-4
    assert seen[0] == (1, 0.0)  # the first epoch starts: epoch 1, not 0
    assert seen[steps + 1] == (2, round(1 / 3, 4))  # the second starts where the first ended
    assert seen[-1] == (3, 1.0)
    writer.step(epochs, 0, steps, epochs, force=True)  # a resume with nothing left to do
    p = json.loads((tmp_path / "p.json").read_text())
    assert (p["epoch"], p["fraction"]) == (3, 1.0)


def _report(session: TorchSession, tmp: Path, epoch: int, val: float) -> None:
    folder = tmp / f"ck{epoch}"
    folder.mkdir()
    torch.save({"epoch": epoch}, folder / CHECKPOINT_FILE)
    session.report({"epoch": epoch, "val_accuracy": val}, folder)


def test_torch_session_keeps_the_best_and_the_latest_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "run"
    session = TorchSession(root, torch.device("cpu"), num_to_keep=2)
    for epoch, val in enumerate([0.5, 0.9, 0.7, 0.6], start=1):
        _report(session, tmp_path, epoch, val)
    kept = [json.loads((p / CHECKPOINT_METRICS_FILE).read_text())["epoch"]
            for p in session.checkpoints()]
    assert kept == [2, 4]  # the best (0.9) and the latest
    best = session.best_checkpoint()
    assert best is not None and best == best_local_checkpoint(root, "val_accuracy")
    assert torch.load(best / CHECKPOINT_FILE)["epoch"] == 2
    # numbering goes on after pruning: a new checkpoint never takes an old one's name
    _report(session, tmp_path, 5, 0.95)
    assert [p.name for p in session.checkpoints()] == ["checkpoint_000001", "checkpoint_000004"]
    assert latest_checkpoint_epoch(root) == 5
    with session.latest_checkpoint() as d:
        assert d is not None and torch.load(d / CHECKPOINT_FILE)["epoch"] == 5
    reported = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in reported] == [1, 2, 3, 4, 5]


def test_latest_checkpoint_epoch_of_an_empty_or_half_written_local_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert latest_checkpoint_epoch(run) is None
    (run / "checkpoint_000000").mkdir(parents=True)  # no checkpoint file in it
    assert latest_checkpoint_epoch(run) is None


def test_the_extractor_graph_is_cut_from_a_published_graph_and_takes_a_head(
        tmp_path: Path) -> None:
    """A version's ONNX graph, cut before its head, is the feature cache's backbone graph
    (checked against eager before use); that graph plus a head is the candidate's graph."""
    model = build_model(LITE0, num_classes=3, pretrained=False).eval()
    published = tmp_path / "model.onnx"
    export_onnx(model, published, 64)
    cache = FeatureCache(tmp_path / "cache", "k")
    assert seed_graph(cache, published) and cache.graph_path.is_file()
    extractor, head = split_head(model)
    engine = cpu_extractor(extractor, cache, 64)
    assert isinstance(engine, OnnxModule)  # within ATOL of eager, else eager is returned
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(engine(x), extractor(x), atol=1e-3, rtol=0)
        out = tmp_path / "with_head.onnx"
        graph_with_head(cache, head, out)
        torch.testing.assert_close(OnnxModule(out)(x), model(x), atol=1e-3, rtol=0)

    # a graph whose last node is not the head's Gemm gives no extractor graph
    other = FeatureCache(tmp_path / "cache", "other")
    assert not seed_graph(other, cache.graph_path) and not other.graph_path.exists()


def test_a_feature_extract_candidate_takes_the_engine_measured_for_its_backbone(
        tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    preset = EvalPreset.for_size(64)
    choice = BackboneChoice(LITE0, weights_origin(LITE0), "test")
    model = build_model(LITE0, num_classes=3, pretrained=False).eval()
    cache = FeatureCache(tmp_path / "cache", "k")
    staging = tmp_path / "staging"
    staging.mkdir()
    # nothing measured yet for this backbone and preprocessing: the caller measures
    assert engine_as_measured(registry, choice, preset, model, staging, cache) is None

    version, folder = registry.allocate()
    measured = {"engine": "onnxruntime", "device": "cpu", "threads": 1,
                "eager_images_per_s": 10.0, "onnxruntime_images_per_s": 50.0}
    registry.publish(version, folder, model.state_dict(), {
        "backbone": LITE0, "weights_origin": choice.weights_origin, "classes": ["a", "b", "c"],
        "preprocessing": preset.to_dict(), "strategy": "pretrained", "inference": measured,
        "promotion": {"promoted": False, "reason": "made by the test"}})
    cache.graph_path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(split_head(model)[0], cache.graph_path, 64)
    record = engine_as_measured(registry, choice, preset, model, staging, cache)
    assert record is not None and record["engine"] == "onnxruntime"
    assert record["measured_for"] == version and record["max_abs_diff"] <= 1e-3
    assert (staging / "model.onnx").is_file()
    # another preprocessing was not measured: the caller measures
    assert engine_as_measured(registry, choice, EvalPreset.for_size(96), model, staging,
                              cache) is None
