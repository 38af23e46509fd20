"""The four feature kinds of the score-based FQA classifier, per aligned 112x112 face, over a batch.

- HOG: scikit-image's `hog` with Dalal & Triggs' parameters (9 orientations, 8x8-pixel cells, 2x2-cell
  blocks, L2-Hys): 13 x 13 blocks x 36 = 6084 values. (OpenCV 5 moved its HOGDescriptor out of the main
  modules, to opencv_contrib's xobjdetect: the installed opencv-python-headless 5.1 has none.)
- LBP: scikit-image's `local_binary_pattern` with 8 neighbours at radius 2, the 59 non-rotation-invariant
  uniform codes (LBP^u2_{8,2}), histogrammed over a 7x7 grid of 16x16-pixel cells and each cell's
  histogram normalised to sum 1 -- Ahonen, Hadid & Pietikainen's face descriptor (TPAMI 2006):
  49 x 59 = 2891 values.
- GIST: Oliva & Torralba's Gabor-bank energies on a 4x4 grid (cafi/classic/gist.py), on the mean of
  the colour channels as LMgist takes it: 512 values.
- CNN: the run's recognition embedding of the face (the `embedding` column: L2-normalised, 512 values)
  -- computed once by the run's recognizer, never again here.

HOG and LBP on BT.601 luma of the RGB face; every kind as float32.
"""

from __future__ import annotations

import numpy as np

from cafi.classic import gist as _gist

FACE = 112
HOG_ORIENTATIONS, HOG_CELL, HOG_BLOCK = 9, 8, 2
LBP_POINTS, LBP_RADIUS, LBP_GRID = 8, 2, 7
LBP_CODES = LBP_POINTS * (LBP_POINTS - 1) + 3  # 59 uniform codes (nri_uniform)
CNN_DIM = 512

_HOG_BLOCKS = FACE // HOG_CELL - HOG_BLOCK + 1
DIMS = {
    "gist": _gist.DIM,
    "cnn": CNN_DIM,
    "hog": _HOG_BLOCKS * _HOG_BLOCKS * HOG_BLOCK * HOG_BLOCK * HOG_ORIENTATIONS,
    "lbp": LBP_GRID * LBP_GRID * LBP_CODES,
}
KINDS = tuple(DIMS)  # the order of the concatenation


def luma(faces: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 BT.601 luma (N, H, W) on 0..255."""
    return np.tensordot(np.asarray(faces, np.float32), np.array([0.299, 0.587, 0.114], np.float32), axes=([3], [0]))


def hog(gray: np.ndarray) -> np.ndarray:
    from skimage.feature import hog as _hog

    out = np.empty((len(gray), DIMS["hog"]), np.float32)
    for i, g in enumerate(gray):  # scikit-image has no batch form
        out[i] = _hog(g, orientations=HOG_ORIENTATIONS, pixels_per_cell=(HOG_CELL, HOG_CELL),
                      cells_per_block=(HOG_BLOCK, HOG_BLOCK), block_norm="L2-Hys", feature_vector=True)
    return out


def lbp(gray: np.ndarray) -> np.ndarray:
    """Per-cell histograms of the uniform codes, counted for the whole batch in one bincount."""
    from skimage.feature import local_binary_pattern

    n = len(gray)
    grey8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # integer codes: no ties broken by float noise
    codes = np.stack([local_binary_pattern(g, LBP_POINTS, LBP_RADIUS, method="nri_uniform") for g in grey8])
    codes = codes.astype(np.int64)
    cell = FACE // LBP_GRID
    rows = np.minimum(np.arange(FACE) // cell, LBP_GRID - 1)
    cell_of = rows[:, None] * LBP_GRID + rows[None, :]  # (FACE, FACE) cell index
    index = (np.arange(n)[:, None, None] * LBP_GRID**2 + cell_of[None]) * LBP_CODES + codes
    hist = np.bincount(index.ravel(), minlength=n * LBP_GRID**2 * LBP_CODES).reshape(n, LBP_GRID**2, LBP_CODES)
    hist = hist / np.maximum(hist.sum(axis=2, keepdims=True), 1)
    return hist.reshape(n, DIMS["lbp"]).astype(np.float32)


def hand_crafted(faces: np.ndarray) -> dict[str, np.ndarray]:
    """Aligned uint8 RGB faces (N, 112, 112, 3) -> GIST, HOG and LBP (N, dim) float32."""
    faces = np.asarray(faces)
    if faces.shape[1:] != (FACE, FACE, 3):
        raise ValueError(f"classic features need aligned {FACE}x{FACE} RGB faces, not {faces.shape[1:]}")
    gray = luma(faces)
    return {"gist": _gist.gist(faces.mean(axis=3, dtype=np.float32)), "hog": hog(gray), "lbp": lbp(gray)}


def extract(faces: np.ndarray, embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Aligned uint8 RGB faces (N, 112, 112, 3) and their recognition embeddings (N, 512) -> kind ->
    (N, dim) float32, in KINDS order."""
    embeddings = np.asarray(embeddings, np.float32).reshape(len(faces), -1)
    if embeddings.shape[1] != CNN_DIM:
        raise ValueError(f"classic features need {CNN_DIM}-value recognition embeddings, not {embeddings.shape[1]}")
    feats = hand_crafted(faces)
    return {k: embeddings if k == "cnn" else feats[k] for k in KINDS}
