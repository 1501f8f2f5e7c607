"""Safe decoding: only the allowed formats' Pillow plugins ever parse untrusted bytes; a
well-known refused format is still named (from its first bytes) with the same 415 code."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image, ImageFile

from tests.support.hostile import eps, fits, gif_many_frames, psd, tiff, truncated
from tests.support.images import encode, image_bytes, png_declaring
from training.imageio import (
    ImageError,
    ImageTooLarge,
    NotAnImage,
    decode_image,
    probe_image,
    refused_format,
)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_are_probed_and_decoded(fmt: str) -> None:
    data = image_bytes((10, 120, 200), fmt, size=(40, 30))
    info = probe_image(data)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (40, 30)


REFUSED = {
    "GIF": gif_many_frames(3),
    "TIFF": tiff(),
    "BMP": image_bytes((1, 2, 3), "BMP"),
    "PSD": psd(),
    "EPS": eps(),
    "FITS": fits(),
    "ICO": image_bytes((1, 2, 3), "ICO", size=(32, 32)),
    "PDF": image_bytes((1, 2, 3), "PDF"),
    "PNM": image_bytes((1, 2, 3), "PPM"),
    "JPEG 2000": image_bytes((1, 2, 3), "JPEG2000"),
    "QOI": image_bytes((1, 2, 3), "QOI"),
    "HEIF": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
}


@pytest.mark.parametrize("name", REFUSED)
def test_known_refused_formats_are_415_and_named(name: str) -> None:
    data = REFUSED[name]
    assert refused_format(data) == name
    for check in (probe_image, decode_image):
        with pytest.raises(NotAnImage) as exc:
            check(data)
        assert (exc.value.status, exc.value.code) == (415, "unsupported_media_type")
        assert str(exc.value).startswith(f"image format {name} is not allowed")
        assert "JPEG, PNG, WEBP" in str(exc.value)


@pytest.mark.parametrize("data", [b"hello, this is text", b"\x00" * 1000, b"BM" + b"x" * 40,
                                  b"P7"],
                         ids=["text", "zeros", "bm-text", "short"])
def test_not_an_image_is_415(data: bytes) -> None:
    assert refused_format(data) is None
    with pytest.raises(NotAnImage) as exc:
        probe_image(data)
    assert exc.value.status == 415 and str(exc.value).startswith("not a recognised image")


def test_empty_truncated_and_too_large() -> None:
    for bad in (b"", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10):  # empty; a PNG signature, no IHDR
        with pytest.raises(ImageError) as exc:
            probe_image(bad)
        assert (exc.value.status, exc.value.code) == (400, "invalid_image")
    cut = truncated("PNG")
    assert probe_image(cut).format == "PNG"  # the header is fine...
    with pytest.raises(ImageError) as broken:
        decode_image(cut)  # ...the pixels are not
    assert broken.value.status == 400 and not isinstance(broken.value, NotAnImage)
    with pytest.raises(ImageTooLarge) as big:
        probe_image(png_declaring(20_000, 20_000), max_pixels=1_000_000)
    assert big.value.status == 413


class _SpyImageFile(ImageFile.ImageFile):
    """A real Pillow plugin that records every time Pillow consults it."""

    format = "VLSPY"
    format_description = "records that it was asked"
    calls: list[str] = []

    def _open(self) -> None:
        self.calls.append("open")
        self._size = (8, 8)
        self._mode = "RGB"


def _spy_accept(prefix: bytes) -> bool:
    _SpyImageFile.calls.append("accept")
    return prefix.startswith(b"VLSPY")


@pytest.fixture
def spy_plugin() -> Iterator[list[str]]:
    """A plugin registered with Pillow like any other (after every built-in one), removed
    afterwards; -> the list of its calls."""
    _SpyImageFile.calls = []
    Image.register_open(_SpyImageFile.format, _SpyImageFile, _spy_accept)
    try:
        yield _SpyImageFile.calls
    finally:
        Image.OPEN.pop(_SpyImageFile.format, None)
        if _SpyImageFile.format in Image.ID:
            Image.ID.remove(_SpyImageFile.format)


def test_no_other_plugin_sees_the_bytes(spy_plugin: list[str]) -> None:
    """Pillow's plain `Image.open` asks every registered plugin in turn, so a parser we never
    wanted runs on untrusted headers; ours asks only JPEG, PNG and WebP."""
    data = b"VLSPY" + b"\x00" * 64
    assert Image.open(io.BytesIO(data)).format == "VLSPY"  # the plugin is live...
    assert spy_plugin == ["accept", "open"]
    spy_plugin.clear()
    for unwanted in (data, b"\x00" * 100, REFUSED["GIF"], REFUSED["PSD"]):
        with pytest.raises(NotAnImage):
            decode_image(unwanted)
    assert decode_image(encode(Image.new("RGB", (8, 8)), "PNG")).size == (8, 8)
    assert spy_plugin == []  # ...and never consulted by our decoder
