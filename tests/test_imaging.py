"""Decode + validate: unusual images are converted, broken or out-of-limits ones get a reason."""

import numpy as np
import pytest

from cafi import imaging, samples
from cafi.config import ImageConfig

from .peak_rss import PeakRSS

CFG = ImageConfig(crop_size=128, min_side=32, max_pixels=40_000_000, max_bytes=1_000_000)


@pytest.mark.parametrize("name", sorted(samples.unusual_inputs()))
def test_unusual_but_decodable_images_are_converted(name):
    data = samples.unusual_inputs()[name]
    dec = imaging.decode(data, CFG)
    assert dec.error is None, dec.error
    assert dec.image.shape == (128, 128, 3) and dec.image.dtype == np.uint8
    assert dec.width > 0 and dec.height > 0


def test_sixteen_bit_and_eight_bit_versions_decode_alike():
    u = samples.unusual_inputs()
    a = imaging.decode(u["deep16.png"], CFG).image.astype(int)
    b = imaging.decode(u["bitmap.bmp"], CFG).image.astype(int)
    assert np.abs(a - b).max() <= 1  # 16-bit scaled to 8 bits, not clipped
    g16 = imaging.decode(u["gray16.png"], CFG).image.astype(int)
    g8 = imaging.decode(u["gray.png"], CFG).image.astype(int)
    assert np.abs(g16 - g8).max() <= 1
    assert np.array_equal(g8[..., 0], g8[..., 2])  # grayscale replicated to RGB


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated.jpg", "cannot decode image"),
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("corrupt.jpg", "cannot decode image"),
        ("tiny.png", "image too small: 1x1"),
        ("bomb.png", "image too large: 10000x10000"),
    ],
)
def test_broken_or_out_of_limit_inputs_get_a_reason(name, reason):
    dec = imaging.decode(samples.broken_inputs()[name], CFG)
    assert dec.image is None
    assert reason in dec.error


def test_bomb_is_refused_from_the_header_without_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr(imaging, "_to_rgb_array", lambda img: calls.append(img) or np.zeros((1, 1, 3), np.uint8))
    dec = imaging.decode(samples.png_header_only(10000, 10000), CFG)
    assert "not decoded" in dec.error and calls == []


def test_oversized_file_and_aspect_ratio():
    assert "file too large" in imaging.decode(b"x" * 1_000_001, CFG).error
    wide = np.full((40, 80, 3), 200, np.uint8)
    out = imaging.square_resize(wide, 80)
    assert out.shape == (80, 80, 3)
    assert out[0, 40].tolist() == [0, 0, 0] and out[40, 40].tolist() == [200, 200, 200]  # padded, not stretched


# ---------------------------------------------------------------- hostile inputs (issue 20)

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


def _peak_bytes(fn, *args):
    """The result of fn(*args) and how far the process's resident size rose while it ran."""
    with PeakRSS() as memory:
        out = fn(*args)
    return out, memory.bytes


@pytest.mark.parametrize("width, height, crop", [(1_250_000, 32, 384), (32, 20_000, 128), (20_000, 40, 128)])
def test_decode_memory_is_bounded_by_pixels_not_by_the_square_of_the_longer_side(width, height, crop):
    """1,250,000 x 32 is exactly image.max_pixels and passes the header check: padded to a square it
    asked for 4.26 TiB (a MemoryError that failed the whole block). Its crop is a thin grey band."""
    data = samples.png_flat(width, height, 200)
    assert len(data) < 64 * 1024
    cfg = ImageConfig(crop_size=crop, min_side=32, max_pixels=40_000_000, max_bytes=1_000_000)
    dec, peak = _peak_bytes(imaging.decode, data, cfg)
    assert dec.error is None and (dec.width, dec.height) == (width, height)
    assert peak < 8 * width * height + 24 * 1024 * 1024, peak  # the image a few times, never a side^2 canvas
    band = dec.image.max(axis=2)
    across = band.max(axis=0) if height > width else band.max(axis=1)  # the short side: one thin line
    assert dec.image.shape == (crop, crop, 3) and across.argmax() in (crop // 2 - 1, crop // 2)
    assert (across > 0).sum() <= max(2, round(crop * min(width, height) / max(width, height)) + 2)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (7, 129), (129, 7), (50, 1000), (1000, 3)])
def test_padded_shrink_matches_padding_then_resizing(shape):
    """Past 2:1 the square canvas is never made; the result is the padded resize's to one level."""
    import cv2

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    side = max(shape)
    canvas = np.zeros((side, side, 3), np.uint8)
    top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
    canvas[top:top + shape[0], left:left + shape[1]] = rgb
    want = cv2.resize(canvas, (64, 64), interpolation=cv2.INTER_AREA).astype(int)
    got = imaging.square_resize(rgb, 64).astype(int)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01


def test_whatever_decoding_raises_is_the_files_error_never_an_exception(monkeypatch):
    def out_of_memory(rgb, size):
        raise MemoryError("Unable to allocate 4.26 TiB")

    monkeypatch.setattr(imaging, "square_resize", out_of_memory)
    dec = imaging.decode(samples.good_crops(1)["face_0000_clean_384.jpg"], CFG)
    assert dec.image is None and dec.error == "cannot decode image: Unable to allocate 4.26 TiB"


def test_sixteen_bit_images_convert_without_a_float_copy():
    """v / 257, rounded, for every 16-bit value (as before, when it went through float64), and for a
    40 MP image no more than a few bytes a pixel (float64 made it ~24: about 1 GB a decode thread). The
    measure is the process's resident growth, PIL's own buffers included: 8.0 bytes a pixel measured."""
    from PIL import Image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    want = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    for mode, raw in (("I;16", values.astype("<u2")), ("I;16B", values.astype(">u2"))):
        got = imaging._to_rgb_array(Image.frombytes(mode, (256, 256), raw.tobytes()))
        assert got.shape == (256, 256, 3) and np.array_equal(got[..., 0], want), mode
    as_int = imaging._to_rgb_array(Image.fromarray(values.astype(np.int32), "I"))
    assert np.array_equal(as_int[..., 1], want)
    big = Image.frombytes("I;16", (2000, 1000), (np.arange(2_000_000, dtype=np.uint32) % 65536)
                          .astype("<u2").tobytes())
    rgb, peak = _peak_bytes(imaging._to_rgb_array, big)
    assert rgb.shape == (1000, 2000, 3) and peak < 12 * 2_000_000, peak


def test_only_the_accepted_formats_are_opened_and_no_program_is_started(monkeypatch):
    """An EPS file passed the header check and its decoding looked for Ghostscript and ran it."""
    import io
    import subprocess

    from PIL import EpsImagePlugin, Image

    started = []

    def no_programs(*args, **kwargs):
        started.append(args)
        raise FileNotFoundError("no program may be started")

    monkeypatch.setattr(subprocess, "Popen", no_programs)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # not yet looked for
    cfg = ImageConfig(crop_size=64, min_side=1)
    for name, data in (("EPS", EPS), ("PPM", samples.encode(samples.draw_face(64), "PPM")),
                       ("ICO", samples.encode(samples.draw_face(64), "ICO"))):
        assert imaging.probe(data, cfg).error.startswith(f"unsupported image format: {name}"), name
        dec = imaging.decode(data, cfg)
        assert dec.image is None and dec.error.startswith(f"unsupported image format: {name}"), name
    assert started == []
    assert "not an image" in imaging.probe(samples.broken_inputs()["text.jpg"], cfg).error
    face = samples.draw_face(64)
    for fmt in imaging.FORMATS:  # every accepted format decodes (a GIF: its first frame, palette colours)
        dec = imaging.decode(samples.encode(face, fmt), cfg)
        assert dec.error is None and np.abs(dec.image.astype(int) - face).mean() < 12, fmt
    buf = io.BytesIO()
    frames = [Image.fromarray(face), Image.fromarray(255 - face)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = imaging.decode(buf.getvalue(), cfg)
    assert first.error is None and np.abs(first.image.astype(int) - face).mean() < 12
