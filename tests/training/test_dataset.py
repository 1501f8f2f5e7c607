"""The dataset store: content addressing, relabelling, refusals, imports, the three-way hash
split, and the snapshots training jobs read."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.support.dataset import check_dataset_integrity
from tests.support.hostile import PickleMarker
from tests.support.images import encode, labelled_set, noisy_picture
from training.dataset import (
    DatasetStore,
    InvalidLabel,
    iter_cifar10,
    iter_imagefolder,
    split_items,
    split_of,
)
from training.imageio import ImageTooLarge, NotAnImage


def test_ingest_is_idempotent_and_relabels(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    data = encode(noisy_picture((200, 0, 0), 1), "JPEG")
    first = store.ingest(data, "cat")
    assert first.status == "added"
    assert (tmp_path / "dataset" / "cat" / f"{first.sha256}.jpg").read_bytes() == data
    assert store.ingest(data, "cat").status == "duplicate"
    moved = store.ingest(data, "dog")
    assert moved.status == "relabelled"
    assert store.counts() == {"dog": 1}
    assert not (tmp_path / "dataset" / "cat").exists()  # a label's folder goes with its last image
    assert store.new_since(0) == 1
    assert store.delete(first.sha256)
    assert store.counts() == {}
    assert store.new_since(0) == 0


@pytest.mark.parametrize("label", ["", "../etc", "a/b", ".hidden", "x" * 65, " lead", "trail ",
                                   "two  spaces", ".", "..", "a\\b", "tab\there", "new\nline",
                                   "nul\x00", "zero\u200bwidth", "rtl\u202eoverride", "50%",
                                   "a:b", "who?", "~tilde", "()", "--", "C:\\x"])
def test_unsafe_labels_are_refused_and_nothing_written(tmp_path: Path, label: str) -> None:
    store = DatasetStore(tmp_path)
    with pytest.raises(InvalidLabel, match="invalid label") as refused:
        store.ingest(encode(noisy_picture((0, 0, 0), 1)), label)
    assert "Label rules: 1-64 characters" in str(refused.value)  # the error lists the rules
    assert store.items() == []
    assert not store.ledger_path.exists()
    assert [p.name for p in store.root.iterdir() if p.name != ".lock"] == []


def test_non_images_and_bombs_are_refused(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path, max_pixels=1_000_000)
    with pytest.raises(NotAnImage):
        store.ingest(b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"0" * 100, "cat")
    with pytest.raises(NotAnImage):
        store.ingest(encode(noisy_picture((0, 0, 0), 1), "TIFF"), "cat")
    big = encode(noisy_picture((0, 0, 0), 1, size=1100), "PNG")
    with pytest.raises(ImageTooLarge):
        store.ingest(big, "cat")
    assert store.items() == []


def test_import_imagefolder_merges_train_and_val_and_skips_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 2)):
        for label, data in labelled_set(["red", "blue"], n, seed={"train": 0, "val": 50}[split]):
            d = src / split / label
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{len(list(d.iterdir()))}.png").write_bytes(data)
    (src / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (src / "train" / "red" / "notes.txt").write_text("hello")
    store = DatasetStore(tmp_path / "home")
    report = store.ingest_many(iter_imagefolder(src), source="import")
    assert (report.added, len(report.skipped)) == (10, 2)
    assert store.counts() == {"blue": 5, "red": 5}
    assert {Path(p).name for p, _ in report.skipped} == {"broken.jpg", "notes.txt"}


def _write_cifar(folder: Path, n_per_class: int) -> None:
    folder.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    rng = np.random.default_rng(0)
    labels = [i % 10 for i in range(10 * n_per_class)]
    data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)


def test_cifar10_batch_conversion(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, 4)
    store = DatasetStore(tmp_path / "home")
    report = store.ingest_many(iter_cifar10(folder, subset=3), source="cifar10")
    assert report.added == 30
    assert store.counts() == {f"class{i}": 3 for i in range(10)}
    item = store.items()[0]
    from PIL import Image

    with Image.open(item.path) as img:
        assert img.size == (32, 32) and img.format == "PNG"


def test_cifar_loader_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": PickleMarker(marker)}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        list(iter_cifar10(folder, subset=1))
    assert not marker.exists()


def _ingest(store: DatasetStore, labels: list[str], per_label: int, seed: int = 0) -> None:
    for label, data in labelled_set(labels, per_label, seed=seed):
        store.ingest(data, label)


def test_split_is_three_way_and_stable_when_images_are_added(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    _ingest(store, ["red", "blue"], 20)
    first = store.split()
    before = {i.sha256: name for name, items in first._asdict().items() for i in items}
    assert len(before) == 40 and all(first)  # every split holds images
    _ingest(store, ["red", "blue", "green"], 20, seed=7)
    second = store.split()
    after = {i.sha256: name for name, items in second._asdict().items() for i in items}
    assert len(after) == 100
    assert all(after[sha] == split for sha, split in before.items())
    assert all(split_of(sha) == split for sha, split in after.items())
    assert [i.sha256 for i in second.test] == [i.sha256 for i in split_items(store.items()).test]


def test_three_way_split_keeps_the_old_validation_split() -> None:
    """The migration from the two-way split (validation below 0.2, the rest train): validation
    images stay validation, and only old training images become test images."""
    shas = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(4000)]
    old = {sha: "val" if int(sha[:8], 16) / 2**32 < 0.2 else "train" for sha in shas}
    new = {sha: split_of(sha) for sha in shas}
    assert {s for s in shas if new[s] == "val"} == {s for s in shas if old[s] == "val"}
    moved = [s for s in shas if new[s] != old[s]]
    assert moved and all(old[s] == "train" and new[s] == "test" for s in moved)
    assert 0.15 < len(moved) / len(shas) < 0.25  # about DEFAULT_TEST_FRACTION of all images


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (0.0, 0.2), (0.2, 1.0), (-0.1, 0.2)])
def test_bad_split_fractions_are_refused(val: float, test: float) -> None:
    with pytest.raises(ValueError, match=f"val={val!r}, test={test!r}"):
        split_of("0" * 64, val, test)


def test_snapshot_freezes_a_jobs_images_through_delete_relabel_and_add(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    _ingest(store, ["red", "blue"], 4)
    items = store.items()
    snap = store.snapshot("job-1")
    assert snap.method == "hardlink" and snap.ledger_offset == store.ledger_length() == 8
    assert [(i.sha256, i.label) for i in snap.items()] == [(i.sha256, i.label) for i in items]
    assert all(i.path.parent == snap.root for i in snap.items())
    assert all(s.path.stat().st_ino == i.path.stat().st_ino
               for s, i in zip(snap.items(), items, strict=True))  # links, no bytes copied

    deleted, relabelled = items[0], items[1]
    assert store.delete(deleted.sha256)
    assert store.ingest(relabelled.path.read_bytes(), "green").status == "relabelled"
    (_, new_image), = labelled_set(["yellow"], 1, seed=3)
    store.ingest(new_image, "yellow")

    # The job's view is unchanged: same images, the labels they had, readable bytes.
    reopened = store.open_snapshot("job-1")
    assert reopened == snap
    for item in snap.items():
        assert hashlib.sha256(item.path.read_bytes()).hexdigest() == item.sha256
    assert store.find(deleted.sha256) is None
    assert store.find(relabelled.sha256).label == "green"  # type: ignore[union-attr]
    # The store is consistent and the snapshot no part of it; the relabel and the addition made
    # during the job are new for the next one (a delete leaves nothing to train on).
    assert check_dataset_integrity(tmp_path) == {i.sha256: i.label for i in store.items()}
    assert store.counts() == {"blue": 2, "green": 1, "red": 4, "yellow": 1}
    assert store.new_since(snap.ledger_offset) == 2

    assert store.remove_snapshot("job-1") and not snap.root.exists()
    assert store.open_snapshot("job-1") is None and not store.remove_snapshot("job-1")
    assert store.snapshot_ids() == []


def test_snapshots_reopen_and_retention_removes_those_of_dead_jobs(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    _ingest(store, ["red", "blue"], 2)
    store.snapshot("alive")
    dead = store.snapshot("dead")
    unfinished = store.snapshots_root / "killed"  # a snapshot whose taker died half-way
    unfinished.mkdir()
    os.link(dead.items()[0].path, unfinished / dead.items()[0].path.name)
    assert store.open_snapshot("killed") is None
    dead.items()[1].path.unlink()  # a file of it gone: not a snapshot to train on
    assert store.open_snapshot("dead") is None
    assert store.snapshot_ids() == ["alive", "dead", "killed"]
    assert store.prune_snapshots(keep={"alive"}) == ["dead", "killed"]
    assert store.snapshot_ids() == ["alive"] and store.open_snapshot("alive") is not None
    # Taking a snapshot again under the same id starts afresh.
    _ingest(store, ["green"], 1)
    assert len(store.snapshot("alive").items()) == 5
    with pytest.raises(ValueError, match="invalid job id"):
        store.snapshot("../escape")
    with pytest.raises(ValueError, match="invalid job id"):
        store.open_snapshot(".hidden")
    assert not (tmp_path / "escape").exists()


def test_snapshot_copies_where_the_filesystem_has_no_hard_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume without hard links (some network filesystems) cannot be had here: os.link is
    made to fail as it fails there."""
    store = DatasetStore(tmp_path)
    _ingest(store, ["red", "blue"], 2)

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    snap = store.snapshot("job-2")
    assert snap.method == "copy"
    for item, original in zip(snap.items(), store.items(), strict=True):
        assert item.path.read_bytes() == original.path.read_bytes()
        assert item.path.stat().st_ino != original.path.stat().st_ino
    store.delete(store.items()[0].sha256)
    assert all(i.path.is_file() for i in snap.items())
    assert store.open_snapshot("job-2") == snap
