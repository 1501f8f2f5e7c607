"""A job's promotion against the people who choose the served model, without Ray: the
pipeline's `judge` then `publish`, with an activate from another process in between (the
person's choice stays; the candidate is published, not promoted, and the job says why), and a
pinned policy (published, never promoted, until unpinned)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.training.test_pipeline import (
    _by_colour,
    _cfg,
    _constant_model,
    _publish,
    _store_with,
)
from training.config import GateConfig
from training.jobs import JobStore
from training.model import LITE0, BackboneChoice
from training.pipeline import PreparedData, judge, prepare_data, publish
from training.presets import EvalPreset
from training.registry import Registry

REPO = Path(__file__).resolve().parents[2]
CHOICE = BackboneChoice(LITE0, "test", "test")
CFG = _cfg(gate=GateConfig(min_error_reduction=0.0))  # a candidate as good as CURRENT passes


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Registry, PreparedData]:
    """Test split: 4 red, 3 blue. v0 always answers red (4/7) and is CURRENT; v1 always
    answers blue (3/7). A candidate that always answers red passes the gate against v0."""
    store = _store_with(tmp_path, _by_colour({"red": (4, 1, 4), "blue": (6, 1, 3)}))
    data = prepare_data(store)
    registry = Registry(tmp_path)
    assert _publish(registry, data.classes, _constant_model(2, 1)) == "v0"
    assert _publish(registry, data.classes, _constant_model(2, 0)) == "v1"
    registry.set_current("v0")
    return registry, data


def candidate_state() -> dict[str, Any]:
    """The best checkpoint of a job whose model always answers red."""
    return {"model": _constant_model(2, 1).state_dict(), "epoch": 1, "confusion": [[0, 1], [0, 1]],
            "history": [{"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.6,
                         "val_loss": 0.69, "val_accuracy": 0.5}]}


def activate_elsewhere(home: Path, version: str, pin: bool) -> None:
    """`Registry.activate` in another process, as the API or the CLI would."""
    subprocess.run([sys.executable, "-c", "import sys; from training.registry import Registry; "
                    "Registry(sys.argv[1]).activate(sys.argv[2], pin=sys.argv[3] == '1', "
                    "by='another process')", str(home), version, "1" if pin else "0"],
                   cwd=REPO, check=True, timeout=300)


def test_an_activate_between_judge_and_publish_stays(
        tmp_path: Path, volume: tuple[Registry, PreparedData]) -> None:
    registry, data = volume
    jobs = JobStore(tmp_path)
    state = candidate_state()
    candidate = _constant_model(2, 1)
    judged = judge(registry, candidate, EvalPreset.for_size(64), data, CFG.gate)
    assert judged.promote is True and judged.current_name == "v0"
    # A person rolls back to v1 while the job is between its judgement and its promotion;
    # not pinned, so only the stale judgement stands in the way.
    activate_elsewhere(registry.home, "v1", pin=False)
    job_id = jobs.create({"epochs": 1}, "test")["job_id"]
    record = publish(registry, jobs, job_id, CFG, CHOICE, data, state, None, judged=judged)
    assert record["status"] == "succeeded" and record["version"] == "v2"
    assert record["promoted"] is False and registry.current() == "v1"
    assert ("not promoted: CURRENT changed from v0 to v1 while this job was judged"
            in record["reason"])
    promotion = registry.manifest("v2")["promotion"]
    assert promotion == record["promotion"]
    assert promotion["gate_passed"] is True and promotion["promoted"] is False
    assert promotion["current_version"] == "v0"  # what it was compared with

    # Judged against what is served now, the same candidate is promoted.
    job_id = jobs.create({"epochs": 1}, "test")["job_id"]
    record = publish(registry, jobs, job_id, CFG, CHOICE, data, state, None)
    assert record["promoted"] is True and registry.current() == record["version"] == "v3"


def test_a_pinned_version_stays_until_unpinned(
        tmp_path: Path, volume: tuple[Registry, PreparedData]) -> None:
    registry, data = volume
    jobs = JobStore(tmp_path)
    activate_elsewhere(registry.home, "v0", pin=True)
    job_id = jobs.create({"epochs": 1}, "test")["job_id"]
    record = publish(registry, jobs, job_id, CFG, CHOICE, data, candidate_state(), None)
    assert record["promoted"] is False and registry.current() == "v0"
    assert record["promotion"]["gate_passed"] is True
    assert "not promoted: pinned to v0 since " in record["reason"]
    assert "by another process; PUT /v1/models/policy {\"mode\":\"automatic\"} or " \
           "`visionloop unpin` lets jobs promote" in jobs.get(job_id)["reason"]
    registry.set_policy("automatic", by="test")
    job_id = jobs.create({"epochs": 1}, "test")["job_id"]
    record = publish(registry, jobs, job_id, CFG, CHOICE, data, candidate_state(), None)
    assert record["promoted"] is True and registry.current() == record["version"]
