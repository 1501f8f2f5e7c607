"""Recent predictions on the volume, kept for feedback and review.

    predictions/<prediction_id>.<ext>    the image bytes as uploaded (already checked by decoding)
    predictions/<prediction_id>.json     {prediction_id, created_at, model_version, label, score,
                                          top_k}

Prediction ids are 32 random hex digits, so they cannot be guessed or reach outside the folder.
The store is bounded by count (`keep`) and age (`max_age_s`); `prune` removes the rest and
logs how many.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import DomainError
from training.imageio import probe_image

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class PredictionNotFound(DomainError, LookupError):
    code = "prediction_not_found"
    status = 404


def _write_replace(path: Path, data: bytes) -> None:
    """Atomic (temp + rename) but not fsynced: a prediction lost in a crash costs nothing, and
    predict should not wait for the disk."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def new_prediction_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class StoredPrediction:
    record: dict[str, Any]
    image_path: Path

    def image_bytes(self) -> bytes:
        return self.image_path.read_bytes()


class PredictionStore:
    def __init__(self, home: Path | str, keep: int = 1000, max_age_s: float = 7 * 24 * 3600):
        self.root = Path(home) / "predictions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.max_age_s = max_age_s

    def save(self, prediction_id: str, data: bytes, record: dict[str, Any]) -> None:
        """Store one prediction (image first, then its record: a record always has its image).
        No-op when `keep` is 0."""
        if self.keep <= 0:
            return
        ext = probe_image(data, max_pixels=2**62).extension
        _write_replace(self.root / f"{prediction_id}.{ext}", data)
        record = {"prediction_id": prediction_id, "created_at": time.time(), **record}
        _write_replace(self.root / f"{prediction_id}.json", json.dumps(record).encode())

    def get(self, prediction_id: str) -> StoredPrediction:
        if not ID_PATTERN.fullmatch(prediction_id or ""):
            raise PredictionNotFound(f"unknown prediction id {prediction_id!r}")
        try:
            record = json.loads((self.root / f"{prediction_id}.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise PredictionNotFound(f"unknown prediction id {prediction_id!r} (predictions "
                                     f"are kept for a limited time)") from None
        images = [p for p in self.root.glob(f"{prediction_id}.*") if p.suffix != ".json"]
        if not images:
            raise PredictionNotFound(f"the image of prediction {prediction_id!r} is gone")
        return StoredPrediction(record, images[0])

    def records(self) -> list[dict[str, Any]]:
        """Every readable record within the age limit, newest first."""
        cutoff = time.time() - self.max_age_s
        out = []
        for p in self.root.glob("*.json"):
            try:
                r = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if r.get("created_at", 0) >= cutoff:
                out.append(r)
        return sorted(out, key=lambda r: r["created_at"], reverse=True)

    def review(self, below: float, limit: int) -> list[dict[str, Any]]:
        """Recent predictions scored below `below`, least confident first."""
        low = [r for r in self.records() if r.get("score", 1.0) < below]
        return sorted(low, key=lambda r: r["score"])[:limit]

    def prune(self, now: float | None = None) -> int:
        """Remove predictions beyond the newest `keep` or older than `max_age_s`. -> count."""
        now = time.time() if now is None else now
        by_id: dict[str, list[Path]] = {}
        for p in self.root.iterdir():
            if ID_PATTERN.fullmatch(p.stem):
                by_id.setdefault(p.stem, []).append(p)
        def mtime(paths: list[Path]) -> float:
            try:
                return max(p.stat().st_mtime for p in paths)
            except OSError:
                return 0.0
        ordered = sorted(by_id.items(), key=lambda kv: mtime(kv[1]), reverse=True)
        removed = 0
        for i, (_, paths) in enumerate(ordered):
            if i >= self.keep or now - mtime(paths) > self.max_age_s:
                for p in paths:
                    p.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("retention: removed %d prediction image(s) (keeping %d, at most %d s old)",
                     removed, self.keep, self.max_age_s)
        return removed
