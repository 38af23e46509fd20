"""Constructed faces whose quality class is visible, for the classic FQA tests: good = a sharp drawn
face, average = the same drawing mildly blurred and noisy, bad = heavily degraded (blurred, then a
14-pixel thumbnail blown up) or not a face at all (flat shapes on a background)."""

from __future__ import annotations

import cv2
import numpy as np

from cafi.samples import draw_face

LABELS = ("good", "average", "bad")


def not_a_face(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), rng.integers(30, 220, 3), np.uint8)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v * size / 112) for v in rng.integers(10, 50, 2))
        cv2.rectangle(img, (x, y), (x + w, y + h), rng.integers(0, 255, 3).tolist(), -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def labelled_face(label: str, seed: int, size: int = 112) -> np.ndarray:
    """An RGB uint8 (size, size, 3) crop of the given class (the face drawn as draw_face draws it)."""
    rng = np.random.default_rng(10_000 + seed)
    face = draw_face(size, seed)
    s = size / 112
    if label == "good":
        return face
    if label == "average":
        face = cv2.GaussianBlur(face, (0, 0), 1.5 * s)
        return np.clip(face + rng.normal(0, 8, face.shape), 0, 255).astype(np.uint8)
    if seed % 2:
        return not_a_face(seed, size)
    small = cv2.resize(cv2.GaussianBlur(face, (0, 0), 2.5 * s), (14, 14), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """Embeddings that carry no label: what a recognizer gives for drawings is no evidence here."""
    v = np.random.default_rng(seed).normal(size=(n, 512)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
