"""Similarity alignment of five landmarks to the ArcFace 112x112 template."""

from __future__ import annotations

import cv2
import numpy as np

# Eyes, nose tip, mouth corners of the canonical ArcFace 112x112 face.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ALIGNED_SIZE = 112


def similarity_transform(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE_112) -> np.ndarray | None:
    """2x3 similarity (rotation, uniform scale, translation) mapping src points onto dst (Umeyama)."""
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if not np.isfinite(var_s) or var_s < 1e-6:
        return None
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_faces(images: np.ndarray, landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Warp each valid image so its landmarks land on the template; others stay black."""
    out = np.zeros((len(images), ALIGNED_SIZE, ALIGNED_SIZE, 3), dtype=np.uint8)
    for i in np.flatnonzero(valid):
        m = similarity_transform(landmarks[i])
        if m is not None:
            out[i] = cv2.warpAffine(images[i], m, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def resize_aligned(images: np.ndarray) -> np.ndarray:
    """`align: none`: crops are already aligned faces; only bring them to 112x112."""
    if images.shape[1:3] == (ALIGNED_SIZE, ALIGNED_SIZE):
        return images
    return np.stack([cv2.resize(im, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA) for im in images])
