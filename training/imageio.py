"""Safe image decoding, shared by the dataset store (ingest, import) and the service (predict).

Untrusted bytes go through `decode_image`, which:
- refuses anything but the allowed formats (JPEG, PNG, WebP), judged by the decoder that
  actually recognises the bytes, never by a filename or a client's content type;
- reads only the header first and refuses images over `max_pixels` before any pixel is decoded
  (a decompression bomb costs a header parse, not gigabytes);
- keeps the first frame of animated files, applies the EXIF orientation, and converts every mode
  (CMYK, grayscale, palette, RGBA, 16-bit) to 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import DomainError

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP"})
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


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check format and size from the header alone; raise an `ImageError` subclass if refused."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        raise NotAnImage(
            f"not a recognised image; allowed formats: {', '.join(sorted(ALLOWED_FORMATS))}"
        ) from None
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise ImageError(f"unreadable image header: {exc}") from None
    fmt = img.format or ""
    if fmt not in ALLOWED_FORMATS:
        raise NotAnImage(
            f"image format {fmt or 'unknown'} is not allowed; "
            f"allowed formats: {', '.join(sorted(ALLOWED_FORMATS))}"
        )
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return ImageInfo(fmt, width, height)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Untrusted bytes -> fully decoded 8-bit RGB PIL image (first frame, EXIF-oriented).

    `draft_size`: for JPEG, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) whose short side
    stays >= draft_size. Inference resizes to a few hundred pixels anyway, so decoding a
    12-megapixel photo at full size is wasted work.
    """
    probe_image(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img: Image.Image = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = max(1.0, min(w, h) / draft_size)
                img.draft("RGB", (int(w / scale), int(h / scale)))
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
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
