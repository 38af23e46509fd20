"""Bytes -> validated RGB uint8 crop of a fixed size, or a readable reason why not.

Sizes are checked from the header before any pixel is decoded, so a decompression bomb
never reaches memory. Unusual but decodable images (grayscale, CMYK, 16-bit, alpha,
palette, EXIF-rotated) are converted rather than refused.

Only the formats in `FORMATS` are opened (for the header check and for decoding alike): JPEG,
PNG, WebP, BMP, TIFF and GIF (its first frame). Pillow's other plugins are never tried, so an
EPS file is an error row ("unsupported image format: EPS") and Ghostscript is never started.

The memory of a decode is bounded by the image's pixels (a few bytes each), never by the square
of its longer side: `square_resize` pads on a square canvas only when that canvas is at most
twice the image, and otherwise computes the padded resize without it. Whatever goes wrong with
one file -- including a MemoryError -- is that file's error, never an exception.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from cafi.config import ImageConfig

# Pillow's decompression-bomb guard is off, on purpose: cafi checks every header itself (`probe`:
# width x height against image.max_pixels, read before a pixel is decoded), and Pillow's guard is a
# process-wide fixed threshold (it would refuse images that a larger image.max_pixels allows, and
# adds nothing below it: it too only reads the header's size).
Image.MAX_IMAGE_PIXELS = None

# The formats cafi opens (Pillow's plugin names); the JPEG plugin also reports MPO (multi-picture
# JPEG from cameras): its first picture. GIF, TIFF and WebP: the first frame.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_OPENED = frozenset(FORMATS) | {"MPO"}

# The float copy of one band of an image that is shrunk without its square canvas.
_BAND_BYTES = 16 * 1024 * 1024


@dataclass
class Decoded:
    image: np.ndarray | None  # (S,S,3) uint8 RGB, None on error
    width: int
    height: int
    error: str | None


def _gray_to_8bit(img: Image.Image) -> np.ndarray:
    """16-bit and 32-bit grayscale -> uint8, scaled (v / 257, rounded) rather than clipped at 255,
    without a float copy of the image: at most one integer copy (the source's 2 or 4 bytes a pixel)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img)
        if arr.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
            arr = arr.astype(np.uint16)  # big-endian (I;16B) to native: OpenCV reads native only
        # round(v / 257) exactly: no v / 257 lies within a float's error of a half
        return cv2.convertScaleAbs(arr, alpha=1.0 / 257.0)
    if img.mode == "I":  # int32: 16-bit data in a 32-bit mode when any value is above 255
        arr = np.array(img, dtype=np.int32)
        if arr.size and arr.max() > 255:
            np.clip(arr, 0, 65535, out=arr)
            np.add(arr, 128, out=arr)
            np.floor_divide(arr, 257, out=arr)  # round(v / 257), in integers
        else:
            np.clip(arr, 0, 255, out=arr)
        return arr.astype(np.uint8)
    arr = np.array(img, dtype=np.float32)  # "F": 32-bit float, copied once, scaled in place
    if arr.size and arr.max() > 255:
        arr *= np.float32(255.0 / 65535.0)
    arr += np.float32(0.5)
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return cv2.cvtColor(_gray_to_8bit(img), cv2.COLOR_GRAY2RGB)
    if img.mode == "L":  # replicated by OpenCV: no 4-byte-a-pixel RGB image inside Pillow first
        return cv2.cvtColor(np.asarray(img, dtype=np.uint8), cv2.COLOR_GRAY2RGB)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, P
    return np.asarray(img, dtype=np.uint8)


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square (black), then resize; keeps the face's aspect ratio.

    The square canvas is made only where it is at most twice the image or at most size x size
    (every crop up to 2:1); a longer or thinner image that shrinks gets the same result (to one
    level) from `_padded_shrink`, which never makes the canvas: memory bounded by the pixels."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    if side * side > max(2 * h * w, size * size):
        return _padded_shrink(rgb, size)
    if h != w:
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = rgb
        rgb = canvas
    if rgb.shape[0] == size:
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interp)


def _area_weights(src: int, dst: int, rows: range, cols: range) -> np.ndarray:
    """The (rows, cols) block of OpenCV's INTER_AREA weights from `src` to `dst` pixels: each output
    pixel averages the input pixels its footprint covers, partly covered ones by the covered
    fraction (stages/decode.py's `area_weights`, on the host and for a block only)."""
    scale = src / dst
    i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
    j = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :]
    overlap = np.minimum((i + 1) * scale, j + 1)
    overlap -= np.maximum(i * scale, j)
    np.clip(overlap, 0, None, out=overlap)
    overlap /= scale
    return overlap


def _padded_shrink(rgb: np.ndarray, size: int) -> np.ndarray:
    """What square_resize's pad-then-INTER_AREA gives for an image whose longer side exceeds `size`,
    without the square canvas. INTER_AREA is separable: along the longer side the canvas is the
    image itself (OpenCV's shrink, in float, one band of rows at a time); along the shorter side
    the canvas's padding only adds zeros, so the weights of the rows the image covers are all that
    is needed. Memory: the float copy of one band (16 MiB, or one row), (shorter side x size) floats
and the weights of the few output rows the image covers."""
    long_axis = 0 if rgb.shape[0] > rgb.shape[1] else 1
    img = rgb.transpose(1, 0, 2) if long_axis == 0 else rgb  # a view: the longer side is axis 1
    n, side = img.shape[:2]
    offset = (side - n) // 2
    scale = side / size
    # the output rows the image covers (and one more each side: zero weights), the others stay black
    first, last = max(0, int(offset // scale) - 1), min(size, int(np.ceil((offset + n) / scale)) + 1)
    across = np.empty((n, size, 3), np.float32)
    step = max(1, _BAND_BYTES // (side * 3 * 4))
    for r in range(0, n, step):
        band = np.ascontiguousarray(img[r:r + step], dtype=np.float32)
        across[r:r + step] = cv2.resize(band, (size, band.shape[0]), interpolation=cv2.INTER_AREA)
    weights = _area_weights(side, size, range(first, last), range(offset, offset + n))
    rows = np.tensordot(weights, across, axes=(1, 0))  # (last - first, size, 3)
    out = np.zeros((size, size, 3), np.uint8)
    out[first:last] = np.clip(np.rint(rows), 0, 255)
    return np.ascontiguousarray(out.transpose(1, 0, 2)) if long_axis == 0 else out


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


def _open(data: bytes) -> Image.Image:
    """Pillow's image of `data`, trying the plugins of `FORMATS` only (headers read, no pixels)."""
    img = Image.open(io.BytesIO(data), formats=FORMATS)
    if img.format not in _OPENED:  # e.g. a plugin registered under an allowed name by a third party
        raise Image.UnidentifiedImageError(f"unsupported image format: {img.format}")
    return img


def format_of(data: bytes) -> str | None:
    """The name of the Pillow format whose signature `data` starts with, checked by that plugin's
    `accept` test of the first 16 bytes only (what Image.open reads first): no plugin is opened."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a signature test that cannot tell
            continue
    return None


def _unidentified(data: bytes) -> str:
    fmt = format_of(data)
    if fmt is not None and fmt not in _OPENED:
        return f"unsupported image format: {fmt} (accepted: {', '.join(FORMATS)})"
    return "not an image: format not recognised"


def _reason(exc: BaseException) -> str:
    return f"cannot decode image: {str(exc) or type(exc).__name__}"


def probe(data: bytes | None, cfg: ImageConfig) -> Probe:
    """The cheap checks that need no decoding: empty, too many bytes, not an image or not an
    accepted format, too small, too many pixels (a decompression bomb is refused here, from its
    header)."""
    if data is None or len(data) == 0:
        return Probe(0, 0, None, None, False, "empty file (0 bytes)")
    if len(data) > cfg.max_bytes:
        # the read stops one byte past the limit: "more than", not the file's size
        return Probe(0, 0, None, None, False, f"file too large: more than image.max_bytes={cfg.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _open(data)
            w, h = img.size
            fmt, mode = img.format, img.mode
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
            # EXIF sits in the header of these formats (PNG may keep it after the pixels: not read here;
            # the decoded size is what the row reports in the end).
            if min(w, h) >= cfg.min_side and w * h <= cfg.max_pixels and fmt in ("JPEG", "MPO", "WEBP", "TIFF") \
                    and img.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
    except Image.UnidentifiedImageError:
        return Probe(0, 0, None, None, False, _unidentified(data))
    except Exception as exc:  # noqa: BLE001 - whatever a header parser raises is this file's error
        return Probe(0, 0, None, None, False, _reason(exc))
    if min(w, h) < cfg.min_side:
        return Probe(w, h, fmt, mode, progressive, f"image too small: {w}x{h} < image.min_side={cfg.min_side}")
    if w * h > cfg.max_pixels:
        return Probe(w, h, fmt, mode, progressive, f"image too large: {w}x{h} = {w * h} pixels > "
                                                   f"image.max_pixels={cfg.max_pixels} (not decoded)")
    return Probe(w, h, fmt, mode, progressive, None)


def decode(data: bytes | None, cfg: ImageConfig) -> Decoded:
    """Bytes -> the square crop; every check of `probe` first, so a bomb is never decoded. Never
    raises: whatever decoding or resizing one file raises (a MemoryError included) is its error."""
    head = probe(data, cfg)
    if head.error is not None:
        return Decoded(None, head.width, head.height, head.error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _open(data)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb_array(img)
            del img
            h, w = rgb.shape[:2]
            return Decoded(square_resize(rgb, cfg.crop_size), w, h, None)
    except Image.UnidentifiedImageError:
        return Decoded(None, 0, 0, _unidentified(data))
    except Exception as exc:  # noqa: BLE001 - one file's fault (MemoryError included) is its error row
        return Decoded(None, 0, 0, _reason(exc))
