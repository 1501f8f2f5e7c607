"""Shadow and canary on the plain Classifier (no Ray): the trial file the registry writes, a
canary share within a few points of its setting over many requests, a shadow version that
answers nothing, a trial version that cannot load being ignored, and the registry's refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from service.classifier import Classifier, Prediction
from tests.support.images import image_bytes
from tests.support.service import BACKBONE
from tests.support.versions import publish_broken_copy
from tests.support.versions import publish_version as publish
from training.registry import InvalidTrial, InvalidVersion, Registry, VersionNotFound


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("trial-home")
    registry = Registry(home)
    assert registry.ensure_v0(BACKBONE) == "v0"
    assert publish(registry, ["a", "b"]) == "v1"
    assert publish(registry, ["a", "b"]) == "v2"
    registry.activate("v1", True, "test")
    return home


def answers(clf: Classifier, n: int, version: str | None = None) -> list[Prediction]:
    data = image_bytes((120, 60, 200), size=(40, 40))
    out = clf.predict_requests([(data, 1, version)] * n)
    assert all(isinstance(p, Prediction) for p in out)
    return [p for p in out if isinstance(p, Prediction)]


def test_canary_share_over_many_requests(home: Path) -> None:
    registry = Registry(home)
    registry.set_trial("v2", "canary", 0.1, "test")
    try:
        clf = Classifier(home, threads=1)
        assert clf.sync() == "v1"
        assert clf.status()["trial"] == {"version": "v2", "mode": "canary", "share": 0.1}
        n = 2000
        counts = Counter(p.version for p in answers(clf, n))
        share = counts["v2"] / n
        print(f"\ncanary share 0.1 over {n} requests on the real classifier: {share:.4f} "
              f"({counts['v2']} answered by v2)")
        assert abs(share - 0.1) < 0.025  # 3.7 standard deviations at n = 2000
        assert all(p.shadow is None for p in answers(clf, 50))
        # a request naming a version is never re-routed
        assert {p.version for p in answers(clf, 200, "v1")} == {"v1"}
        assert {p.version for p in answers(clf, 50, "v0")} == {"v0"}
    finally:
        registry.end_trial()


def test_shadow_answers_nothing(home: Path) -> None:
    registry = Registry(home)
    registry.set_trial("v2", "shadow", 0.5, "test")
    try:
        clf = Classifier(home, threads=1)
        clf.sync()
        n = 400
        got = answers(clf, n)
        assert {p.version for p in got} == {"v1"}  # every answer is the current version's
        shadows = [p.shadow for p in got if p.shadow is not None]
        share = len(shadows) / n
        print(f"\nshadow share 0.5 over {n} requests: {share:.4f} shadowed, none answered")
        assert abs(share - 0.5) < 0.1  # 4 standard deviations at n = 400
        assert all(s.version == "v2" and s.label in ("a", "b") for s in shadows)
        registry.end_trial()
        clf.sync()
        assert clf.status()["trial"] is None
        assert all(p.shadow is None for p in answers(clf, 100))
    finally:
        registry.end_trial()


def test_unloadable_trial_is_ignored(home: Path) -> None:
    registry = Registry(home)
    broken = publish_broken_copy(registry, "v2")
    registry.set_trial(broken, "canary", 1.0, "test")
    try:
        clf = Classifier(home, threads=1)
        clf.sync()
        status = clf.status()
        assert status["trial"] is None and broken in status["trial_error"]
        assert {p.version for p in answers(clf, 20)} == {"v1"}
    finally:
        registry.end_trial()


def test_activating_the_trial_version_ends_the_trial(home: Path) -> None:
    registry = Registry(home)
    registry.set_trial("v2", "canary", 0.5, "test")
    registry.activate("v2", True, "test")
    try:
        assert registry.trial() is None
        clf = Classifier(home, threads=1)
        assert clf.sync() == "v2" and clf.status()["trial"] is None
    finally:
        registry.activate("v1", True, "test")


def test_trials_refused(home: Path) -> None:
    registry = Registry(home)
    with pytest.raises(InvalidTrial, match="unknown trial mode"):
        registry.set_trial("v2", "blue-green", 0.1, "test")
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidTrial, match="outside"):
            registry.set_trial("v2", "canary", share, "test")
    with pytest.raises(InvalidTrial, match="current version"):
        registry.set_trial("v1", "shadow", 0.1, "test")
    with pytest.raises(VersionNotFound):
        registry.set_trial("v99", "shadow", 0.1, "test")
    with pytest.raises(VersionNotFound):
        registry.set_trial("../v1", "shadow", 0.1, "test")
    gone = publish(registry, ["a", "b"])
    (registry.version_dir(gone) / "model.safetensors").unlink()
    with pytest.raises(InvalidVersion):
        registry.set_trial(gone, "shadow", 0.1, "test")
    assert registry.trial() is None
    # a hand-edited, malformed trial file is no trial
    (registry.root / "TRIAL").write_text('{"version": "v2", "mode": "canary"}')
    assert registry.trial() is None
    (registry.root / "TRIAL").write_text("not json")
    assert registry.trial() is None
    assert registry.end_trial() is None
    assert not (registry.root / "TRIAL").exists()
