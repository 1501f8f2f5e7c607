"""Hostile input, made on the fly: a corpus of uploads (bytes only, nothing read from disk)
and a pickle that proves whether a loader executed it.

Every upload builder returns the bytes a client would send as one file. Headers are patched by
hand where Pillow cannot write the hostile variant itself (a 65500 x 65500 JPEG header over an
8 x 8 body, a PSD or FITS file, a WebP canvas of 16383 x 16383), so the files are small but
declare huge images: a decoder that trusted them would allocate gigabytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.support.images import encode, image_bytes, png_declaring


class PickleMarker:
    """Unpickling this runs `os.mkdir(path)`: the proof that a loader executed a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.path),)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose IHDR declares width x height RGB, with a highly compressed IDAT: 64 rows of
    zeros, while the header promises width*height*3 bytes (about 30 GB at the default size)."""
    return png_declaring(width, height, rows=64)


def jpeg_bomb(width: int = 65_500, height: int = 65_500) -> bytes:
    """A real 8 x 8 baseline JPEG whose SOF0 marker is patched to declare width x height."""
    data = bytearray(image_bytes((120, 30, 30), "JPEG", (8, 8)))
    sof = data.index(b"\xff\xc0")
    # FFC0, length (2), precision (1), height (2), width (2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_bomb(width: int = 16_383, height: int = 16_383) -> bytes:
    """A lossless (VP8L) 8 x 8 WebP whose bitstream header is patched to declare the largest
    canvas WebP allows (16383 x 16383 = 268 megapixels)."""
    data = bytearray(image_bytes((30, 120, 30), "WEBP", (8, 8), lossless=True))
    pos = data.index(b"VP8L") + 8  # chunk tag + size, then the 0x2f signature
    assert data[pos] == 0x2F
    bits = int.from_bytes(data[pos + 1:pos + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    data[pos + 1:pos + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def encoded(fmt: str, size: tuple[int, int] = (300, 300), seed: int = 0, **save: Any) -> bytes:
    """Uniform random RGB pixels of `size` (width, height), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)),
                  fmt, **save)


def truncated(fmt: str) -> bytes:
    """A valid header and the first part of the pixel data: the header probe passes, a full
    decode fails."""
    data = encoded(fmt, seed=hash(fmt) % 1000)
    return data[: len(data) // 2]


def eps() -> bytes:
    return image_bytes((1, 2, 3), "EPS", (16, 16))


def psd(width: int = 30_000, height: int = 30_000) -> bytes:
    """A Photoshop header declaring a 30000 x 30000 RGB canvas, no layers, raw image data cut
    short: Pillow identifies it from the header."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">I", 0) * 3  # colour mode data, image resources, layers: empty
    return header + sections + struct.pack(">H", 0) + b"\x00" * 1024


def tiff() -> bytes:
    return image_bytes((9, 9, 9), "TIFF", (32, 32))


def fits(width: int = 20_000, height: int = 20_000) -> bytes:
    """A FITS primary header (80-character cards in a 2880-byte block) declaring a 2-D 8-bit
    image of width x height."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    2", f"NAXIS1  = {width:>20}",
             f"NAXIS2  = {height:>20}", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    return header + b"\x00" * 2880


def gif_many_frames(frames: int = 3000) -> bytes:
    imgs = [Image.new("RGB", (4, 4), (i % 256, i // 256, 7)) for i in range(frames)]
    return encode(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10)


def apng_many_frames(frames: int = 2000) -> bytes:
    """An animated PNG (an allowed format) with thousands of frames: only the first may be
    decoded."""
    imgs = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(frames)]
    return encode(imgs[0], "PNG", save_all=True, append_images=imgs[1:], duration=10)


def animated_webp_many_frames(frames: int = 1000) -> bytes:
    imgs = [Image.new("RGB", (8, 8), (0, i % 256, 0)) for i in range(frames)]
    return encode(imgs[0], "WEBP", save_all=True, append_images=imgs[1:], duration=10,
                  lossless=True)


def refused_corpus() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes sent as `<name>.png`, the status the service must answer)."""
    return {
        "png-bomb": (png_bomb(), 413),
        "jpeg-bomb": (jpeg_bomb(), 413),
        "webp-bomb": (webp_bomb(), 413),
        "png-truncated": (truncated("PNG"), 400),
        "jpeg-truncated": (truncated("JPEG"), 400),
        "webp-truncated": (truncated("WEBP"), 400),
        "eps-as-png": (eps(), 415),
        "psd-as-png": (psd(), 415),
        "tiff-as-png": (tiff(), 415),
        "fits-as-png": (fits(), 415),
        "gif-3000-frames": (gif_many_frames(), 415),
        "empty": (b"", 400),
        "zeros": (b"\x00" * 100_000, 415),
    }
