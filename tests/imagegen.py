"""Real images made on the fly for tests and benchmarks: encoded bytes, deterministic by seed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 180, 40),
           "yellow": (220, 220, 40)}


def noisy_image(colour: tuple[int, int, int], seed: int, size: int = 64) -> Image.Image:
    """A colour field with Gaussian noise and a random bright square: easy but not trivial."""
    rng = np.random.default_rng(seed)
    a = np.array(colour, dtype=np.float64) + rng.normal(0, 40, (size, size, 3))
    x, y = rng.integers(0, size // 2, 2)
    a[y:y + size // 4, x:x + size // 4] += 60
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def labelled_set(labels: list[str], per_label: int, size: int = 64, fmt: str = "PNG",
                 seed: int = 0) -> list[tuple[str, bytes]]:
    """(label, bytes) pairs; label colours from COLOURS."""
    return [(label, encode(noisy_image(COLOURS[label], seed * 100_000 + k * 1000 + i, size), fmt))
            for k, label in enumerate(labels) for i in range(per_label)]
