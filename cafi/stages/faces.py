"""What the scorers read besides the crop: the face aligned from the landmarks, and the masked crop."""

from __future__ import annotations

import numpy as np


def aligned_faces(batch: dict, rows: np.ndarray, align: str) -> np.ndarray:
    """uint8 (len(rows),112,112,3) faces aligned to the ArcFace template, from the original pixels and
    the detector's landmarks (stored landmarks when detection is reused)."""
    from cafi.faces.align import align_faces, resize_aligned
    from cafi.models.runtime import to_host

    images = to_host(batch["image"][rows])
    if align == "none":
        return resize_aligned(images)
    return align_faces(images, batch["landmarks"][rows].reshape(-1, 5, 2), np.ones(len(rows), bool))


def scored_pixels(batch: dict, rows: np.ndarray, masked: bool, fill: list[int], device):
    """The crop an IQA model scores, with its background replaced by `fill` if `masked` (the CAFI method)."""
    from cafi.models.face_parsing import apply_mask

    pixels = batch["image"][rows]
    if not masked:
        return pixels
    return apply_mask(pixels, batch["face_mask"][rows], list(fill), device)
