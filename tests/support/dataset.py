"""The dataset store checked on disk (`<home>/dataset/<folder>/<sha256>.<ext>`, the folder's
`.label` for a display name that is not its own folder name, and `ledger.jsonl`), without going
through `training.dataset`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any


def dataset_images(home: Path) -> dict[str, Path]:
    """Stored images on disk: path relative to dataset/ -> file (the ledger, the lock and the
    temp folder excluded)."""
    root = home / "dataset"
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.name != "ledger.jsonl"}


def ledger_events(home: Path) -> list[dict[str, Any]]:
    """Every ledger line parsed; a cut or garbled line fails the calling test."""
    path = home / "dataset" / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def ledger_state(home: Path) -> dict[str, str]:
    """The ledger replayed image by image (added/relabelled minus deleted): sha256 -> label."""
    state: dict[str, str] = {}
    for e in ledger_events(home):
        if e["event"] in ("added", "relabelled"):
            state[e["sha256"]] = e["label"]
        elif e["event"] == "deleted":
            state.pop(e["sha256"], None)
    return state


def check_dataset_integrity(home: Path) -> dict[str, str]:
    """Every stored file is named by the sha256 of its own bytes, no temp file is left, every
    ledger line parses and the ledger's net state (added/relabelled minus deleted) is exactly
    the set of files. -> sha256 -> label."""
    stored: dict[str, str] = {}
    for rel, path in dataset_images(home).items():
        folder, name = rel.split("/", 1)
        # A display name that is not a plain folder name lives in `<slug>~<hash>/` with the
        # name in its `.label` file (training.dataset.label_folder).
        label = ((home / "dataset" / folder / ".label").read_text(encoding="utf-8")
                 if "~" in folder else folder)
        sha = name.split(".", 1)[0]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"{rel}: bytes differ"
        assert sha not in stored, f"{sha} stored twice ({stored[sha]} and {label})"
        stored[sha] = label
    tmp = home / "dataset" / ".tmp"
    leftovers = list(tmp.iterdir()) if tmp.exists() else []
    assert not leftovers, f"temp files left: {leftovers}"
    assert ledger_state(home) == stored, "ledger and files disagree"
    return stored


def added_counts(home: Path) -> Counter[str]:
    """sha256 -> how many "added" events the ledger holds for it."""
    return Counter(e["sha256"] for e in ledger_events(home) if e["event"] == "added")
