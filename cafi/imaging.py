"""Bytes -> validated RGB uint8 crop of a fixed size, or a readable reason why not.

Sizes are checked from the header before any pixel is decoded, so a decompression bomb
never reaches memory. Unusual but decodable images (grayscale, CMYK, 16-bit, alpha,
palette, EXIF-rotated) are converted rather than refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from cafi.config import ImageConfig

# Our own limits run first; PIL's bomb guard stays on as a second line of defence.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class Decoded:
    image: np.ndarray | None  # (S,S,3) uint8 RGB, None on error
    width: int
    height: int
    error: str | None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, P
    return np.asarray(img, dtype=np.uint8)


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square (black), then resize; keeps the face's aspect ratio."""
    h, w = rgb.shape[:2]
    if h != w:
        side = max(h, w)
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = rgb
        rgb = canvas
    if rgb.shape[0] == size:
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interp)


@dataclass
class Probe:
    """What the header says, read without decoding a pixel."""

    width: int  # after EXIF orientation
    height: int
    format: str | None  # PIL's name: JPEG, PNG, WEBP, BMP, TIFF, ...
    mode: str | None  # PIL's mode: RGB, L, CMYK, I;16, ...
    progressive: bool
    error: str | None


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def probe(data: bytes | None, cfg: ImageConfig) -> Probe:
    """The cheap checks that need no decoding: empty, too many bytes, not an image, too small,
    too many pixels (a decompression bomb is refused here, from its header)."""
    if data is None or len(data) == 0:
        return Probe(0, 0, None, None, False, "empty file (0 bytes)")
    if len(data) > cfg.max_bytes:
        # the read stops one byte past the limit: "more than", not the file's size
        return Probe(0, 0, None, None, False, f"file too large: more than image.max_bytes={cfg.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            fmt, mode = img.format, img.mode
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
            # EXIF sits in the header of these formats (PNG may keep it after the pixels: not read here;
            # the decoded size is what the row reports in the end).
            if min(w, h) >= cfg.min_side and w * h <= cfg.max_pixels and fmt in ("JPEG", "MPO", "WEBP", "TIFF") \
                    and img.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
    except Image.UnidentifiedImageError:
        return Probe(0, 0, None, None, False, "not an image: format not recognised")
    except (OSError, SyntaxError, ValueError) as exc:
        return Probe(0, 0, None, None, False, f"cannot decode image: {str(exc) or type(exc).__name__}")
    if min(w, h) < cfg.min_side:
        return Probe(w, h, fmt, mode, progressive, f"image too small: {w}x{h} < image.min_side={cfg.min_side}")
    if w * h > cfg.max_pixels:
        return Probe(w, h, fmt, mode, progressive, f"image too large: {w}x{h} = {w * h} pixels > "
                                                   f"image.max_pixels={cfg.max_pixels} (not decoded)")
    return Probe(w, h, fmt, mode, progressive, None)


def decode(data: bytes | None, cfg: ImageConfig) -> Decoded:
    """Bytes -> the square crop; every check of `probe` first, so a bomb is never decoded."""
    head = probe(data, cfg)
    if head.error is not None:
        return Decoded(None, head.width, head.height, head.error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb_array(img)
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        msg = str(exc) or type(exc).__name__
        return Decoded(None, 0, 0, f"cannot decode image: {msg}")
    h, w = rgb.shape[:2]
    return Decoded(square_resize(rgb, cfg.crop_size), w, h, None)
