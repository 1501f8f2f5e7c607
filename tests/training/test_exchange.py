"""Dataset export and import on real stores: the same hashes, labels (display names included)
and splits after a round trip; ImageFolder tars; CSV imports from disk; refusals."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.support.dataset import check_dataset_integrity
from tests.support.images import image_bytes, labelled_set, noisy_image
from training.dataset import DatasetStore, split_of
from training.exchange import (
    EXPORT_ROOT,
    InvalidImport,
    export_dataset,
    import_archive,
    import_csv,
    summarize,
)

LABELS = {"red": "red", "blue": "Golden Retriever", "green": "café crème"}


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    s = DatasetStore(tmp_path / "home")
    for colour, data in labelled_set(list(LABELS), 7, size=32, seed=5):
        s.ingest(data, LABELS[colour], "upload")
    s.ingest(noisy_image(1, (9, 9, 9)), "red", "feedback")
    return s


def _state(store: DatasetStore) -> dict[str, tuple[str, str]]:
    return {i.sha256: (i.label, split_of(i.sha256)) for i in store.items()}


def test_export_import_round_trip(store: DatasetStore, tmp_path: Path) -> None:
    out = tmp_path / "d.tar"
    assert export_dataset(store, out) == 22
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        rows = list(csv.DictReader(io.StringIO(
            tar.extractfile(f"{EXPORT_ROOT}/manifest.csv").read().decode())))  # type: ignore
        jsonl = [json.loads(line) for line in tar.extractfile(  # type: ignore[union-attr]
            f"{EXPORT_ROOT}/manifest.jsonl").read().decode().splitlines()]
    assert rows == [{k: str(v) for k, v in e.items()} for e in jsonl]
    for e in jsonl:
        assert f"{EXPORT_ROOT}/{e['path']}" in names
        assert e["path"].startswith(f"{e['split']}/{e['label']}/")
    assert {e["source"] for e in jsonl} == {"upload", "feedback"}
    assert not list(tmp_path.glob(".d.tar.*"))  # no temp file left

    other = DatasetStore(tmp_path / "other")
    results = import_archive(other, out)
    assert summarize(results) == {"added": 22, "duplicate": 0, "relabelled": 0, "failed": 0}
    assert _state(other) == _state(store)
    assert {(e["sha256"], e["label"], e["split"]) for e in jsonl} == \
        {(s, lb, sp) for s, (lb, sp) in _state(other).items()}
    check_dataset_integrity(other.home)
    again = import_archive(other, out)
    assert summarize(again)["duplicate"] == 22


def test_imagefolder_tar_without_manifest(tmp_path: Path) -> None:
    buf = io.BytesIO()
    members = {"photos/train/cat/1.png": noisy_image(1, (1, 1, 1)),
               "photos/val/dog/2.png": noisy_image(2, (2, 2, 2)),
               "loose.png": noisy_image(3, (3, 3, 3)),
               "photos/dog/.hidden.png": noisy_image(4, (4, 4, 4)),
               "photos/dog/readme.txt": b"hello"}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("photos/dog/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    store = DatasetStore(tmp_path / "home")
    results = {r.name: r for r in import_archive(store, buf)}
    assert results["photos/train/cat/1.png"].status == "added"
    assert results["photos/val/dog/2.png"].label == "dog"
    assert results["loose.png"].error["code"] == "not_in_label_folder"  # type: ignore[index]
    assert results["photos/dog/readme.txt"].error["code"] == "unsupported_media_type"  # type: ignore[index]
    assert set(results) == {"photos/train/cat/1.png", "photos/val/dog/2.png", "loose.png",
                            "photos/dog/readme.txt"}  # hidden files and links not read
    assert store.counts() == {"cat": 1, "dog": 1}


def test_archive_refusals(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "home")
    with pytest.raises(InvalidImport, match="not a readable tar"):
        import_archive(store, io.BytesIO(b"plain text, not a tar"))
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w"):
        pass
    empty.seek(0)
    with pytest.raises(InvalidImport, match="holds no images"):
        import_archive(store, empty)
    bad_manifest = io.BytesIO()
    with tarfile.open(fileobj=bad_manifest, mode="w") as tar:
        info = tarfile.TarInfo("manifest.jsonl")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"nope\n"))
    bad_manifest.seek(0)
    with pytest.raises(InvalidImport, match="not a manifest"):
        import_archive(store, bad_manifest)
    assert store.items() == []


def test_csv_import_from_disk(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(noisy_image(11, (200, 0, 0)))
    (images / "sub" / "b.jpg").write_bytes(image_bytes((0, 0, 200), "JPEG"))
    (images / "c.gif").write_bytes(image_bytes(fmt="GIF"))
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n"
                     f"{images.name}/a.png,Red Things\n"
                     f"{images / 'sub' / 'b.jpg'},blue\n"
                     f"{images.name}/missing.png,blue\n"
                     f"{images.name}/c.gif,blue\n"
                     f"{images.name}/a.png,../etc\n", encoding="utf-8")
    store = DatasetStore(tmp_path / "home")
    results = import_csv(store, table)
    codes = [r.status or r.error["code"] for r in results]  # type: ignore[index]
    assert codes == ["added", "added", "unreadable_file", "unsupported_media_type",
                     "invalid_label"]
    assert store.counts() == {"Red Things": 1, "blue": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("only-one-column\n")
    with pytest.raises(InvalidImport, match="line 1 has 1 columns"):
        import_csv(store, bad)
    with pytest.raises(InvalidImport, match="cannot read"):
        import_csv(store, tmp_path / "absent.csv")
