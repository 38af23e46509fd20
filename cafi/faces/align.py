"""Similarity alignment of five landmarks to the ArcFace 112x112 and FFHQ 512x512 templates."""

from __future__ import annotations

import cv2
import numpy as np

# Eyes, nose tip, mouth corners of the canonical ArcFace 112x112 face.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ALIGNED_SIZE = 112

# Eyes, nose tip, mouth corners of the FFHQ face at 512x512: facexlib's FaceRestoreHelper
# (utils/face_restoration_helper.py, "standard 5 landmarks for FFHQ faces with 512 x 512"), which
# pyiqa's topiq_nr-face uses to align its input (face_size 512, crop_ratio (1, 1)).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)
# FaceRestoreHelper.align_warp_face fills outside the source image with borderValue (135, 133, 132)
# on the BGR image pyiqa hands it, i.e. this grey in RGB.
FFHQ_BORDER_RGB = (132, 133, 135)


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


def align_ffhq(images: np.ndarray, landmarks: np.ndarray, size: int = 512,
               valid: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB (N,H,W,3) and five landmarks each (N,5,2) -> (N,size,size,3) faces warped onto the
    FFHQ template scaled to `size`, as facexlib aligns for pyiqa's topiq_nr-face: bilinear, outside
    the source filled with facexlib's grey. Faces that are not `valid` (or whose landmarks are
    degenerate) are all grey.

    The transform is the least-squares similarity (as align_faces); facexlib's
    cv2.estimateAffinePartial2D(method=LMEDS) is the same fit when no landmark is an outlier.
    facexlib warps pyiqa's float image and keeps floats; here the warp rounds to uint8 (<= 0.5/255)."""
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    out[:] = FFHQ_BORDER_RGB
    for i in range(len(images)):
        if valid is not None and not valid[i]:
            continue
        m = similarity_transform(landmarks[i], template)
        if m is not None:
            out[i] = cv2.warpAffine(images[i], m, (size, size), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=FFHQ_BORDER_RGB)
    return out
