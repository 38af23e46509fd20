"""Decode + validate: unusual images are converted, broken or out-of-limits ones get a reason."""

import numpy as np
import pytest

from cafi import imaging, samples
from cafi.config import ImageConfig

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
