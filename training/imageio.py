"""Safe image decoding, shared by the dataset store (ingest, import) and the service (predict).

Untrusted bytes go through `decode_image`, which:
- refuses anything but the allowed formats (JPEG, PNG, WebP), judged by the decoder that
  actually recognises the bytes, never by a filename or a client's content type. Only the
  allowed formats' Pillow plugins ever see the bytes (`Image.open(..., formats=ALLOWED)`): the
  other plugins' header parsers (PSD, EPS, FITS, TIFF, ...) are attack surface we do not need.
  A refused file is named by its first bytes alone (`refused_format`), so a GIF is still told
  "GIF is not allowed" while no GIF parser runs;
- reads only the header first and refuses images over `max_pixels` before any pixel is decoded
  (a decompression bomb costs a header parse, not gigabytes);
- keeps the first frame of animated files, applies the EXIF orientation, and converts every mode
  (CMYK, grayscale, palette, RGBA, 16-bit) to 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

# The allowed formats' plugins, registered explicitly: opening with `formats=` then never
# makes Pillow import all of its plugins to find one it has not loaded yet.
import PIL.JpegImagePlugin
import PIL.PngImagePlugin
import PIL.WebPImagePlugin  # noqa: F401
from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import DomainError

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP"})
# The plugins Image.open may try, in the order it tries them.
_OPEN_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_MAX_PIXELS = 50_000_000

# Pillow's own bomb guard raises only above 2x its limit; ours is explicit, so silence its warning
# and let our check (which runs before decoding) decide.
Image.MAX_IMAGE_PIXELS = None


class ImageError(DomainError, ValueError):
    """A refused upload. `code` is the API error code, `status` the HTTP status it maps to."""

    code = "invalid_image"
    status = 400


class NotAnImage(ImageError):
    code = "unsupported_media_type"
    status = 415


class ImageTooLarge(ImageError):
    code = "image_too_large"
    status = 413


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format (as Pillow names it), width and height in pixels."""

    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


# Well-known image (and image-like) formats we refuse, recognised by their first bytes only
# (offset, signature, name): the refusal can then say which format it was without any parser
# of that format running. Anything not listed is "not a recognised image"; both are 415.
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"II+\x00", "TIFF"),
    (0, b"MM\x00+", "TIFF"),
    (0, b"8BPS", "PSD"),
    (0, b"%!PS", "EPS"), (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF-", "PDF"),
    (0, b"SIMPLE  =", "FITS"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (0, b"\xffO\xffQ", "JPEG 2000"),
    (0, b"qoif", "QOI"), (0, b"DDS ", "DDS"), (0, b"icns", "ICNS"),
    (0, b"v/1\x01", "OpenEXR"), (0, b"#?RADIANCE", "HDR"), (0, b"#?RGBE", "HDR"),
    (4, b"ftypheic", "HEIF"), (4, b"ftypheix", "HEIF"), (4, b"ftyphevc", "HEIF"),
    (4, b"ftypheim", "HEIF"), (4, b"ftypheis", "HEIF"), (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"), (4, b"ftypavif", "AVIF"), (4, b"ftypavis", "AVIF"),
)
# BMP's "BM" is too short to trust alone: the DIB header that follows has one of these sizes.
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def refused_format(data: bytes) -> str | None:
    """The name of a well-known image format that `data` starts like (GIF, TIFF, BMP, PSD,
    HEIF, ...), judged from its first bytes only; None when it looks like none of them."""
    for offset, signature, name in _REFUSED_SIGNATURES:
        if data.startswith(signature, offset):
            return name
    if (data.startswith(b"BM") and len(data) >= 18
            and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES):
        return "BMP"
    if (data.startswith(b"\x00\x00\x01\x00") or data.startswith(b"\x00\x00\x02\x00")) \
            and len(data) >= 6 and data[4:6] != b"\x00\x00":
        return "ICO"
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"1234567" \
            and data[2:3] in b" \t\r\n":
        return "PNM"
    return None


def _allowed_list() -> str:
    return ", ".join(sorted(ALLOWED_FORMATS))


def open_untrusted(data: bytes, formats: tuple[str, ...] = _OPEN_FORMATS) -> Image.Image:
    """`Image.open` of untrusted bytes with only the plugins of `formats` (a subset of the
    allowed formats) tried. Reads the header only. Raises NotAnImage (415) when none of them
    recognises the bytes, naming the format when it is a well-known refused one; ImageError
    (400) when a header of an allowed format is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        known = refused_format(data)
        if known:
            raise NotAnImage(f"image format {known} is not allowed; allowed formats: "
                             f"{_allowed_list()}") from None
        raise NotAnImage(f"not a recognised image; allowed formats: {_allowed_list()}") from None
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise ImageError(f"unreadable image header: {exc}") from None


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check format and size from the header alone; raise an `ImageError` subclass if refused."""
    return _probe(data, max_pixels)[0]


def _probe(data: bytes, max_pixels: int) -> tuple[ImageInfo, Image.Image]:
    """`probe_image`, also handing back the opened (header-only) image, so that decoding does
    not parse the header a second time."""
    if not data:
        raise ImageError("empty file")
    img = open_untrusted(data)
    fmt = img.format or ""
    if fmt not in ALLOWED_FORMATS:
        # An allowed plugin may hand back a variant of its format (JPEG's opener returns MPO
        # for a multi-picture JPEG): still refused, as before.
        raise NotAnImage(f"image format {fmt or 'unknown'} is not allowed; "
                         f"allowed formats: {_allowed_list()}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return ImageInfo(fmt, width, height), img


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Untrusted bytes -> fully decoded 8-bit RGB PIL image (first frame, EXIF-oriented).

    `draft_size`: for JPEG, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) whose short side
    stays >= draft_size. Inference resizes to a few hundred pixels anyway, so decoding a
    12-megapixel photo at full size is wasted work. The image that the header probe opened is
    the one decoded (only the allowed formats' plugins were tried to open it).
    """
    img: Image.Image = _probe(data, max_pixels)[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = max(1.0, min(w, h) / draft_size)
                img.draft("RGB", (int(w / scale), int(h / scale)))
            img.seek(0)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when upright
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit grayscale is rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
