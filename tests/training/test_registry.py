"""The registry: version 0, atomic publishing, retention, and every change of CURRENT, of the
promotion policy and of the set of versions under one cross-process lock (activate, a job's
promotion, retention), raced for real by threads and processes on a tmp volume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.service import BACKBONE
from training.registry import (
    MANIFEST,
    POLICY,
    InvalidPolicy,
    InvalidVersion,
    NoCurrentVersion,
    Registry,
    VersionNotFound,
)

REPO = Path(__file__).resolve().parents[2]

PUBLISH_FOREVER = """
import sys, time, torch
from training.registry import Registry
from training.model import build_model
registry = Registry(sys.argv[1])
state = build_model("efficientnet_lite0", 2, pretrained=False).state_dict()
manifest = registry.manifest("v0")
while True:
    version, staging = registry.allocate()
    registry.publish(version, staging, state,
                     {**manifest, "classes": ["a", "b"], "parent": registry.current()})
    registry.set_current(version)
    print(version, flush=True)
"""


def test_version_zero_is_the_pretrained_imagenet_classifier(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.ensure_v0("efficientnet_lite0") == "v0"
    assert registry.ensure_v0("efficientnet_lite0") is None
    assert registry.current() == "v0"
    loaded = registry.load("v0")
    assert len(loaded.classes) == 1000 and loaded.classes[285] == "Egyptian cat"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    eager = registry.load("v0", engine="eager")
    with torch.no_grad():
        assert loaded.model(x).shape == (2, 1000)
        torch.testing.assert_close(loaded.model(x), eager.model(x), atol=1e-3, rtol=1e-3)
    inference = loaded.manifest["inference"]
    # The engine was chosen by measurement when v0 was published, and says why.
    assert inference["engine"] in ("eager", "onnxruntime") and inference["reason"]
    if inference["engine"] == "onnxruntime":
        assert type(loaded.model).__name__ == "OnnxModule"
        assert inference["onnxruntime_images_per_s"] > inference["eager_images_per_s"]
        assert (registry.version_dir("v0") / "model.onnx").exists()


@pytest.mark.slow  # a publisher subprocess killed part-way
def test_publisher_killed_mid_write_leaves_current_complete(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    for delay in (1.5, 2.3, 3.1):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_FOREVER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one publish completed
        time.sleep(delay % 1)  # land the kill somewhere inside a later publish
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        current = registry.current()
        assert current is not None
        loaded = registry.load(current)  # complete and loadable
        assert loaded.classes == ["a", "b"]
        # Every listed version is complete; leftovers are only `.v<N>.partial` folders.
        for v in registry.versions():
            assert (registry.version_dir(v) / "model.safetensors").exists()
        leftovers = [p.name for p in (tmp_path / "models").iterdir()
                     if p.name not in registry.versions()]
        assert set(leftovers) <= {"CURRENT", ".lock", "backbone.json"} | {
            p.name for p in (tmp_path / "models").glob(".v*.partial")}
    removed = registry.remove_stale_partials(older_than_s=0)
    assert not list((tmp_path / "models").glob(".v*.partial"))
    assert all(name.endswith(".partial") for name in removed)


def test_retention_keeps_current_its_parent_and_v0(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    manifest = registry.manifest("v0")
    state = {"w": torch.zeros(1)}
    for parent in ("v0", "v1", "v2", "v3", "v4"):
        version, staging = registry.allocate()
        registry.publish(version, staging, state, {**manifest, "parent": parent})
    registry.set_current("v2")  # a pinned older version; its parent is v1
    removed = registry.prune(keep=2)
    assert sorted(removed) == ["v3"]
    assert registry.versions() == ["v0", "v1", "v2", "v4", "v5"]
    assert registry.current() == "v2"


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.ensure_v0("efficientnet_lite0")
    weights = registry.version_dir("v0") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # still a valid safetensors file with finite numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidVersion, match="checksum"):
        registry.load("v0")


# -- one lock for every writer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def v0_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/ with v0 published once for the module (publishing v0 measures engines)."""
    home = tmp_path_factory.mktemp("v0")
    Registry(home).ensure_v0(BACKBONE)
    return home / "models"


@pytest.fixture
def registry(v0_models: Path, tmp_path: Path) -> Registry:
    """A volume of its own holding v0 (CURRENT)."""
    shutil.copytree(v0_models, tmp_path / "models")
    return Registry(tmp_path)


def tiny_version(registry: Registry, parent: str = "v0", passed: bool | None = None,
                 judged_current: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """A version with v0's manifest and a one-number state dict (never loaded: these tests
    race the files, not the models). `passed` None: plain publish; else published as a job's
    candidate whose gate said `passed`, judged against `judged_current`. -> (version, the
    promotion record or None)."""
    manifest = {**registry.manifest("v0"), "parent": parent}
    version, staging = registry.allocate()
    if passed is None:
        registry.publish(version, staging, {"w": torch.zeros(1)}, manifest)
        return version, None
    manifest["promotion"] = {"promoted": passed, "reason": "the gate's reason"}
    record = registry.publish_candidate(version, staging, {"w": torch.zeros(1)}, manifest,
                                        None, judged_current)
    return version, record


def test_policy_is_automatic_until_set_and_refuses_bad_modes(registry: Registry) -> None:
    assert registry.policy() == {"mode": "automatic", "version": None, "changed_at": None,
                                 "by": None}
    before = time.time()
    pinned = registry.set_policy("pinned", by="cli")
    assert pinned["mode"] == "pinned" and pinned["version"] == "v0" and pinned["by"] == "cli"
    assert pinned["changed_at"] >= before and registry.policy() == pinned
    assert json.loads((registry.root / POLICY).read_text()) == pinned
    for bad in ("manual", "", "PINNED", None):
        with pytest.raises(InvalidPolicy) as err:
            registry.set_policy(bad, by="cli")  # type: ignore[arg-type]
        assert err.value.status == 400 and "expected one of ['automatic', 'pinned']" in str(
            err.value)
    assert registry.policy() == pinned  # untouched by the refusals
    assert registry.set_policy("automatic", by="api")["version"] is None
    # Hand-edited into nonsense: counted as pinned to CURRENT (no job replaces the model while
    # nobody can tell what was meant) until the policy is set again.
    (registry.root / POLICY).write_text("{not json")
    assert registry.policy() == {"mode": "pinned", "version": "v0", "changed_at": None,
                                 "by": None}
    assert registry.set_policy("automatic", by="api")["mode"] == "automatic"
    (registry.root / "CURRENT").unlink()
    with pytest.raises(NoCurrentVersion) as none:
        registry.set_policy("pinned", by="api")
    assert none.value.status == 409


def test_activate_checks_sets_pins_and_can_be_undone(registry: Registry) -> None:
    v1, _ = tiny_version(registry)
    v2, _ = tiny_version(registry)
    for name, error in (("v9", VersionNotFound), ("bogus", VersionNotFound),
                        ("../v0", VersionNotFound)):
        with pytest.raises(error):
            registry.activate(name, pin=True, by="api")
    (registry.version_dir(v2) / "model.safetensors").unlink()
    with pytest.raises(InvalidVersion, match=r"weights file model\.safetensors is missing"):
        registry.activate(v2, pin=True, by="api")
    assert registry.current() == "v0" and registry.policy()["mode"] == "automatic"

    done = registry.activate(v1, pin=True, by="api")
    assert (done.previous, done.version, registry.current()) == ("v0", v1, v1)
    assert registry.policy() == done.policy and done.policy["version"] == v1
    assert registry.undo_activation(done) is True
    assert registry.current() == "v0"
    assert registry.policy()["mode"] == "automatic" and not (registry.root / POLICY).exists()

    pinned = registry.set_policy("pinned", by="cli")
    loose = registry.activate(v1, pin=False, by="api")  # activates and unpins
    assert registry.current() == v1 and registry.policy()["mode"] == "automatic"
    assert registry.undo_activation(loose) is True
    assert registry.current() == "v0" and registry.policy() == pinned  # the pin is back

    later = registry.activate(v1, pin=True, by="api")
    registry.activate("v0", pin=True, by="cli")  # someone else's choice, after this one
    assert registry.undo_activation(later) is False  # ... stands
    assert registry.current() == "v0" and registry.policy()["by"] == "cli"


def test_retention_keeps_the_pinned_version_and_its_parent(registry: Registry) -> None:
    for parent in ("v0", "v1", "v2", "v3", "v4"):
        tiny_version(registry, parent)
    registry.activate("v2", pin=True, by="api")  # pinned; its parent is v1
    registry.set_current("v4")  # CURRENT moved by hand (the pin stays on v2); parent v3
    assert registry.prune(keep=1) == []
    assert registry.versions() == ["v0", "v1", "v2", "v3", "v4", "v5"]
    registry.set_policy("automatic", by="api")
    assert registry.prune(keep=1) == ["v1", "v2"]
    assert not list(registry.root.glob(".v*.removed"))


def test_a_pinned_policy_publishes_without_promoting(registry: Registry) -> None:
    registry.set_policy("pinned", by="api")
    version, record = tiny_version(registry, passed=True, judged_current="v0")
    assert record is not None and registry.current() == "v0"
    assert record["promoted"] is False and record["gate_passed"] is True
    assert record["policy"]["mode"] == "pinned"
    assert record["reason"].startswith("the gate's reason; not promoted: pinned to v0 since ")
    assert record["reason"].endswith(
        "by api; PUT /v1/models/policy {\"mode\":\"automatic\"} or `visionloop unpin` lets "
        "jobs promote")
    assert registry.manifest(version)["promotion"] == record
    registry.set_policy("automatic", by="api")
    version, record = tiny_version(registry, passed=True, judged_current="v0")
    assert record is not None and record["promoted"] is True and registry.current() == version
    _, failed = tiny_version(registry, passed=False, judged_current=version)
    assert failed is not None  # no policy note: the gate said no
    assert (failed["promoted"], failed["gate_passed"], failed["reason"]) == (
        False, False, "the gate's reason")
    assert registry.current() == version


def test_a_candidate_judged_against_a_replaced_current_is_not_promoted(
        registry: Registry) -> None:
    v1, _ = tiny_version(registry)
    registry.activate(v1, pin=False, by="api")  # after the job read CURRENT (v0)
    version, record = tiny_version(registry, passed=True, judged_current="v0")
    assert record is not None and record["promoted"] is False and registry.current() == v1
    assert (f"not promoted: CURRENT changed from v0 to {v1} while this job was judged"
            in record["reason"])
    assert f"POST /v1/models/{version}/activate serves this version" in record["reason"]


def publish_and_prune(home: str, seconds: float, min_rounds: int = 8) -> int:
    """Retention as the service runs it, flat out: publish three versions, prune to the newest
    one, repeat, for `seconds` and at least `min_rounds` times (a loaded machine does fewer
    rounds in the same time; the race needs enough of them either way). -> rounds."""
    registry = Registry(home)
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or rounds < min_rounds:
        for _ in range(3):
            tiny_version(registry)
        registry.prune(keep=1)
        rounds += 1
    return rounds


PRUNE_IN_A_PROCESS = """
import sys
from tests.training.test_registry import publish_and_prune
print("ready", flush=True)
print(publish_and_prune(sys.argv[1], float(sys.argv[2])), flush=True)
"""


def activate_what_retention_removes_next(registry: Registry, running: Callable[[], bool]
                                         ) -> tuple[int, int]:
    """While `running()`: activate the oldest version other than CURRENT that retention may
    remove (pinning every other time). This is the only writer of CURRENT, so CURRENT must
    name a complete version at every moment: an activate either finds its version (then
    retention keeps it while it is CURRENT or pinned) or refuses it (VersionNotFound, CURRENT
    untouched).
    -> (activations, refusals)."""
    activated = refused = 0
    while running():
        current = registry.current()
        assert current is not None and (registry.root / current / MANIFEST).exists(), \
            f"CURRENT names {current}, which retention removed"
        candidates = [v for v in registry.versions()[1:-1] if v != current]
        if not candidates:
            continue
        try:
            registry.activate(candidates[0], pin=activated % 2 == 0, by="test")
        except VersionNotFound:
            refused += 1
            continue
        activated += 1
    return activated, refused


def test_retention_racing_activates_in_threads(registry: Registry) -> None:
    rounds: list[int] = []
    pruner = threading.Thread(target=lambda: rounds.append(
        publish_and_prune(str(registry.home), 3.0)))
    pruner.start()
    try:
        activated, refused = activate_what_retention_removes_next(registry, pruner.is_alive)
    finally:
        pruner.join()
    assert rounds and rounds[0] > 5 and activated > 5, (rounds, activated, refused)
    assert (registry.root / str(registry.current()) / MANIFEST).exists()


@pytest.fixture
def pruner_process(registry: Registry) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", PRUNE_IN_A_PROCESS, str(registry.home),
                             "4"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow  # a process spawned: retention in another process, as in the service
def test_retention_in_another_process_racing_activates(
        registry: Registry, pruner_process: subprocess.Popen[str]) -> None:
    assert pruner_process.stdout is not None
    assert pruner_process.stdout.readline().strip() == "ready"
    activated, refused = activate_what_retention_removes_next(
        registry, lambda: pruner_process.poll() is None)
    rounds = int(pruner_process.stdout.read().strip() or 0)
    assert pruner_process.returncode == 0 and rounds > 5 and activated > 5, (
        rounds, activated, refused)


PROMOTE_IN_A_PROCESS = """
import sys
from tests.training.test_registry import tiny_version
from training.registry import Registry
registry = Registry(sys.argv[1])
while True:  # a job's end, flat out: judge against CURRENT, then publish the candidate
    judged = registry.current()
    version, record = tiny_version(registry, passed=True, judged_current=judged)
    print(version, record["promoted"], flush=True)
"""


@pytest.mark.slow  # a process spawned: jobs promoting from another process (`visionloop train`)
def test_a_pin_stops_promotions_from_another_process(registry: Registry) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROMOTE_IN_A_PROCESS, str(registry.home)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        for _ in range(3):  # promotions go through while the policy is automatic
            assert proc.stdout.readline().split()[1] == "True"
        with registry.lock:  # nothing is published or promoted while this is held
            pinned = registry.set_policy("pinned", by="test")
            before = set(registry.versions())
        # the pipe still holds lines of versions published before the pin: wait for 4 after it
        after: list[str] = []
        while len(after) < 4:
            version = proc.stdout.readline().split()[0]
            if version not in before:
                after.append(version)
        assert registry.current() == pinned["version"]
        for v in after:
            promotion = registry.manifest(v)["promotion"]
            assert promotion["promoted"] is False and promotion["gate_passed"] is True
            assert f"pinned to {pinned['version']} since" in promotion["reason"]
        registry.set_policy("automatic", by="test")
        while proc.stdout.readline().split()[1] != "True":
            pass
        assert registry.current() != pinned["version"]
    finally:
        proc.kill()
        proc.wait()
