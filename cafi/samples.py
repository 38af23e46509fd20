"""Sample crops the project makes itself, for the smoke run, tests and benchmarks.

Drawn face-like crops in real-looking variety (sizes, poses, degradations, formats) plus
the broken inputs a bucket of millions always holds. Deterministic for a given seed.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
from PIL import Image


def draw_face(size: int = 384, seed: int = 0) -> np.ndarray:
    """An RGB uint8 face-like crop: background, hair, skin oval, brows, eyes, nose, mouth."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(40, 220, 3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.clip(img + ((yy + xx) / (2 * size) * 40 - 20)[..., None], 0, 255).astype(np.uint8)
    c = size / 2 + rng.normal(0, size * 0.03, 2)
    skin = np.array([rng.integers(150, 235), rng.integers(110, 190), rng.integers(90, 160)])
    hair = rng.integers(10, 90, 3)
    s = size / 384
    cv2.ellipse(img, (int(c[0]), int(c[1] - 40 * s)), (int(130 * s), int(150 * s)), 0, 0, 360, hair.tolist(), -1)
    cv2.ellipse(img, (int(c[0]), int(c[1] + 10 * s)), (int(105 * s), int(135 * s)), 0, 0, 360, skin.tolist(), -1)
    for dx in (-1, 1):
        ex, ey = int(c[0] + dx * 42 * s), int(c[1] - 15 * s)
        cv2.line(img, (ex - int(22 * s), ey - int(25 * s)), (ex + int(22 * s), ey - int(28 * s)), hair.tolist(),
                 max(1, int(6 * s)))
        cv2.ellipse(img, (ex, ey), (int(20 * s), int(10 * s)), 0, 0, 360, (245, 245, 245), -1)
        cv2.circle(img, (ex, ey), int(7 * s), rng.integers(20, 120, 3).tolist(), -1)
    nose = (skin * 0.8).astype(int).tolist()
    cv2.line(img, (int(c[0]), int(c[1] - 5 * s)), (int(c[0] - 8 * s), int(c[1] + 35 * s)), nose, max(1, int(4 * s)))
    cv2.ellipse(img, (int(c[0]), int(c[1] + 70 * s)), (int(35 * s), int(12 * s)), 0, 0, 180, (150, 60, 70),
                max(1, int(6 * s)))
    img = cv2.GaussianBlur(img, (3, 3), 0)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    if kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), 4)
    if kind == "downscale":  # a 360p-like frame upscaled back
        small = cv2.resize(img, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "noise":
        return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 5])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
    if kind == "dark":
        return (img * 0.25).astype(np.uint8)
    return img


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes:
    what a decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        _png_chunk(b"IEND", b"")


def png_flat(width: int, height: int, level: int = 128) -> bytes:
    """A real, fully decodable 8-bit grayscale PNG of width x height, every pixel `level`: a few
    kilobytes however many pixels (1,250,000 x 32 is 39 KB), made one row at a time."""
    z = zlib.compressobj(9)
    row = b"\x00" + bytes([level]) * width  # filter type 0, then the row's pixels
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def hostile_images() -> dict[str, bytes]:
    """Crafted files of a few kilobytes: a 1,250,000 x 32 PNG (exactly image.max_pixels; padded to a
    square it asked for 4.26 TiB and failed the run), a 4,000,000 x 1 PNG (an error row whose report
    thumbnail raised MemoryError) and an EPS named .jpg (Pillow would start Ghostscript)."""
    return {"long.png": png_flat(1_250_000, 32, 255), "line.png": png_flat(4_000_000, 1),
            "eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"}


def unusual_inputs(seed: int = 0) -> dict[str, bytes]:
    """Decodable but unusual: each must be converted and scored."""
    face = draw_face(256, seed)
    gray = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    out = {
        "gray.png": encode(gray, "PNG"),
        "rgba.png": encode(np.dstack([face, np.full(face.shape[:2], 200, np.uint8)]), "PNG"),
        "webp.webp": encode(face, "WEBP"),
        "bitmap.bmp": encode(face, "BMP"),
        "png_named.jpg": encode(face, "PNG"),
        "palette.png": _save(Image.fromarray(face).convert("P"), "PNG"),
        "cmyk.jpg": _save(Image.fromarray(face).convert("CMYK"), "JPEG"),
        "nonsquare.jpg": encode(draw_face(300, seed)[:, 40:260], "JPEG"),
    }
    ok, buf16 = cv2.imencode(".png", (face[..., ::-1].astype(np.uint16) * 257))
    out["deep16.png"] = buf16.tobytes()
    ok, gray16 = cv2.imencode(".png", gray.astype(np.uint16) * 257)
    out["gray16.png"] = gray16.tobytes()
    return out


def broken_inputs(seed: int = 0) -> dict[str, bytes]:
    """Undecodable or out-of-limits: each must become an error row with a reason."""
    good = encode(draw_face(256, seed), "JPEG")
    corrupt = bytearray(good)
    corrupt[200:len(corrupt) - 200] = bytes(len(corrupt) - 400)
    return {
        "truncated.jpg": good[: len(good) // 3],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just text with a .jpg name\n",
        "corrupt.jpg": bytes(corrupt[:100]) + b"\xff\xd9" + bytes(corrupt[100:]),
        "tiny.png": encode(np.zeros((1, 1, 3), np.uint8), "PNG"),
        "bomb.png": png_header_only(10000, 10000),
    }


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_crops(count: int, seed: int = 0) -> dict[str, bytes]:
    """Face crops at 384 and other sizes, some degraded, as JPEG and PNG."""
    kinds = ("clean", "blur", "downscale", "noise", "jpeg", "dark")
    sizes = (384, 384, 384, 512, 256, 200)
    out = {}
    for i in range(count):
        kind, size = kinds[i % len(kinds)], sizes[(i // len(kinds)) % len(sizes)]
        img = degrade(draw_face(size, seed + i), kind, seed + i)
        fmt, ext = ("PNG", "png") if i % 5 == 4 else ("JPEG", "jpg")
        out[f"face_{i:04d}_{kind}_{size}.{ext}"] = encode(img, fmt)
    return out


def write_samples(directory: str, count: int = 24, seed: int = 0, unusual: bool = True,
                  broken: bool = True) -> list[str]:
    """Write sample crops into a directory; returns the file paths."""
    os.makedirs(directory, exist_ok=True)
    files = dict(good_crops(count, seed))
    if unusual:
        files.update({f"unusual/{k}": v for k, v in unusual_inputs(seed).items()})
    if broken:
        files.update({f"broken/{k}": v for k, v in broken_inputs(seed).items()})
    paths = []
    for name, data in sorted(files.items()):
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        paths.append(path)
    return paths
