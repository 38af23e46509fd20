"""Per-face quality components: head pose, source resolution, face size, sharpness, exposure.

Pure numpy + OpenCV over a batch of rows that have a face (no Ray, no models); each function
takes the whole batch. The manifest columns they fill are declared in `cafi.columns` (type,
unit, direction); this module is the one place that defines how each is measured. OFIQ
(ISO/IEC 29794-5) is the reference for the exposure and sharpness definitions.

Coordinates: the crop is `crop_size` x `crop_size` pixels, x to the right, y down. Landmarks are
RetinaFace's five points in crop pixels, in ArcFace order: the eye on the image's left, the eye
on the image's right, nose tip, mouth corner on the image's left, on the image's right.

Head-pose convention. Camera axes: x right, y down, z from the camera into the scene. The head's
rotation relative to the line of sight (camera -> centroid of the five points; so a frontal face
reads 0 wherever it sits in the crop) is R = Ry(yaw) @ Rx(-pitch) @ Rz(roll), i.e. intrinsic
y-x'-z'' Euler angles (heading, elevation, bank), with yaw and roll in (-180, 180], pitch in
[-90, 90] degrees. Signs, as the image shows them:
  yaw   > 0  the face turns towards the image's left (its nose points left of the camera;
             the subject turns to their own right);
  pitch > 0  the face looks up (the nose tip rises relative to the eyes and mouth);
  roll  > 0  the face is rotated clockwise in the image (the eye on the image's right is lower).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import cv2
import numpy as np

from cafi.columns import BY_NAME, Column

_REVISION = 1  # bump on any change of a measurement that the constants below do not capture


@dataclass(frozen=True)
class Component:
    """One quality component: its manifest column (unit, direction) and a precise definition."""

    name: str
    definition: str

    @property
    def column(self) -> Column:
        return BY_NAME[self.name]

    @property
    def unit(self) -> str:
        return self.column.unit

    @property
    def better(self) -> str | None:
        return self.column.better


COMPONENTS: tuple[Component, ...] = (
    Component("yaw", "heading of the head relative to the line of sight (module docstring), from a 5-point PnP "
                     "fit of FACE_MODEL_MM; + = the face turns towards the image's left"),
    Component("pitch", "elevation of the head relative to the line of sight, same fit; + = the face looks up"),
    Component("roll", "bank of the head about its own front axis, same fit; + = clockwise in the image"),
    Component("inter_eye_px", "distance between the two eye landmarks in crop pixels times max(width, height) / "
                              "crop_size: the eye-centre distance in source-image pixels"),
    Component("face_fraction", "area of the axis-aligned bounding box of the face-mask pixels over crop_size^2 "
                               "(0 when the mask is empty)"),
    Component("sharpness", "variance of the 3x3 Laplacian [0 1 0; 1 -4 1; 0 1 0] of the luma Y' (0..255) over "
                           "the face mask eroded by max(1, round(crop_size / 96)) pixels (crop edge counts as "
                           "outside), so the face outline and the fill behind it do not count"),
    Component("luma_mean", "mean of the luma Y' / 255 over face-mask pixels"),
    Component("luma_std", "standard deviation (population) of the luma Y' / 255 over face-mask pixels"),
    Component("under_exposed", "fraction of face-mask pixels with luma Y' <= DARK_MAX"),
    Component("over_exposed", "fraction of face-mask pixels with luma Y' >= BRIGHT_MIN"),
    Component("dynamic_range", "Shannon entropy in bits of the 256-bin histogram of face-mask luma Y' (0..8)"),
)
BY_COMPONENT: dict[str, Component] = {c.name: c for c in COMPONENTS}
NAMES: tuple[str, ...] = tuple(c.name for c in COMPONENTS)
POSE = ("yaw", "pitch", "roll")
PIXEL = ("sharpness", "luma_mean", "luma_std", "under_exposed", "over_exposed", "dynamic_range")

# Luma: BT.601 Y' = 0.299 R' + 0.587 G' + 0.114 B' on the gamma-encoded (sRGB) values, rounded to
# 0..255 -- exactly OpenCV's RGB2GRAY, which is fast and gives the integer levels the histogram needs.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Clip levels on the 0..255 luma scale: OFIQ's under-exposure range [0, 25] and over-exposure range [247, 255].
DARK_MAX, BRIGHT_MIN = 25, 247

# The 3D mean face of the five landmarks, in millimetres, camera axes of a frontal face (x right,
# y down, z away from the camera), origin at the nose tip. Sources (published coordinates):
#  x, y: the ArcFace 112x112 alignment template (insightface; cafi.faces.align.ARCFACE_TEMPLATE_112),
#        i.e. where the RetinaFace landmark convention puts a frontal face's points, made
#        left-right symmetric and scaled so that the eye centres are 64.2 mm apart;
#  z:    eye centres and mouth corners 36.7 mm behind the nose tip, and the 64.2 mm eye-centre
#        distance, from the generic 3D mean face of the 68-point Multi-PIE mark-up used for
#        head-pose normalisation in appearance-based gaze estimation (outer eye corners 90 mm
#        apart; eye centre = midpoint of the eye's two corners).
# Taking x, y from the template makes a frontal RetinaFace face read yaw = pitch = 0; the depths
# set how far the nose moves per degree. Errors in them scale the angles (a few per cent), not
# their signs.
FACE_MODEL_MM = np.array([
    [-32.1, -36.7, 36.7],  # eye, image left
    [32.1, -36.7, 36.7],  # eye, image right
    [0.0, 0.0, 0.0],  # nose tip
    [-26.6, 37.4, 36.7],  # mouth corner, image left
    [26.6, 37.4, 36.7],  # mouth corner, image right
])
_MODEL = np.ascontiguousarray(FACE_MODEL_MM - FACE_MODEL_MM.mean(0))  # centred: t is the face centroid


def _definition_version() -> str:
    h = hashlib.blake2b(digest_size=6)
    for c in COMPONENTS:
        h.update(f"{c.name}:{c.definition}\n".encode())
    h.update(repr((LUMA_WEIGHTS, DARK_MAX, BRIGHT_MIN, FACE_MODEL_MM.tolist(), "SQPNP", "line-of-sight")).encode())
    return f"{_REVISION}-{h.hexdigest()}"


DEFINITION_VERSION = _definition_version()  # goes into the components stage fingerprint


def _points(landmarks: np.ndarray) -> np.ndarray:
    """(N,10) [x0, y0, x1, y1, ...] or (N,5,2) -> (N,5,2) float64."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return pts.reshape(len(pts), 5, 2)


def _euler(r: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of rotation `r` relative to the line of sight `t` (camera frame)."""
    # Undo the rotation that turns the optical axis towards the face (heading, then elevation).
    a, b = np.arctan2(t[0], t[2]), -np.arcsin(t[1] / np.linalg.norm(t))
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    los = np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]]) @ np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    m = los.T @ r
    # m = Ry(yaw) Rx(-pitch) Rz(roll):  m[0,2] = sin(yaw)cos(pitch), m[2,2] = cos(yaw)cos(pitch),
    # m[1,2] = sin(pitch), m[1,0] = cos(pitch)sin(roll), m[1,1] = cos(pitch)cos(roll).
    yaw = np.arctan2(m[0, 2], m[2, 2])
    pitch = np.arcsin(np.clip(m[1, 2], -1.0, 1.0))
    roll = np.arctan2(m[1, 0], m[1, 1])
    return float(np.degrees(yaw)), float(np.degrees(pitch)), float(np.degrees(roll))


def head_pose(landmarks: np.ndarray, crop_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(yaw, pitch, roll) in degrees, float32 (N,) each, per the module docstring's convention.

    A pinhole camera with focal length crop_size (a ~53 degree field of view across the crop),
    principal point at the crop centre, no distortion. SQPnP is a global solver: no initial
    guess to trap it in a local minimum, and 5 points (4 of them coplanar) are enough for it.
    NaN where a landmark is NaN, the points are degenerate (collinear) or the solve fails."""
    pts = _points(landmarks)
    out = np.full((3, len(pts)), np.nan, dtype=np.float32)
    k = np.array([[crop_size, 0, crop_size / 2], [0, crop_size, crop_size / 2], [0, 0, 1]], dtype=np.float64)
    finite = np.isfinite(pts).all(axis=(1, 2))
    spread = np.zeros(len(pts))
    if finite.any():  # the smaller singular value of the centred points: ~0 when they are collinear
        centred = pts[finite] - pts[finite].mean(axis=1, keepdims=True)
        spread[finite] = np.linalg.svd(centred, compute_uv=False)[:, -1]
    for i in np.flatnonzero(spread >= 0.5):
        try:
            ok, rvec, tvec = cv2.solvePnP(_MODEL, pts[i], k, None, flags=cv2.SOLVEPNP_SQPNP)
        except cv2.error:
            continue
        if ok and tvec[2, 0] > 0:  # the face in front of the camera
            out[:, i] = _euler(cv2.Rodrigues(rvec)[0], tvec[:, 0])
    return out[0], out[1], out[2]


def inter_eye_px(landmarks: np.ndarray, width: np.ndarray, height: np.ndarray, crop_size: int) -> np.ndarray:
    """Eye-centre distance in source pixels: the source was padded to a centred square of side
    max(width, height) and resized to crop_size, so one crop pixel is max(w, h) / crop_size source pixels."""
    pts = _points(landmarks)
    side = np.maximum(np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        side = np.where(side > 0, side, np.nan)  # unknown source size: not measurable
        return (np.linalg.norm(pts[:, 1] - pts[:, 0], axis=1) * side / crop_size).astype(np.float32)


def face_fraction(masks: np.ndarray) -> np.ndarray:
    """Bounding-box area of the face-mask pixels over the crop area, float32 (N,).

    An empty mask gives 0.0, not NaN: the bounding box of no pixels has no area, the row agrees
    with its mask_fraction (also 0), and a minimum-size rule rejects it either way."""
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    box_h = h - rows[:, ::-1].argmax(axis=1) - rows.argmax(axis=1)
    box_w = w - cols[:, ::-1].argmax(axis=1) - cols.argmax(axis=1)
    return np.where(rows.any(axis=1), box_h * box_w / (h * w), 0.0).astype(np.float32)


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma Y' of an RGB uint8 image, uint8 (see LUMA_WEIGHTS)."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def pixel_measures(images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """sharpness, luma_mean, luma_std, under_exposed, over_exposed, dynamic_range: float32 (N,) each.

    `images` (N,S,S,3) uint8 RGB are the crops as decoded (not the masked ones: the fill would
    add an edge); `masks` (N,S,S) bool are the face pixels. A row whose mask is empty is NaN in
    every measure; sharpness is also NaN when erosion leaves no pixel."""
    n, s = len(images), images.shape[1] if len(images) else 0
    out = {name: np.full(n, np.nan, dtype=np.float32) for name in PIXEL}
    r = max(1, round(s / 96))
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    levels = np.arange(256, dtype=np.float64)
    for i in range(n):
        mask = np.ascontiguousarray(masks[i], dtype=bool).view(np.uint8)
        y = luma(np.ascontiguousarray(images[i]))
        hist = cv2.calcHist([y], [0], mask, [256], [0, 256]).ravel().astype(np.float64)
        count = hist.sum()
        if count == 0:
            continue
        p = hist / count
        mean = p @ levels
        out["luma_mean"][i] = mean / 255
        out["luma_std"][i] = np.sqrt(p @ (levels - mean) ** 2) / 255
        out["under_exposed"][i] = p[: DARK_MAX + 1].sum()
        out["over_exposed"][i] = p[BRIGHT_MIN:].sum()
        nz = p[p > 0]
        out["dynamic_range"][i] = max(0.0, -(nz * np.log2(nz)).sum())
        # The Laplacian sees the whole crop; only pixels whose neighbourhood is face count.
        inner = cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        if cv2.countNonZero(inner):
            _, sd = cv2.meanStdDev(cv2.Laplacian(y, cv2.CV_16S, ksize=1), mask=inner)
            out["sharpness"][i] = sd[0, 0] ** 2
    return out


def compute(images: np.ndarray, masks: np.ndarray, landmarks: np.ndarray, width: np.ndarray, height: np.ndarray,
            crop_size: int) -> dict[str, np.ndarray]:
    """All components for a batch of face rows: column name -> float32 (N,), in the order of NAMES.

    images (N,S,S,3) uint8 RGB crops (unmasked), masks (N,S,S) bool face pixels, landmarks (N,10)
    or (N,5,2) in crop pixels, width/height (N,) source size, crop_size S."""
    images = np.asarray(images)
    if len(images) and images.shape[1:3] != (crop_size, crop_size):
        raise ValueError(f"images are {images.shape[1:3]}, expected crop_size {crop_size}")
    yaw, pitch, roll = head_pose(landmarks, crop_size)
    cols = {"yaw": yaw, "pitch": pitch, "roll": roll,
            "inter_eye_px": inter_eye_px(landmarks, width, height, crop_size), "face_fraction": face_fraction(masks)}
    cols.update(pixel_measures(images, masks))
    return {name: np.asarray(cols[name], dtype=np.float32) for name in NAMES}


def bench_ms_per_crop(n: int = 16, size: int = 384, repeats: int = 5) -> float:
    """Milliseconds per crop of `compute` on drawn faces (best of `repeats`), for bench/stages.py."""
    from cafi.samples import draw_face

    images = np.stack([draw_face(size, seed) for seed in range(n)])
    masks = np.zeros((n, size, size), np.uint8)
    for m in masks:
        cv2.ellipse(m, (size // 2, size // 2 + size // 38), (size * 100 // 384, size * 130 // 384), 0, 0, 360, 1, -1)
    c, s = size / 2, size / 384
    frontal = np.array([[c - 42 * s, c - 15 * s], [c + 42 * s, c - 15 * s], [c - 4 * s, c + 30 * s],
                        [c - 35 * s, c + 70 * s], [c + 35 * s, c + 70 * s]])
    landmarks = np.repeat(frontal[None], n, axis=0).astype(np.float32)
    wh = np.full(n, size)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute(images, masks.astype(bool), landmarks, wh, wh, size)
        best = min(best, time.perf_counter() - t0)
    return best * 1000 / n
