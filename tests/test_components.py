"""Quality components (cafi/components.py): real OpenCV and numpy on drawn faces and projected landmarks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cafi import columns
from cafi import components as comp
from cafi.faces.align import ARCFACE_TEMPLATE_112
from cafi.samples import draw_face

S = 384


# ---------------------------------------------------------------- helpers (independent of the module's maths)

def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation in camera axes (x right, y down, z forward): Ry(yaw) Rx(-pitch) Rz(roll)."""
    a, b, c = np.radians([yaw, -pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return ry @ rx @ rz


def _project(yaw: float, pitch: float, roll: float = 0.0, focal: float = S, face_fraction: float = 0.4) -> np.ndarray:
    """The 5-point model turned by (yaw, pitch, roll), on the optical axis at the distance where
    the face (~150 mm) spans `face_fraction` of the crop, seen by a pinhole camera of `focal` px."""
    model = comp.FACE_MODEL_MM - comp.FACE_MODEL_MM.mean(0)
    p = model @ _rotation(yaw, pitch, roll).T + [0, 0, focal * 150 / (face_fraction * S)]
    return np.stack([focal * p[:, 0] / p[:, 2] + S / 2, focal * p[:, 1] / p[:, 2] + S / 2], axis=1)


def _frontal(scale: float = 2.5, centre: tuple[float, float] = (S / 2, S / 2)) -> np.ndarray:
    """A frontal face's landmarks: the ArcFace template (the RetinaFace convention), ~40% of the crop."""
    t = ARCFACE_TEMPLATE_112.astype(np.float64)
    return (t - t.mean(0)) * scale + centre


def _rotate_in_plane(pts: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the points' centroid, clockwise on screen for degrees > 0 (y points down)."""
    a = np.radians(degrees)
    c = pts.mean(0)
    return (pts - c) @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) + c


def _ellipse_mask(size: int = S, axes: tuple[int, int] = (85, 110)) -> np.ndarray:
    """Inside the drawn face's skin oval (eyes, brows, nose, mouth included)."""
    m = np.zeros((size, size), np.uint8)
    s = size / 384
    cv2.ellipse(m, (size // 2, int(size / 2 + 10 * s)), (int(axes[0] * s), int(axes[1] * s)), 0, 0, 360, 1, -1)
    return m.astype(bool)


def _pixels(images: list[np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return comp.pixel_measures(np.stack(images), np.repeat(mask[None], len(images), axis=0))


# ---------------------------------------------------------------- the registry

def test_components_match_manifest_columns():
    assert comp.NAMES == columns.COMPONENTS
    for c in comp.COMPONENTS:
        assert c.column is columns.BY_NAME[c.name] and c.unit == c.column.unit and c.better == c.column.better
        assert c.better is not None and c.definition
    assert isinstance(comp.DEFINITION_VERSION, str) and comp.DEFINITION_VERSION == comp._definition_version()


# ---------------------------------------------------------------- head pose

@pytest.mark.parametrize("centre", [(S / 2, S / 2), (S / 2 + 40, S / 2 + 35)])
def test_in_plane_rotation_is_roll(centre):
    angles = np.arange(-40, 41, 10, dtype=np.float64)
    pts = np.stack([_rotate_in_plane(_frontal(centre=centre), a) for a in angles])
    yaw, pitch, roll = comp.head_pose(pts, S)
    np.testing.assert_allclose(roll, angles, atol=3)
    np.testing.assert_allclose(yaw, 0, atol=3)
    np.testing.assert_allclose(pitch, 0, atol=3)
    # clockwise on screen: the eye on the image's right ends up lower
    assert pts[-1, 1, 1] > pts[-1, 0, 1] and roll[-1] > 30


@pytest.mark.parametrize("focal", [S, 2 * S])  # the solver's camera, and a longer lens it does not assume
def test_projected_pose_grid_is_recovered(focal):
    grid = [(y, p) for y in range(-60, 61, 15) for p in range(-30, 31, 10)]
    pts = np.stack([_project(y, p, focal=focal) for y, p in grid])
    yaw, pitch, roll = comp.head_pose(pts.reshape(len(grid), 10).astype(np.float32), S)
    truth = np.array(grid, dtype=np.float64)
    np.testing.assert_allclose(yaw, truth[:, 0], atol=5)
    np.testing.assert_allclose(pitch, truth[:, 1], atol=5)
    np.testing.assert_allclose(roll, 0, atol=5)


def test_pose_sign_conventions():
    eyes_mouth = [0, 1, 3, 4]
    turned = _project(30, 0)  # the nose moves to the image's left of the eyes and mouth
    assert turned[2, 0] < turned[eyes_mouth, 0].mean() - 10
    up = _project(0, 20)  # the nose tip rises relative to the eyes and mouth
    assert up[2, 1] < _project(0, 0)[2, 1] - 10 and up[eyes_mouth, 1].mean() > _project(0, 0)[eyes_mouth, 1].mean()
    cw = _project(0, 0, 20)  # the eye on the image's right is lower
    assert cw[1, 1] > cw[0, 1] + 10
    yaw, pitch, roll = comp.head_pose(np.stack([turned, up, cw, _project(-30, -20, -20)]), S)
    assert yaw[0] > 25 and abs(pitch[0]) < 2
    assert pitch[1] > 15 and abs(yaw[1]) < 2
    assert roll[2] > 15 and abs(yaw[2]) < 2 and abs(pitch[2]) < 2
    assert yaw[3] < -25 and pitch[3] < -15 and roll[3] < -15


def test_pose_does_not_depend_on_where_the_face_sits_in_the_crop():
    pts = _project(35, -15, 10)
    shifted = np.stack([pts, pts + [50, -40], pts + [-60, 45]])
    yaw, pitch, roll = comp.head_pose(shifted, S)
    np.testing.assert_allclose(yaw, 35, atol=3)
    np.testing.assert_allclose(pitch, -15, atol=3)
    np.testing.assert_allclose(roll, 10, atol=3)


def test_noisy_landmarks_keep_the_sign_of_a_clear_turn():
    rng = np.random.default_rng(0)
    truth = np.repeat([[45, 0], [-45, 0], [0, 25], [0, -25]], 25, axis=0)
    pts = np.stack([_project(y, p) for y, p in truth]) + rng.normal(0, 1.5, (len(truth), 5, 2))
    yaw, pitch, _ = comp.head_pose(pts, S)
    assert (np.sign(yaw[:50]) == np.sign(truth[:50, 0])).all() and (np.sign(pitch[50:]) == np.sign(truth[50:, 1])).all()
    assert np.abs(yaw - truth[:, 0]).max() < 15 and np.abs(pitch - truth[:, 1]).max() < 15


# ---------------------------------------------------------------- source resolution and face size

def test_inter_eye_px_is_in_source_pixels():
    """The pipeline pads the source to a centred square of side max(w, h) and resizes it to 384:
    the same face drawn at 384 and at 96 source pixels has the same crop landmarks."""
    def crop_landmarks(eyes_src: np.ndarray, w: int, h: int) -> np.ndarray:
        side = max(w, h)
        pad = np.array([(side - w) // 2, (side - h) // 2])
        pts = np.zeros((5, 2))
        pts[:2] = (eyes_src + pad) * S / side
        pts[2:] = pts[:2].mean(0) + [[0, 40], [-30, 80], [30, 80]]
        return pts

    sources = [(384, 384), (96, 96), (384, 288), (96, 72)]  # w, h; the last two are landscape, padded
    lms, ws, hs = [], [], []
    for w, h in sources:
        k = w / 384
        eyes = np.array([[150.0, 170.0], [234.0, 170.0]]) * k - [0, (384 - h / k) / 2 * k]  # 84 px apart at 384
        lms.append(crop_landmarks(eyes, w, h))
        ws.append(w)
        hs.append(h)
    d = comp.inter_eye_px(np.stack(lms), np.array(ws), np.array(hs), S)
    np.testing.assert_allclose(d, [84, 21, 84, 21], rtol=1e-3)
    assert abs(d[0] / d[1] - 4) < 0.4 and abs(d[2] / d[3] - 4) < 0.4
    np.testing.assert_allclose(lms[0], lms[1])  # same crop landmarks, 4x the source pixels


def test_face_fraction_is_the_mask_bounding_box():
    masks = np.zeros((3, S, S), bool)
    masks[0, 100:200, 50:350] = True
    masks[1, 10, 20] = masks[1, 300, 330] = True  # two pixels span a 291 x 311 box
    masks[2] = _ellipse_mask()
    ff = comp.face_fraction(masks)
    box = cv2.boundingRect(masks[2].astype(np.uint8))
    np.testing.assert_allclose(ff, [100 * 300 / S**2, 291 * 311 / S**2, box[2] * box[3] / S**2], rtol=1e-6)
    assert ff.dtype == np.float32


# ---------------------------------------------------------------- sharpness and exposure

def test_blur_ladder_lowers_sharpness_strictly():
    face, mask = draw_face(S, seed=3), _ellipse_mask()
    ladder = [face] + [cv2.GaussianBlur(face, (0, 0), sigma) for sigma in (0.7, 1.2, 2, 3, 5, 8)]
    sharp = _pixels(ladder, mask)["sharpness"]
    assert np.all(np.diff(sharp) < 0), sharp


def test_sharpness_ignores_the_mask_outline():
    """Swapping the background (a hard edge against the face outline) barely moves sharpness."""
    face = cv2.GaussianBlur(draw_face(S, seed=5), (0, 0), 1.5)
    mask = _ellipse_mask()
    black, white = face.copy(), face.copy()
    black[~mask], white[~mask] = 0, 255
    sharp = _pixels([face, black, white], mask)["sharpness"]
    np.testing.assert_allclose(sharp[1:], sharp[0], rtol=0.02)


def test_darkening_and_brightening_move_exposure_measures():
    face, mask = draw_face(S, seed=7), _ellipse_mask()
    dark = _pixels([(face * k).astype(np.uint8) for k in (1.0, 0.8, 0.6, 0.4, 0.25, 0.1)], mask)
    assert np.all(np.diff(dark["luma_mean"]) < 0) and np.all(np.diff(dark["luma_std"]) < 0)
    assert np.all(np.diff(dark["under_exposed"]) >= 0) and dark["under_exposed"][-1] > dark["under_exposed"][0] + 0.5
    assert np.all(np.diff(dark["dynamic_range"]) < 0)
    bright = _pixels([np.clip(face * k, 0, 255).astype(np.uint8) for k in (1.0, 1.2, 1.5, 2.0, 3.0)], mask)
    assert np.all(np.diff(bright["luma_mean"]) > 0)
    assert np.all(np.diff(bright["over_exposed"]) >= 0) and bright["over_exposed"][-1] > bright["over_exposed"][0] + 0.5
    assert dark["over_exposed"][0] < 0.05 and dark["under_exposed"][0] < 0.05  # the drawn face is well exposed


def test_exposure_values_on_flat_patches():
    mask = _ellipse_mask()
    flat = [np.full((S, S, 3), v, np.uint8) for v in (0, 25, 26, 128, 246, 247, 255)]
    m = _pixels(flat, mask)
    np.testing.assert_allclose(m["luma_mean"], np.array([0, 25, 26, 128, 246, 247, 255]) / 255, atol=1e-6)
    np.testing.assert_array_equal(m["under_exposed"], [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(m["over_exposed"], [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(m["luma_std"], 0)
    np.testing.assert_array_equal(m["dynamic_range"], 0)
    np.testing.assert_array_equal(m["sharpness"], 0)
    primaries = [np.full((S, S, 3), rgb, np.uint8) for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    np.testing.assert_allclose(_pixels(primaries, mask)["luma_mean"], comp.LUMA_WEIGHTS, atol=0.5 / 255)  # BT.601, RGB
    halves = np.zeros((S, S, 3), np.uint8)
    halves[:, S // 2:] = 200  # two equally frequent levels: 1 bit
    assert _pixels([halves], np.ones((S, S), bool))["dynamic_range"][0] == pytest.approx(1.0)


# ---------------------------------------------------------------- missing inputs, dtypes, the batch entry point

def test_empty_masks_and_nan_landmarks_give_nan_float32():
    n = 4
    images = np.stack([draw_face(S, seed) for seed in range(n)])
    masks = np.repeat(_ellipse_mask()[None], n, axis=0)
    masks[1] = False  # the parser found no face pixels
    lm = np.repeat(_frontal()[None], n, axis=0).reshape(n, 10).astype(np.float32)
    lm[2, 0] = np.nan  # a landmark the detector did not give (an eye: no pose, no eye distance)
    lm[3] = np.linspace(100, 200, 10)  # collinear points: no pose
    out = comp.compute(images, masks, lm, np.full(n, 512), np.full(n, 400), S)
    assert list(out) == list(columns.COMPONENTS)
    for name, v in out.items():
        assert v.dtype == np.float32 and v.shape == (n,), name
    for name in comp.PIXEL:
        assert np.isnan(out[name][1]) and np.isfinite(out[name][[0, 2, 3]]).all(), name
    assert out["face_fraction"][1] == 0 and out["face_fraction"][0] > 0
    for name in comp.POSE:
        assert np.isnan(out[name][[2, 3]]).all() and np.isfinite(out[name][[0, 1]]).all(), name
    assert np.isnan(out["inter_eye_px"][2]) and np.isfinite(out["inter_eye_px"][[0, 1, 3]]).all()
    assert out["inter_eye_px"][0] == pytest.approx(np.linalg.norm(lm[0, 2:4] - lm[0, :2]) * 512 / S, rel=1e-5)


def test_empty_batch():
    out = comp.compute(np.zeros((0, S, S, 3), np.uint8), np.zeros((0, S, S), bool), np.zeros((0, 10), np.float32),
                       np.zeros(0, int), np.zeros(0, int), S)
    assert set(out) == set(columns.COMPONENTS) and all(v.shape == (0,) and v.dtype == np.float32 for v in out.values())


def test_compute_checks_the_crop_size():
    with pytest.raises(ValueError, match="crop_size"):
        comp.compute(np.zeros((1, 128, 128, 3), np.uint8), np.zeros((1, 128, 128), bool), np.zeros((1, 10)),
                     np.ones(1), np.ones(1), S)
