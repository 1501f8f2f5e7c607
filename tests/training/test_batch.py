"""predict_dir: a folder of a few hundred real images over 2 Ray Data actors, killed for real
mid-run and resumed; bad files become error lines; answers equal the served classifier's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.app import prepare_home
from service.classifier import Classifier
from service.settings import load_settings
from tests.support.images import image_bytes, labelled_set
from tests.support.service import BACKBONE
from tests.support.versions import publish_version
from training.batch import (
    InvalidBatchRequest,
    OutputVersionMismatch,
    list_files,
    predict_dir,
    read_done,
)
from training.registry import Registry, VersionNotFound

N_IMAGES = 300
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume whose CURRENT is a small 3-class version (crop 64)."""
    home = tmp_path_factory.mktemp("batch-home")
    prepare_home(load_settings(home=home, backbone=BACKBONE))
    registry = Registry(home)
    registry.set_current(publish_version(registry, ["red", "blue", "green"], crop=64))
    return home


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_IMAGES PNGs in two subfolders, plus a text file, a GIF and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    for i, (label, data) in enumerate(labelled_set(["red", "blue", "green"], N_IMAGES // 3,
                                                   size=40)):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"{label}-{i}.png").write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    (root / "anim.gif").write_bytes(image_bytes(fmt="GIF"))
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_refusals_before_any_work(home: Path, folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidBatchRequest, match="not a directory"):
        predict_dir(home, tmp_path / "nope", tmp_path / "o.jsonl")
    with pytest.raises(InvalidBatchRequest, match=r"\.jsonl or \.csv"):
        predict_dir(home, folder, tmp_path / "o.txt")
    with pytest.raises(VersionNotFound):
        predict_dir(home, folder, tmp_path / "o.jsonl", version="v42")
    with pytest.raises(InvalidBatchRequest, match="batch_size"):
        predict_dir(home, folder, tmp_path / "o.jsonl", batch_size=0)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"path": "a/x.png", "label": "y", "version": "v0"}) + "\n")
    with pytest.raises(OutputVersionMismatch, match="started with model v0"):
        predict_dir(home, folder, other)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    with pytest.raises(InvalidBatchRequest, match="not a predict-dir output"):
        predict_dir(home, folder, garbage)
    assert garbage.read_text() == "hello\n"


def test_an_unfinished_last_line_is_cut(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"path": "a.png", "version": "v1"}\n{"path": "b.p')
    done, versions = read_done(out, "jsonl")
    assert done == {"a.png"} and versions == {"v1"}
    assert out.read_text() == '{"path": "a.png", "version": "v1"}\n'


KILLED_RUN = """
import sys, time
import ray
from training.batch import predict_dir
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
# Slow the writer down so that the kill lands mid-run, whatever the machine's speed.
predict_dir(sys.argv[1], sys.argv[2], sys.argv[3], workers=2, batch_size=8, progress=False,
            on_batch=lambda n: time.sleep(0.3))
"""


@pytest.mark.slow
def test_killed_then_resumed_every_image_once(home: Path, folder: Path, tmp_path: Path,
                                              ray_cluster: None) -> None:
    out = tmp_path / "preds.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(home), str(folder),
                             str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 40:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait(timeout=60)
    first = out.read_bytes()
    whole = first[: first.rfind(b"\n") + 1]
    done_before = len(whole.splitlines())
    assert 40 <= done_before < N_IMAGES

    files = list_files(folder)
    assert len(files) == N_IMAGES + 2  # the hidden file is not listed
    report = predict_dir(home, folder, out, workers=2, batch_size=16, progress=False)
    assert out.read_bytes().startswith(whole)  # finished lines kept, none redone
    assert report.skipped == done_before and report.workers == 2
    assert report.predicted + report.errors == len(files) - done_before
    records = _lines(out)
    assert sorted(r["path"] for r in records) == files  # every file exactly once
    errors = {r["path"]: r["error"]["code"] for r in records if "error" in r}
    assert errors == {"notes.txt": "unsupported_media_type",
                      "anim.gif": "unsupported_media_type"}
    assert {r["version"] for r in records} == {"v1"}
    assert report.images_per_s > 0

    # The same answers as the served classifier on the same bytes.
    classifier = Classifier(home, threads=1)
    classifier.sync()
    sample = [r for r in records if "error" not in r][:12]
    served = classifier.predict_bytes([((folder / r["path"]).read_bytes(), 5) for r in sample])
    for r, p in zip(sample, served, strict=True):
        assert not isinstance(p, Exception)
        assert [t["label"] for t in r["top_k"]] == [lb for lb, _ in p.top_k]
        assert all(abs(t["score"] - s) < 1e-5 for t, (_, s) in zip(r["top_k"], p.top_k,
                                                                   strict=True))

    again = predict_dir(home, folder, out, workers=2, progress=False)
    assert (again.skipped, again.predicted, again.errors) == (len(files), 0, 0)


@pytest.mark.slow
def test_csv_output(home: Path, tmp_path: Path, ray_cluster: None) -> None:
    import csv

    small = tmp_path / "small"
    small.mkdir()
    for i, (_, data) in enumerate(labelled_set(["red", "blue"], 5, size=32, seed=3)):
        (small / f"{i}.png").write_bytes(data)
    (small / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = small / "preds.csv"  # inside the folder: never classified itself
    report = predict_dir(home, small, out, version="v1", workers=2, top_k=2, progress=False)
    assert (report.predicted, report.errors) == (10, 1)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 11 and set(rows[0]) == {"path", "label", "score", "top_k", "version",
                                                "error"}
    good = [r for r in rows if not r["error"]]
    assert all(len(json.loads(r["top_k"])) == 2 and r["version"] == "v1" for r in good)
    [bad] = [r for r in rows if r["error"]]
    assert bad["path"] == "bad.png" and json.loads(bad["error"])["code"] == "invalid_image"
