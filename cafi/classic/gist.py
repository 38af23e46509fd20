"""GIST (Oliva & Torralba, "Modeling the shape of the scene", IJCV 2001), as their reference code
LMgist.m computes it with its default parameters, vectorised over a batch of grey images.

Parameters (LMgist.m's defaults: param.imageSize 128, orientationsPerScale [8 8 8 8], numberBlocks 4,
fc_prefilt 4, boundaryExtension 32):
- the grey image (LMgist: the mean of the colour channels) is resized to IMAGE_SIZE x IMAGE_SIZE = 128
  (bilinear) and min-max scaled to 0..255;
- prefiltering (prefilt): log(1 + I) with 5 px symmetric padding, whitening by subtracting a Gaussian
  low-pass exp(-(fx^2 + fy^2) / s1^2), s1 = fc / sqrt(ln 2), fc = PREFILTER_FC = 4 cycles/image, then
  local contrast normalisation: divided by 0.2 + sqrt(|low-pass of the squared output|);
- a bank of Gabor transfer functions (createGabor) at SCALES = 4 scales with ORIENTATIONS = 8
  orientations each: filter (i, j) is exp(-10 a (f / (n b) - 1)^2 - 2 c pi theta^2) with a = 0.35,
  b = 0.3 / 1.85^i, c = 16 o^2 / 32^2, f the radial frequency, theta the polar angle shifted by pi j / o
  (wrapped to [-pi, pi]), on the n x n grid of the image padded by BOUNDARY = 32 px (symmetric);
- the magnitude of each filter's response (gistGabor), cropped back to the image, averaged over a
  BLOCKS x BLOCKS = 4 x 4 grid (downN): 4 * 8 * 16 = 512 values per face, in LMgist's order (filter
  by filter, each filter's 16 blocks column by column).
"""
from __future__ import annotations

from functools import cache

import cv2
import numpy as np
from scipy import fft

IMAGE_SIZE = 128
PREFILTER_FC = 4.0
SCALES = 4
ORIENTATIONS = 8
BOUNDARY = 32
BLOCKS = 4
DIM = SCALES * ORIENTATIONS * BLOCKS * BLOCKS


def _frequencies(n: int) -> tuple[np.ndarray, np.ndarray]:
    """fx, fy on an n x n grid centred at 0 (MATLAB meshgrid(-n/2:n/2-1)), in FFT order (fftshifted)."""
    f = np.arange(-n // 2, n // 2, dtype=np.float64)
    fx, fy = np.meshgrid(f, f)
    return fft.ifftshift(fx), fft.ifftshift(fy)


@cache
def gabor_bank(n: int = IMAGE_SIZE + 2 * BOUNDARY) -> np.ndarray:
    """(SCALES * ORIENTATIONS, n, n) float32 transfer functions in FFT order (createGabor.m)."""
    fx, fy = _frequencies(n)
    radius = np.sqrt(fx**2 + fy**2)
    angle = np.arctan2(fy, fx)
    out = []
    for i in range(SCALES):
        a, b, c = 0.35, 0.3 / 1.85**i, 16 * ORIENTATIONS**2 / 32**2
        for j in range(ORIENTATIONS):
            t = angle + np.pi / ORIENTATIONS * j
            t = t + 2 * np.pi * (t < -np.pi) - 2 * np.pi * (t > np.pi)
            out.append(np.exp(-10 * a * (radius / n / b - 1) ** 2 - 2 * c * np.pi * t**2))
    return np.stack(out).astype(np.float32)


@cache
def _lowpass(n: int) -> np.ndarray:
    fx, fy = _frequencies(n)
    s1 = PREFILTER_FC / np.sqrt(np.log(2))
    return np.exp(-(fx**2 + fy**2) / s1**2).astype(np.float32)


def prefilter(images: np.ndarray) -> np.ndarray:
    """(N, s, s) float 0..255 -> whitened, contrast-normalised (N, s, s) float32 (prefilt.m)."""
    pad = 5
    x = np.log1p(images.astype(np.float32))
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    sn = x.shape[1]
    n = sn + sn % 2
    x = np.pad(x, ((0, 0), (0, n - sn), (0, n - sn)), mode="symmetric")
    gf = _lowpass(n)
    white = x - fft.ifft2(fft.fft2(x) * gf).real
    local_std = np.sqrt(np.abs(fft.ifft2(fft.fft2(white**2) * gf)))
    out = white / (0.2 + local_std)
    return out[:, pad:sn - pad, pad:sn - pad].astype(np.float32)


def gist(gray: np.ndarray) -> np.ndarray:
    """uint8 or float grey faces (N, H, W) -> (N, DIM) float32 GIST descriptors."""
    if len(gray) == 0:
        return np.zeros((0, DIM), np.float32)
    resized = np.stack([cv2.resize(g, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
                        for g in np.asarray(gray, np.float32)])
    lo = resized.min(axis=(1, 2), keepdims=True)
    span = np.maximum(resized.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
    x = prefilter(255.0 * (resized - lo) / span)
    x = np.pad(x, ((0, 0), (BOUNDARY, BOUNDARY), (BOUNDARY, BOUNDARY)), mode="symmetric")
    spectrum = fft.fft2(x)  # (N, n, n)
    bank = gabor_bank(x.shape[1])
    inner = slice(BOUNDARY, BOUNDARY + IMAGE_SIZE)
    cell = IMAGE_SIZE // BLOCKS
    out = np.empty((len(x), len(bank), BLOCKS, BLOCKS), np.float32)  # (face, filter, row, col)
    for k, g in enumerate(bank):  # one filter at a time over the whole batch: memory stays N x n x n
        response = np.abs(fft.ifft2(spectrum * g))[:, inner, inner]
        out[:, k] = response.reshape(len(x), BLOCKS, cell, BLOCKS, cell).mean(axis=(2, 4))
    return out.transpose(0, 1, 3, 2).reshape(len(x), DIM)  # blocks column-major, as MATLAB's reshape
