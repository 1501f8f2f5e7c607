"""The prediction store on real files and a real SQLite index: identical images stored once,
bounds by count, bytes and age (reviewed items go first), the free-space floor, a full volume
(a real tmpfs), several processes writing at once, the review queue's filters and orders, ids
that cannot be paths, and the migration of the previous layout."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.predictions import (
    ROW_OVERHEAD_BYTES,
    PredictionNotFound,
    PredictionStore,
    new_prediction_id,
    uncertainty,
)
from tests.support.images import image_bytes, noisy_image

NO_FLOOR = {"min_free_bytes": 0}


def record(*scores: float, label: str = "cat", filename: str | None = "a.png") -> dict[str, Any]:
    """A prediction record as the predict route passes it: top-k scores, highest first."""
    labels = [label, *(f"other{i}" for i in range(1, len(scores)))]
    return {"model_version": "v0", "label": label, "score": scores[0], "filename": filename,
            "top_k": [{"label": n, "score": s} for n, s in zip(labels, scores, strict=True)]}


def image_files(store: PredictionStore) -> set[str]:
    return {p.name for p in store.images.iterdir()}


def index_totals(store: PredictionStore) -> tuple[int, int, int]:
    """(rows, images, bytes) counted from the tables themselves, not from the stats row."""
    with sqlite3.connect(store.db_path) as db:
        rows, row_bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM predictions").fetchone()
        images, image_bytes_ = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images").fetchone()
    db.close()
    return rows, images, row_bytes + image_bytes_


def assert_consistent(store: PredictionStore) -> None:
    """The stats row agrees with the tables, and every image row has its file with its size."""
    stats = store.stats()
    assert index_totals(store) == (stats.predictions, stats.images, stats.bytes)
    with sqlite3.connect(store.db_path) as db:
        images = db.execute("SELECT sha256, ext, size FROM images").fetchall()
    db.close()
    for sha, ext, size in images:
        path = store.images / f"{sha}.{ext}"
        assert path.stat().st_size == size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_identical_images_are_stored_once(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, **NO_FLOOR)
    a, jpeg = noisy_image(1, (10, 10, 10)), image_bytes(fmt="JPEG")
    first, again, other = new_prediction_id(), new_prediction_id(), new_prediction_id()
    assert store.save(first, a, record(0.4, 0.3)) == "stored"
    assert store.save(again, a, record(0.9, 0.1, filename=None)) == "stored"
    assert store.save(other, jpeg, record(0.6)) == "stored"
    assert image_files(store) == {f"{hashlib.sha256(a).hexdigest()}.png",
                                  f"{hashlib.sha256(jpeg).hexdigest()}.jpg"}
    stats = store.stats()
    assert (stats.predictions, stats.pending, stats.images) == (3, 3, 2)
    got = store.get(first)
    assert got.image_bytes() == a and got.media_type == "image/png"
    assert store.get(again).image_path == got.image_path
    assert store.get(other).media_type == "image/jpeg"
    assert got.record["filename"] == "a.png" and store.get(again).record["filename"] is None
    assert got.record["top_k"] == [{"label": "cat", "score": 0.4},
                                   {"label": "other1", "score": 0.3}]
    assert got.record["margin"] == pytest.approx(0.1) and got.record["state"] == "pending"
    assert_consistent(store)


@pytest.mark.parametrize("bad", ["../../secrets/api-token", "0" * 32, "", "F" * 32,
                                 "f" * 31 + "\0", "f" * 10_000, "images/../index.sqlite3"])
def test_ids_that_are_not_ours_are_not_found(tmp_path: Path, bad: str) -> None:
    store = PredictionStore(tmp_path, **NO_FLOOR)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(PredictionNotFound) as err:
        store.get(bad)
    assert len(str(err.value)) < 500  # a huge id is not echoed back whole
    with pytest.raises(PredictionNotFound):
        store.resolve(bad, "dismissed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_count_bound_removes_reviewed_items_first(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, keep=3, **NO_FLOOR)
    now = time.time()
    ids = [new_prediction_id() for _ in range(5)]
    for i, pid in enumerate(ids[:3]):
        assert store.save(pid, noisy_image(i, (50, 50, 50)), record(0.3),
                          created_at=now + i) == "stored"
    assert store.resolve(ids[1], "labelled") == "labelled"
    store.save(ids[3], noisy_image(3, (50, 50, 50)), record(0.3), created_at=now + 3)
    with pytest.raises(PredictionNotFound):  # the labelled one went, though not the oldest
        store.get(ids[1])
    store.get(ids[0])
    store.save(ids[4], noisy_image(4, (50, 50, 50)), record(0.3), created_at=now + 4)
    with pytest.raises(PredictionNotFound):  # then the oldest pending one
        store.get(ids[0])
    assert [r["prediction_id"] for r in store.review(1.0, 10, order="score")] == [
        ids[4], ids[3], ids[2]]
    assert len(image_files(store)) == 3
    assert_consistent(store)


def test_byte_bound_removes_the_oldest_and_images_no_one_refers_to(tmp_path: Path) -> None:
    images = [noisy_image(i, (90, 90, 90)) for i in range(6)]
    size = max(len(b) for b in images)
    row = ROW_OVERHEAD_BYTES + 200  # a generous row size for record(0.3) in this test
    store = PredictionStore(tmp_path, max_bytes=3 * (size + row), **NO_FLOOR)
    now = time.time()
    shared = new_prediction_id()
    store.save(shared, images[0], record(0.3), created_at=now)
    ids = []
    for i in range(1, 6):
        ids.append(new_prediction_id())
        assert store.save(ids[-1], images[i], record(0.3), created_at=now + i) == "stored"
        if i == 1:  # the first image again, newer: it must outlive its first prediction
            again = new_prediction_id()
            store.save(again, images[0], record(0.3), created_at=now + 1.5)
        assert store.stats().bytes <= store.max_bytes
        assert_consistent(store)
    with pytest.raises(PredictionNotFound):
        store.get(shared)
    kept = {r["prediction_id"] for r in store.review(1.0, 100)}
    assert ids[-1] in kept and ids[0] not in kept
    assert image_files(store) == {f"{store.get(p).record['sha256']}.png" for p in kept}


def test_image_larger_than_the_store_is_answered_but_not_kept(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, max_bytes=2000, **NO_FLOOR)
    pid = new_prediction_id()
    assert store.save(pid, noisy_image(1, (9, 9, 9)), record(0.2)) == "too_large"
    with pytest.raises(PredictionNotFound, match="VISIONLOOP_PREDICTIONS_MAX_BYTES"):
        store.get(pid)
    assert image_files(store) == set() and store.review(1.0, 10) == []
    assert store.stats().not_stored == 1


def test_below_the_free_space_floor_nothing_is_written(tmp_path: Path) -> None:
    floor = shutil.disk_usage(tmp_path).free + 2**40  # more than this volume will ever have
    store = PredictionStore(tmp_path, min_free_bytes=floor)
    pid = new_prediction_id()
    assert store.save(pid, noisy_image(2, (9, 9, 9)), record(0.2)) == "low_space"
    with pytest.raises(PredictionNotFound, match="VISIONLOOP_MIN_FREE_BYTES"):
        store.get(pid)
    with pytest.raises(PredictionNotFound, match="VISIONLOOP_MIN_FREE_BYTES"):
        store.resolve(pid, "dismissed")
    assert image_files(store) == set() and list(store.tmp.iterdir()) == []
    assert store.review(1.0, 10) == []
    # The same volume with the floor met again stores as before.
    assert PredictionStore(tmp_path, **NO_FLOOR).save(
        new_prediction_id(), noisy_image(2, (9, 9, 9)), record(0.2)) == "stored"


def test_a_store_that_keeps_nothing_writes_nothing(tmp_path: Path) -> None:
    for settings in ({"keep": 0}, {"max_bytes": 0}):
        store = PredictionStore(tmp_path / str(settings), **settings, **NO_FLOOR)
        pid = new_prediction_id()
        assert store.save(pid, noisy_image(3, (9, 9, 9)), record(0.2)) == "disabled"
        assert image_files(store) == set() and store.stats().predictions == 0
        with pytest.raises(PredictionNotFound):
            store.get(pid)


def test_age_bound_and_what_a_crash_leaves_behind(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, max_age_s=3600, **NO_FLOOR)
    now = time.time()
    old, new = new_prediction_id(), new_prediction_id()
    store.save(old, noisy_image(4, (9, 9, 9)), record(0.2), created_at=now - 1800)
    store.save(new, noisy_image(5, (9, 9, 9)), record(0.2), created_at=now)
    # A crash between the rename and the commit, and a save that died mid-write long ago,
    # beside a save writing right now.
    orphan = store.images / f"{'ab' * 32}.png"
    orphan.write_bytes(noisy_image(6, (9, 9, 9)))
    stale, fresh = store.tmp / "1.stale.tmp", store.tmp / "2.fresh.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (now - 7200, now - 7200))
    assert [r["prediction_id"] for r in store.review(1.0, 10, now=now + 1801)] == [new]
    assert store.prune(now + 1801) == 1
    with pytest.raises(PredictionNotFound):
        store.get(old)
    assert store.get(new).image_bytes() == noisy_image(5, (9, 9, 9))
    assert not orphan.exists() and not stale.exists() and fresh.exists()
    assert image_files(store) == {f"{store.get(new).record['sha256']}.png"}
    assert store.prune(now + 3601) == 1 and image_files(store) == set()
    # A prediction made already older than the limit (a slow clock elsewhere) is not kept.
    store.save(old, noisy_image(4, (9, 9, 9)), record(0.2), created_at=now - 7200)
    with pytest.raises(PredictionNotFound):
        store.get(old)
    assert_consistent(store)


def test_uncertainty_over_top_k() -> None:
    def h(*ps: float) -> float:
        return -sum(p * math.log(p) for p in ps)

    assert uncertainty([0.5, 0.5]) == (0.0, pytest.approx(math.log(2)))
    margin, entropy = uncertainty([0.1, 0.6])  # any order; the rest (0.3) is one outcome
    assert margin == pytest.approx(0.5) and entropy == pytest.approx(h(0.6, 0.1, 0.3))
    # One score known: the runner-up is taken as large as it can be.
    assert uncertainty([0.9]) == (pytest.approx(0.8), pytest.approx(h(0.9, 0.1)))
    assert uncertainty([0.3])[0] == 0
    assert uncertainty([1.0]) == (1.0, 0.0)


def test_review_queue_filters_orders_and_forgets_reviewed_items(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, **NO_FLOOR)
    # margin order A, B, C; entropy order B, A, C; score order B, A, C.
    shaped = {"A": record(0.40, 0.39, label="cat"),
              "B": record(0.20, 0.10, 0.10, 0.10, 0.10, label="dog"),
              "C": record(0.45, 0.05, label="cat"),
              "D": record(0.90, 0.05, label="cat")}
    ids = {}
    for i, (name, rec) in enumerate(shaped.items()):
        ids[name] = new_prediction_id()
        store.save(ids[name], noisy_image(10 + i, (9, 9, 9)), rec)
    names = {v: k for k, v in ids.items()}

    def queue(**kw: Any) -> list[str]:
        below = kw.pop("below", 0.5)
        return [names[r["prediction_id"]] for r in store.review(below, kw.pop("limit", 10), **kw)]

    assert queue() == ["A", "B", "C"]  # margin by default; D is confident
    assert queue(order="entropy") == ["B", "A", "C"]
    assert queue(order="score") == ["B", "A", "C"]
    assert queue(label="cat") == ["A", "C"] and queue(label="bird") == []
    assert queue(below=0.42) == ["A", "B"] and queue(limit=1) == ["A"]
    assert queue(below=1.0, label="cat", order="score") == ["A", "C", "D"]
    with pytest.raises(ValueError, match="order"):
        store.review(0.5, 10, order="random")  # type: ignore[arg-type]

    assert store.resolve(ids["A"], "labelled") == "labelled"
    assert store.resolve(ids["B"], "dismissed") == "dismissed"
    assert queue() == ["C"]
    assert store.resolve(ids["A"], "dismissed") == "labelled"  # a label is not undone
    assert store.resolve(ids["B"], "dismissed") == "dismissed"  # twice: harmless
    assert store.resolve(ids["B"], "labelled") == "labelled"  # feedback after a dismissal
    assert store.get(ids["B"]).record["state"] == "labelled"  # reviewed: still readable


def _legacy_pair(root: Path, pid: str, image: bytes | None, record_text: str | None) -> None:
    if image is not None:
        (root / f"{pid}.png").write_bytes(image)
    if record_text is not None:
        (root / f"{pid}.json").write_text(record_text)


def test_previous_layout_is_migrated_at_open(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    root.mkdir()
    created = time.time() - 60
    good, no_image, no_record, corrupt = (new_prediction_id() for _ in range(4))
    _legacy_pair(root, good, noisy_image(20, (9, 9, 9)), json.dumps(
        {"prediction_id": good, "created_at": created, **record(0.3, 0.2)}))
    _legacy_pair(root, no_image, None, json.dumps({"prediction_id": no_image,
                                                   "created_at": created, **record(0.3)}))
    _legacy_pair(root, no_record, noisy_image(21, (9, 9, 9)), None)
    _legacy_pair(root, corrupt, noisy_image(22, (9, 9, 9)), "{not json")
    (root / f".{good}.json.tmp").write_text("{")  # a write the old store never finished
    (root / "notes.txt").write_text("not ours to remove")

    store = PredictionStore(tmp_path, **NO_FLOOR)
    got = store.get(good)
    assert got.image_bytes() == noisy_image(20, (9, 9, 9))
    assert got.record["created_at"] == pytest.approx(created)
    assert got.record["margin"] == pytest.approx(0.1)
    for gone in (no_image, no_record, corrupt):
        with pytest.raises(PredictionNotFound):
            store.get(gone)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("index.")) == [
        ".tmp", "images", "notes.txt"]
    PredictionStore(tmp_path, **NO_FLOOR)  # opened again: nothing left to migrate
    assert store.stats().predictions == 1
    assert_consistent(store)


def _save_many(args: tuple[str, int, int]) -> list[str]:
    """In another process: 20 saves; half of the images are the same in every process."""
    home, worker, keep = args
    store = PredictionStore(home, keep=keep, **NO_FLOOR)
    out: list[str] = []
    for i in range(20):
        data = noisy_image(i if i % 2 else 1000 + worker * 100 + i, (60, 60, 60))
        out.append(store.save(new_prediction_id(), data, record(0.3)))
    return out


def test_many_processes_write_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        outcomes = pool.map(_save_many, [(str(tmp_path), w, 50) for w in range(4)])
    assert all(o == "stored" for worker in outcomes for o in worker), outcomes
    store = PredictionStore(tmp_path, keep=50, **NO_FLOOR)
    assert store.stats().predictions == 50  # 80 saved, the count bound held throughout
    assert image_files(store) == {f"{sha}.png" for sha in (
        hashlib.sha256(store.get(r["prediction_id"]).image_bytes()).hexdigest()
        for r in store.review(1.0, 100))}
    assert_consistent(store)


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A real small filesystem (root only; as tests/reliability/test_faults.py does)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False).returncode == 0


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A home whose predictions/ is a 1 MiB tmpfs."""
    if not _mount_tmpfs(tmp_path / "predictions", "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "predictions")], check=False)


def test_full_volume_answers_and_leaves_nothing_partial(small_volume: Path) -> None:
    store = PredictionStore(small_volume, **NO_FLOOR)
    stored: dict[str, bytes] = {}
    outcome = "stored"
    for i in range(200):
        data = noisy_image(100 + i, (128, 128, 128), size=96)
        pid = new_prediction_id()
        outcome = store.save(pid, data, record(0.3))
        if outcome != "stored":
            break
        stored[pid] = data
    assert outcome == "volume_full" and stored
    assert list(store.tmp.iterdir()) == []
    for pid, data in stored.items():
        assert store.get(pid).image_bytes() == data
    # Space again (the same filesystem, larger): the leftover of the failed save is swept,
    # and saving works.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_volume / "predictions")],
                   check=True)
    store.prune()
    assert_consistent(store)
    assert len(image_files(store)) == len(stored)
    assert store.save(new_prediction_id(), noisy_image(999, (1, 2, 3)), record(0.3)) == "stored"


@pytest.mark.slow
def test_api_replicas_share_one_store_through_serve(ray_cluster: None, tmp_path: Path) -> None:
    """Two API replicas (two processes) saving at once into one index, under real HTTP: every
    answered prediction is kept within the count bound, identical images once, and any replica
    serves the review queue, the images and feedback of every prediction."""
    from tests.support.load import Hammer
    from tests.support.service import start_service
    from tests.support.waiting import wait_for

    svc = start_service(tmp_path, classifier_replicas=2, predictions_keep=60)
    images = [noisy_image(i, (40 * i, 60, 90)) for i in range(5)]
    with Hammer(svc.url, images, threads=4) as hammer:
        wait_for(lambda: len(hammer.results) >= 80 or None, timeout=300, interval=0.5,
                 what="80 predictions")
    assert not hammer.failures(), hammer.failures()[:3]
    store = PredictionStore(svc.home, keep=60, **NO_FLOOR)
    stats = store.stats()
    assert (stats.predictions, stats.images) == (60, 5)
    assert_consistent(store)
    with svc.client() as c:
        items = c.get("/v1/review", params={"below": 1.0, "limit": 1000}).json()["items"]
        assert len(items) == 60
        for item in items[:10]:
            assert c.get(item["image_url"]).content in images
        first = items[0]["prediction_id"]
        r = c.post("/v1/feedback", json={"prediction_id": first, "label": "blueish"})
        assert r.status_code == 200, r.text
        queued = c.get("/v1/review", params={"below": 1.0, "limit": 1000}).json()["items"]
        assert first not in {i["prediction_id"] for i in queued} and len(queued) == 59
