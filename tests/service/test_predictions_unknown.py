"""The prediction store's `unknown` answers: kept with the model's label and the flag, first in
the review queue whatever their score, and a version-1 index (before the flag) upgraded in
place at open with its rows kept as known answers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from service.predictions import SCHEMA_VERSION, PredictionStore, new_prediction_id
from tests.support.images import noisy_image


def record(score: float, unknown: bool, label: str = "cat") -> dict[str, object]:
    return {"model_version": "v1", "label": label, "score": score, "unknown": unknown,
            "top_k": [{"label": label, "score": score}, {"label": "dog", "score": 1 - score}],
            "filename": None}


def test_unknown_first_in_queue(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path)
    low, confident_unknown, known = new_prediction_id(), new_prediction_id(), new_prediction_id()
    assert store.save(low, noisy_image(1, (1, 2, 3)), record(0.55, False)) == "stored"
    # answered unknown by a request's strict min_score, although its score is high
    assert store.save(confident_unknown, noisy_image(2, (1, 2, 3)), record(0.9, True)) == \
        "stored"
    assert store.save(known, noisy_image(3, (1, 2, 3)), record(0.95, False)) == "stored"
    queue = store.review(below=0.6, limit=10)
    assert [r["prediction_id"] for r in queue] == [confident_unknown, low]
    assert queue[0]["unknown"] is True and queue[0]["label"] == "cat"
    assert queue[1]["unknown"] is False
    for order in ("margin", "entropy", "score"):
        assert store.review(below=1.0, limit=10, order=order)[0]["prediction_id"] == \
            confident_unknown
    assert [r["prediction_id"] for r in store.review(below=0.0, limit=10)] == \
        [confident_unknown]


def test_version_1_index_gains_the_flag(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    root.mkdir()
    db = sqlite3.connect(root / "index.sqlite3")
    db.execute("""CREATE TABLE predictions (
        prediction_id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_version TEXT NOT NULL,
        label TEXT NOT NULL, score REAL NOT NULL, margin REAL NOT NULL, entropy REAL NOT NULL,
        top_k TEXT NOT NULL, filename TEXT, sha256 TEXT, state TEXT NOT NULL, reason TEXT,
        reviewed_at REAL, size INTEGER NOT NULL)""")
    old = new_prediction_id()
    db.execute("INSERT INTO predictions VALUES (?, strftime('%s','now'), 'v1', 'cat', 0.3, "
               "0.1, 0.6, '[]', NULL, NULL, 'pending', NULL, NULL, 300)", (old,))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = PredictionStore(tmp_path)
    with sqlite3.connect(root / "index.sqlite3") as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    new = new_prediction_id()
    assert store.save(new, noisy_image(4, (5, 5, 5)), record(0.8, True)) == "stored"
    queue = store.review(below=0.5, limit=10)
    assert [(r["prediction_id"], r["unknown"]) for r in queue] == [(new, True), (old, False)]
    PredictionStore(tmp_path)  # opening again changes nothing
    assert len(store.review(below=0.5, limit=10)) == 2
