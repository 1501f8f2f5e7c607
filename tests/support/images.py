"""Real images made on the fly, deterministic by seed: encoded bytes or Pillow images."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

# Label colours of `labelled_set` (RGB).
COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 180, 40),
           "yellow": (220, 220, 40)}


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    """`img` saved as `fmt` (a Pillow format name); `save`: the format's options."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def image_bytes(color: tuple[int, ...] | int = (200, 30, 30), fmt: str = "PNG",
                size: tuple[int, int] = (64, 64), mode: str = "RGB", **save: Any) -> bytes:
    """A flat image of `color` in `mode`, `size` (width, height), encoded as `fmt`."""
    return encode(Image.new(mode, size, color), fmt, **save)


# Images in every mode a client may send (the decoder turns each into RGB): id -> bytes.
IMAGE_MODES = {
    "cmyk-jpeg": image_bytes((10, 200, 30, 5), "JPEG", mode="CMYK"),
    "gray": image_bytes(128, "PNG", mode="L"),
    "rgba": image_bytes((10, 20, 200, 100), "PNG", mode="RGBA"),
    "16bit": image_bytes(40000, "PNG", mode="I;16"),
    "webp": image_bytes((1, 2, 3), "WEBP"),
}


def noisy_image(seed: int, base: tuple[int, int, int], size: int = 64) -> bytes:
    """A PNG of size x size around colour `base` (Gaussian noise, sigma 25): distinct bytes,
    so a distinct sha256, for each seed."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype("uint8")
    return encode(Image.fromarray(arr))


def noisy_picture(colour: tuple[int, int, int], seed: int, size: int = 64) -> Image.Image:
    """A size x size RGB colour field with Gaussian noise (sigma 40) and a random bright
    square: easy to classify by colour, but not trivially."""
    rng = np.random.default_rng(seed)
    a = np.array(colour, dtype=np.float64) + rng.normal(0, 40, (size, size, 3))
    x, y = rng.integers(0, size // 2, 2)
    a[y:y + size // 4, x:x + size // 4] += 60
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def labelled_set(labels: list[str], per_label: int, size: int = 64, fmt: str = "PNG",
                 seed: int = 0) -> list[tuple[str, bytes]]:
    """(label, bytes) pairs, `per_label` per label, label by label: `noisy_picture`s of the
    label's colour in COLOURS, distinct for distinct `seed`s."""
    return [(label, encode(noisy_picture(COLOURS[label], seed * 100_000 + k * 1000 + i, size),
                           fmt))
            for k, label in enumerate(labels) for i in range(per_label)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_declaring(width: int, height: int, rows: int = 0) -> bytes:
    """A PNG whose IHDR declares width x height RGB (a decompression bomb's header). Its IDAT
    holds `rows` rows of zeros of that width, compressed at level 9 (they would inflate to
    rows * (1 + 3 * width) bytes); with rows=0, a token IDAT of 64 zero bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if rows:
        compressor = zlib.compressobj(9)
        row = b"\x00" * (1 + 3 * width)
        idat = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    else:
        idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))
