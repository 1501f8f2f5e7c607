"""The dataset store: content addressing, relabelling, refusals, imports, the hash split."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.imagegen import encode, labelled_set, noisy_image
from training.dataset import (
    DatasetStore,
    InvalidLabel,
    iter_cifar10,
    iter_imagefolder,
    split_of,
)
from training.imageio import ImageTooLarge, NotAnImage


def test_ingest_is_idempotent_and_relabels(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    data = encode(noisy_image((200, 0, 0), 1), "JPEG")
    first = store.ingest(data, "cat")
    assert first.status == "added"
    assert (tmp_path / "dataset" / "cat" / f"{first.sha256}.jpg").read_bytes() == data
    assert store.ingest(data, "cat").status == "duplicate"
    moved = store.ingest(data, "dog")
    assert moved.status == "relabelled"
    assert store.counts() == {"dog": 1}
    assert not list((tmp_path / "dataset" / "cat").iterdir())
    assert store.new_since(0) == 1
    assert store.delete(first.sha256)
    assert store.counts() == {}
    assert store.new_since(0) == 0


@pytest.mark.parametrize("label", ["", "../etc", "a/b", ".hidden", "x" * 65, "sp ace", "..",
                                   "naïve", "a\\b"])
def test_unsafe_labels_are_refused_and_nothing_written(tmp_path: Path, label: str) -> None:
    store = DatasetStore(tmp_path)
    with pytest.raises(InvalidLabel, match="invalid label"):
        store.ingest(encode(noisy_image((0, 0, 0), 1)), label)
    assert store.items() == []
    assert not store.ledger_path.exists()


def test_non_images_and_bombs_are_refused(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path, max_pixels=1_000_000)
    with pytest.raises(NotAnImage):
        store.ingest(b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"0" * 100, "cat")
    with pytest.raises(NotAnImage):
        store.ingest(encode(noisy_image((0, 0, 0), 1), "TIFF"), "cat")
    big = encode(noisy_image((0, 0, 0), 1, size=1100), "PNG")
    with pytest.raises(ImageTooLarge):
        store.ingest(big, "cat")
    assert store.items() == []


def test_import_imagefolder_merges_train_and_val_and_skips_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 2)):
        for label, data in labelled_set(["red", "blue"], n, seed=hash(split) % 100):
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

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        list(iter_cifar10(folder, subset=1))
    assert not marker.exists()


def test_split_is_stable_when_images_are_added(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 20):
        store.ingest(data, label)
    train, val = store.split()
    before = {i.sha256: "train" for i in train} | {i.sha256: "val" for i in val}
    assert 0 < len(val) < len(train)
    for label, data in labelled_set(["red", "blue", "green"], 20, seed=7):
        store.ingest(data, label)
    train2, val2 = store.split()
    after = {i.sha256: "train" for i in train2} | {i.sha256: "val" for i in val2}
    assert len(after) == 100
    assert all(after[sha] == split for sha, split in before.items())
    assert all(split_of(sha) == split for sha, split in after.items())
