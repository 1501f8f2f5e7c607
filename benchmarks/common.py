"""Shared benchmark plumbing: test photos, timing, and writing JSON + a markdown table."""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def photo_jpegs(n: int, width: int = 640, height: int = 480, seed: int = 0,
                quality: int = 90) -> list[bytes]:
    """Photo-like JPEGs: smooth colour gradients, shapes and sensor noise (so the encoder and
    decoder do realistic work, unlike flat colour)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(n):
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-0.3, 0.3, (2, 3))
        img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
        for _ in range(6):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                    quality=quality)
        out.append(buf.getvalue())
    return out


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Seconds for `repeat` calls of fn (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - start


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    if not ms:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50_ms": round(q[49], 2), "p95_ms": round(q[94], 2), "p99_ms": round(q[98], 2)}


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_results(name: str, results: dict[str, Any], table: list[dict[str, Any]],
                  notes: Sequence[str] = ()) -> Path:
    """benchmarks/results/<name>.json and <name>.md (the markdown table + notes)."""
    out_dir = Path(os.environ.get("VISIONLOOP_BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "machine": machine(), "time": time.time(), **results,
               "table": table}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    md = [f"### {name}", "", markdown_table(table), ""]
    md += [f"- {n}" for n in notes]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out_dir / f"{name}.md"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
