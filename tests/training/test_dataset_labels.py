"""Label display names, browsing, renaming and merging in the dataset store: the label rules,
the label <-> folder mapping (old plain volumes unchanged), pages and thumbnails, and renames
and merges that a crash (a real SIGKILL of the process doing one) leaves all or nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from tests.support.dataset import (
    check_dataset_integrity,
    dataset_images,
    ledger_events,
    ledger_state,
)
from tests.support.images import COLOURS, encode, labelled_set, noisy_image, noisy_picture
from training.dataset import (
    LABEL_FILE,
    PLAIN_LABEL_PATTERN,
    RELABEL_PLAN,
    SLUG_FOLDER_PATTERN,
    DatasetStore,
    InvalidLabel,
    InvalidLabelChange,
    LabelExists,
    LabelNotFound,
    check_label,
    folder_label,
    label_folder,
    sha256_of,
)

REPO = Path(__file__).resolve().parents[2]


def _add(store: DatasetStore, label: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct images under `label` -> their sha256s."""
    return [store.ingest(noisy_image(seed * 1000 + i, (90, 90, 90)), label).sha256
            for i in range(n)]




@pytest.mark.parametrize("label", ["Golden Retriever", "Egyptian cat", "jack-o'-lantern",
                                   "Rock & Roll (live)", "C++", "1,000", "naïve", "猫",
                                   "Ελληνικά", "हिन्दी", "x" * 64, "a.b_c-d", "(unknown)"])
def test_display_names_are_labels(label: str) -> None:
    assert check_label(label) == label
    folder = label_folder(label)
    assert PLAIN_LABEL_PATTERN.fullmatch(folder) or SLUG_FOLDER_PATTERN.fullmatch(folder)
    assert folder.isascii() and "/" not in folder and not folder.startswith(".")


def test_names_are_nfc_and_case_sensitive() -> None:
    nfd = unicodedata.normalize("NFD", "Café")
    assert nfd != "Café" and check_label(nfd) == "Café"
    assert label_folder(nfd) == label_folder("Café")
    assert label_folder("Golden Retriever") != label_folder("golden retriever")
    assert label_folder("Cat") == "Cat" and label_folder("cat") == "cat"
    assert label_folder("Golden Retriever").startswith("golden-retriever~")
    assert label_folder("猫").startswith("label~")
    with pytest.raises(InvalidLabel, match=r"two spaces in a row.*Label rules"):
        check_label("a  b")
    with pytest.raises(InvalidLabel, match=r"'/' \(U\+002F\)"):
        label_folder("a/b")
    with pytest.raises(InvalidLabel, match="a label is text"):
        check_label(3)


def test_every_v0_class_name_is_a_label_with_its_own_folder() -> None:
    from training.model import imagenet_categories

    names = imagenet_categories()
    assert [check_label(n) for n in names] == names
    assert len({label_folder(n) for n in names}) == len(names) == 1000


def test_display_names_round_trip_through_the_store_and_a_job(tmp_path: Path) -> None:
    from training.pipeline import prepare_data

    store = DatasetStore(tmp_path)
    names = ["Golden Retriever", "jack-o'-lantern", "tabby"]
    for k, name in enumerate(names):
        for _, data in labelled_set([list(COLOURS)[k]], 8, seed=k):
            assert store.ingest(data, name).label == name
    folder = tmp_path / "dataset" / label_folder("Golden Retriever")
    assert (folder / LABEL_FILE).read_text(encoding="utf-8") == "Golden Retriever"
    assert folder_label(folder) == "Golden Retriever"
    assert (tmp_path / "dataset" / "tabby").is_dir()  # plain: its own folder, no name record
    assert not (tmp_path / "dataset" / "tabby" / LABEL_FILE).exists()

    reopened = DatasetStore(tmp_path)
    assert reopened.counts() == {name: 8 for name in names}
    assert reopened.labels() == sorted(names)
    item = reopened.items()[0]
    assert reopened.find(item.sha256) == item and item.label == "Golden Retriever"
    assert {e["label"] for e in ledger_events(tmp_path)} == set(names)
    assert reopened.ingest(item.path.read_bytes(), "Golden Retriever").status == "duplicate"

    snap = reopened.snapshot("job-1")
    assert {i.label for i in snap.items()} == set(names)
    assert reopened.open_snapshot("job-1") == snap
    assert prepare_data(snap).classes == sorted(names)
    assert prepare_data(reopened).classes == sorted(names)


def test_a_plain_volume_keeps_working_and_foreign_folders_are_ignored(tmp_path: Path) -> None:
    """A volume written before display names: `dataset/<label>/<sha>.<ext>`, no name records."""
    data = noisy_image(1, (10, 200, 10))
    old = tmp_path / "dataset" / "Old_Label.v1"
    old.mkdir(parents=True)
    (old / f"{sha256_of(data)}.png").write_bytes(data)
    (tmp_path / "dataset" / "ledger.jsonl").write_text(json.dumps(
        {"time": 0, "event": "added", "sha256": sha256_of(data), "label": "Old_Label.v1",
         "old_label": None, "source": "import"}) + "\n")
    hand = tmp_path / "dataset" / "Golden Retriever"  # made by hand: not a label's folder
    hand.mkdir()
    (hand / f"{sha256_of(noisy_image(2, (1, 1, 1)))}.png").write_bytes(noisy_image(2, (1, 1, 1)))
    forged = tmp_path / "dataset" / "golden-retriever~00000000"  # a name record that lies
    forged.mkdir()
    (forged / LABEL_FILE).write_text("Golden Retriever")
    (forged / f"{'0' * 64}.png").write_bytes(noisy_image(3, (1, 1, 1)))

    store = DatasetStore(tmp_path)
    assert store.counts() == {"Old_Label.v1": 1}
    assert store.ingest(noisy_image(4, (1, 2, 3)), "Old_Label.v1").status == "added"
    assert len(list(old.iterdir())) == 2
    assert store.ingest(data, "Golden Retriever").status == "relabelled"
    assert store.counts() == {"Golden Retriever": 1, "Old_Label.v1": 1}
    assert store.find(sha256_of(data)).path.parent.name == label_folder("Golden Retriever")  # type: ignore[union-attr]
    assert store.new_since(0) == 2


def test_a_folder_that_lost_its_name_record_is_claimed_by_its_label(tmp_path: Path) -> None:
    """A crash between removing an emptied folder's `.label` and the folder itself."""
    store = DatasetStore(tmp_path)
    folder = tmp_path / "dataset" / label_folder("Golden Retriever")
    folder.mkdir(parents=True)
    assert store.counts() == {}
    _add(store, "Golden Retriever", 2)
    assert folder_label(folder) == "Golden Retriever"
    assert store.counts() == {"Golden Retriever": 2}


def test_names_whose_folders_coincide_are_told_apart(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two names with the same slug and 8-hex-digit hash: a 1 in 2**32 chance per pair, which
    no test can find for real, so the mapping is made to give both the same folder."""
    import training.dataset as dataset

    real = dataset.label_folder

    def coinciding(label: str) -> str:
        return real("Golden Retriever" if label == "Golden Retriever 2" else label)

    monkeypatch.setattr(dataset, "label_folder", coinciding)
    store = DatasetStore(tmp_path)
    _add(store, "Golden Retriever", 1)
    with pytest.raises(InvalidLabel, match=r"holds label 'Golden Retriever'.*choose another"):
        store.ingest(noisy_image(9, (9, 9, 9)), "Golden Retriever 2")
    assert store.counts() == {"Golden Retriever": 1}


def test_delete_removes_the_emptied_folder_with_its_name_record(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    [sha] = _add(store, "Golden Retriever", 1)
    folder = tmp_path / "dataset" / label_folder("Golden Retriever")
    assert store.delete(sha) and not folder.exists()
    assert store.counts() == {} and store.labels() == []
    assert [e["event"] for e in ledger_events(tmp_path)] == ["added", "deleted"]


def test_rename_moves_every_image_and_is_recorded(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    red = _add(store, "red", 3)
    blue = _add(store, "blue", 2, seed=1)
    snap = store.snapshot("job-1")  # a job running meanwhile keeps the old names
    offset = store.ledger_length()

    change = store.rename_label("red", "crimson")
    assert (change.op, change.old_label, change.label, change.moved, change.total) == \
        ("rename", "red", "crimson", 3, 3)
    assert store.counts() == {"blue": 2, "crimson": 3}
    assert not (tmp_path / "dataset" / "red").exists()
    assert check_dataset_integrity(tmp_path) == {**{s: "crimson" for s in red},
                                                 **{s: "blue" for s in blue}}
    events = ledger_events(tmp_path)[offset:]
    assert events[0] | {"time": 0} == {"time": 0, "event": "label_renamed", "sha256": None,
                                       "label": "crimson", "old_label": "red",
                                       "source": "api", "images": 3}
    assert sorted(e["sha256"] for e in events[1:]) == sorted(red)
    assert all(e["event"] == "relabelled" and e["by"] == "label_renamed" for e in events[1:])
    assert store.new_since(offset) == 3  # the next job trains under the new name
    assert {i.label for i in store.open_snapshot("job-1").items()} == {"red", "blue"}  # type: ignore[union-attr]
    assert all(i.path.is_file() for i in snap.items())

    # To a display name and back: the folder and its name record follow.
    store.rename_label("crimson", "Deep Red")
    folder = tmp_path / "dataset" / label_folder("Deep Red")
    assert (folder / LABEL_FILE).read_text(encoding="utf-8") == "Deep Red"
    assert store.rename_label("Deep Red", "Dark Red (old)").total == 3
    assert not folder.exists()
    store.rename_label("Dark Red (old)", "red")
    assert store.counts() == {"blue": 2, "red": 3}
    assert ledger_state(tmp_path) == {i.sha256: i.label for i in store.items()}
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == \
        [".lock", ".snapshots", ".tmp", "blue", "ledger.jsonl", "red"]


def test_rename_refusals_change_nothing(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    _add(store, "red", 2)
    _add(store, "Blue Sky", 1, seed=1)
    before, ledger = dataset_images(tmp_path), store.ledger_path.read_bytes()
    with pytest.raises(LabelExists, match=r"'Blue Sky' already exists \(1 images\).*merge"):
        store.rename_label("red", "Blue Sky")
    with pytest.raises(LabelNotFound, match="no label 'green'"):
        store.rename_label("green", "lime")
    with pytest.raises(LabelNotFound):
        store.rename_label("../red", "lime")
    with pytest.raises(InvalidLabel, match="Label rules"):
        store.rename_label("red", "a/b")
    with pytest.raises(InvalidLabelChange, match="into itself"):
        store.rename_label("red", "red")
    assert dataset_images(tmp_path) == before and store.ledger_path.read_bytes() == ledger
    assert not (tmp_path / "dataset" / RELABEL_PLAN).exists()


def test_rename_onto_an_empty_folder_of_an_old_volume(tmp_path: Path) -> None:
    """Volumes written before folders were removed with their last image keep empty ones."""
    store = DatasetStore(tmp_path)
    _add(store, "red", 2)
    (tmp_path / "dataset" / "crimson").mkdir()
    assert store.rename_label("red", "crimson").total == 2
    with pytest.raises(LabelNotFound):
        store.merge_label("crimson", "red")


def test_merge_moves_every_image_and_keeps_one_of_each(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    cats = _add(store, "Egyptian cat", 3)
    tabby = _add(store, "tabby", 2, seed=1)
    # The same image under both labels (a file copied by hand): it must end up once.
    both = store.find(cats[0])
    assert both is not None
    os.link(both.path, tmp_path / "dataset" / "tabby" / both.path.name)
    offset = store.ledger_length()

    change = store.merge_label("Egyptian cat", "tabby")
    assert (change.op, change.old_label, change.label, change.moved, change.total) == \
        ("merge", "Egyptian cat", "tabby", 3, 5)
    assert store.counts() == {"tabby": 5}
    assert sorted(dataset_images(tmp_path)) == sorted(
        f"tabby/{store.find(s).path.name}" for s in cats + tabby)  # type: ignore[union-attr]
    assert not (tmp_path / "dataset" / label_folder("Egyptian cat")).exists()
    events = ledger_events(tmp_path)[offset:]
    assert events[0]["event"] == "label_merged" and events[0]["images"] == 3
    assert check_dataset_integrity(tmp_path) == {s: "tabby" for s in cats + tabby}

    with pytest.raises(LabelNotFound, match=r"no label 'lion' to merge 'tabby' into.*rename"):
        store.merge_label("tabby", "lion")
    with pytest.raises(LabelNotFound, match="no label 'Egyptian cat'"):
        store.merge_label("Egyptian cat", "tabby")
    with pytest.raises(InvalidLabelChange):
        store.merge_label("tabby", "tabby")
    with pytest.raises(InvalidLabel):
        store.merge_label("tabby", "..")
    assert store.counts() == {"tabby": 5}


def test_page_lists_newest_first_in_bounded_pages(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    shas = _add(store, "Golden Retriever", 5)
    _add(store, "other", 1, seed=1)
    for k, sha in enumerate(shas):  # added one second apart, in this order
        os.utime(store.find(sha).path, (1_000_000 + k, 1_000_000 + k))  # type: ignore[union-attr]
    page = store.page("Golden Retriever", 0, 2)
    assert (page.label, page.total, page.offset, page.limit) == ("Golden Retriever", 5, 0, 2)
    assert [i.sha256 for i in page.images] == shas[::-1][:2]
    assert page.images[0].added_at == 1_000_004
    assert page.images[0].bytes == len(store.find(shas[-1]).path.read_bytes())  # type: ignore[union-attr]
    assert [i.sha256 for i in store.page("Golden Retriever", 2, 2).images] == shas[::-1][2:4]
    assert [i.sha256 for i in store.page("Golden Retriever", 4, 50).images] == [shas[0]]
    assert store.page("Golden Retriever", 99, 10).images == []
    assert store.page(unicodedata.normalize("NFD", "Golden Retriever")).total == 5
    for label in ("golden retriever", "Nope", "../other", ""):
        with pytest.raises(LabelNotFound):
            store.page(label)
    with pytest.raises(ValueError, match="offset=-1"):
        store.page("other", -1, 10)
    with pytest.raises(ValueError, match="limit=0"):
        store.page("other", 0, 0)


def test_thumbnails_are_small_cached_and_go_with_their_image(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    data = encode(noisy_picture((200, 30, 30), 1, size=600).resize((900, 450)), "JPEG")
    sha = store.ingest(data, "Golden Retriever").sha256
    thumb = store.thumbnail(sha)
    assert thumb is not None
    cached = tmp_path / "cache" / "thumbnails" / "256" / f"{sha}.jpg"
    assert cached.read_bytes() == thumb
    with Image.open(cached) as img:
        assert (img.format, img.size) == ("JPEG", (256, 128))
    cached.write_bytes(b"kept")  # served from the cache from now on
    assert store.thumbnail(sha) == b"kept"
    assert store.read_image(sha) == (store.find(sha), data)
    assert store.delete(sha) and not cached.exists()
    assert store.thumbnail(sha) is None and store.read_image(sha) is None
    assert store.thumbnail("../../etc/passwd") is None


# -- crash safety: a real SIGKILL of the process doing the rename or merge --------------------

_CRASH = textwrap.dedent("""
    import os, signal, sys
    import training.dataset as dataset
    from training.dataset import DatasetStore

    home, op, label, target, where = sys.argv[1:6]
    store = DatasetStore(home)
    if where == "moves":  # killed after the commit, two images moved
        real, done = os.rename, []
        def rename(src, dst):
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
            done.append(src)
        dataset.os.rename = rename
    else:  # killed before the commit ("plan") or half-way through the ledger lines ("ledger")
        def append(self, lines):
            if where == "ledger":
                with open(self.ledger_path, "a", encoding="utf-8") as f:
                    f.write(lines[: len(lines) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        DatasetStore._append_lines = append
    getattr(store, op + "_label")(label, target)
""")


def _crash(home: Path, op: str, label: str, target: str, where: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(home), op, label, target, where],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("op, target", [("rename", "Golden Retriever"), ("merge", "blue")])
def test_a_crash_after_the_commit_is_finished_before_anyone_reads(tmp_path: Path, op: str,
                                                                  target: str) -> None:
    store = DatasetStore(tmp_path)
    red = _add(store, "red", 5)
    blue = _add(store, "blue", 2, seed=1)
    _crash(tmp_path, op, "red", target, "moves")
    on_disk = {rel.split("/")[0] for rel in dataset_images(tmp_path)}
    assert "red" in on_disk and label_folder(target) in on_disk  # half-moved on disk
    assert (tmp_path / "dataset" / RELABEL_PLAN).exists()

    store = DatasetStore(tmp_path)  # a reader settles it first
    expected = {target: 7} if op == "merge" else {"blue": 2, target: 5}
    assert store.counts() == expected
    assert not (tmp_path / "dataset" / RELABEL_PLAN).exists()
    assert not (tmp_path / "dataset" / "red").exists()
    assert ledger_state(tmp_path) == {**{s: "blue" for s in blue}, **{s: target for s in red}}
    assert [e["event"] for e in ledger_events(tmp_path)].count(f"label_{op}d") == 1
    assert {i.label for i in store.snapshot("job").items()} == set(expected)


@pytest.mark.parametrize("where", ["plan", "ledger"])
def test_a_crash_before_the_commit_is_undone(tmp_path: Path, where: str) -> None:
    store = DatasetStore(tmp_path)
    red = _add(store, "red", 3)
    ledger = store.ledger_path.read_bytes()
    files = dataset_images(tmp_path)
    _crash(tmp_path, "rename", "red", "Golden Retriever", where)
    assert (tmp_path / "dataset" / RELABEL_PLAN).exists()
    assert (store.ledger_path.read_bytes() == ledger) == (where == "plan")

    snap = DatasetStore(tmp_path).snapshot("job")  # a job's snapshot settles it first
    assert {(i.sha256, i.label) for i in snap.items()} == {(s, "red") for s in red}
    assert store.ledger_path.read_bytes() == ledger  # no cut line left
    assert dataset_images(tmp_path) == files
    assert not (tmp_path / "dataset" / label_folder("Golden Retriever")).exists()
    assert not (tmp_path / "dataset" / RELABEL_PLAN).exists()
    assert store.rename_label("red", "Golden Retriever").moved == 3  # and it can be redone


def test_a_label_named_like_the_ledger_gets_a_folder_of_its_own(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    _add(store, "red", 1)
    [sha] = _add(store, "ledger.jsonl", 1, seed=1)
    assert label_folder("ledger.jsonl").startswith("ledger-jsonl~")
    assert store.counts() == {"ledger.jsonl": 1, "red": 1}
    assert [e["label"] for e in ledger_events(tmp_path)] == ["red", "ledger.jsonl"]
    assert store.rename_label("ledger.jsonl", "ledger").moved == 1
    assert store.find(sha).path.parent.name == "ledger"  # type: ignore[union-attr]
