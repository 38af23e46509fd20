"""The four models: real facexlib/pyiqa-compatible architectures with synthetic checkpoints."""

import itertools
import math
import os

import cv2
import numpy as np
import pytest
import torch

from cafi.faces.align import ARCFACE_TEMPLATE_112, align_faces, similarity_transform
from cafi.models import arcface, bisenet, dbcnn, parsenet, serfiq
from cafi.models.face_parsing import FaceMasker, apply_mask
from cafi.models.registry import PUBLISHED, published
from cafi.models.retinaface import FaceDetector
from cafi.models.runtime import autocast, pick_device, to_input
from cafi.samples import draw_face
from cafi.weights import Checkpoint, sha256_of

CPU = torch.device("cpu")


def _ck(synth_dir, arch, model):
    path = os.path.join(synth_dir, PUBLISHED[arch].file_name)
    return Checkpoint(model, path, sha256_of(path), PUBLISHED[arch].state_key)


@pytest.fixture(scope="module")
def faces():
    return np.stack([draw_face(384, seed) for seed in range(3)])


# ------------------------------------------------------------------ SER-FIQ

class _FixedMaskDropout(torch.nn.Module):
    """nn.Dropout's training behaviour with a given keep mask (for replaying masks)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(1, *x.shape[1:]) / (1 - self.p)


def test_serfiq_head_only_equals_t_full_forward_passes_under_the_same_masks(synth_dir):
    samples, p = 6, 0.5
    model = serfiq.SerFiq(_ck(synth_dir, "arcface_ir_se50", "serfiq"), "/tmp", CPU, samples=samples, dropout=p, seed=3)
    aligned = np.stack([cv2.resize(draw_face(384, s), (112, 112)) for s in range(2)])
    raw, scaled, _ = model(aligned)

    # Reference: T complete forward passes of facexlib's Backbone, its Dropout replaced by each mask.
    net = model.net
    x = to_input(aligned, CPU, published("arcface_ir_se50")).contiguous()  # facexlib's Flatten uses view()
    original = net.output_layer[1]
    embs = []
    with torch.inference_mode():
        for t in range(samples):
            keep = model.masks[t].view(512, 7, 7)
            net.output_layer[1] = _FixedMaskDropout(keep, p)
            embs.append(net(x))
    net.output_layer[1] = original
    embs = torch.stack(embs, dim=1)  # (N, T, 512)
    for i in range(len(aligned)):
        dists = [torch.dist(embs[i, a], embs[i, b]).item() for a, b in itertools.combinations(range(samples), 2)]
        q = 2 / (1 + math.exp(np.mean(dists)))  # 2 * sigmoid(-mean distance)
        assert raw[i] == pytest.approx(q, abs=1e-5)
        assert scaled[i] == pytest.approx(1 / (1 + math.exp(-130 * (q - 0.88))), abs=1e-5)


def test_serfiq_is_deterministic_and_masks_follow_the_dropout_rate(synth_dir):
    ck = _ck(synth_dir, "arcface_ir_se50", "serfiq")
    aligned = np.stack([cv2.resize(draw_face(384, 7), (112, 112))] * 3)
    a = serfiq.SerFiq(ck, "/tmp", CPU, samples=10, seed=1)
    b = serfiq.SerFiq(ck, "/tmp", CPU, samples=10, seed=1)
    ra, _, _ = a(aligned)
    rb, _, plain = b(aligned, embeddings=True)
    assert np.array_equal(ra, rb)  # same seed, same score: re-scoring is reproducible
    assert ra[0] == ra[1] == ra[2]  # batch position does not matter
    masks = serfiq.dropout_masks(50, 0.3, seed=0)
    assert masks.shape == (50, 512 * 7 * 7)
    assert abs(1 - masks.mean().item() - 0.3) < 0.01
    # a plain embedding is L2-normalised and identical to facexlib's eval-mode forward
    emb = a.embed(aligned[:1])
    with torch.inference_mode():
        ref = a.net(to_input(aligned[:1], CPU, a.record).contiguous())
    assert torch.allclose(emb, ref, atol=1e-5)
    assert emb.norm(dim=1).item() == pytest.approx(1.0, abs=1e-5)
    # the embedding SER-FIQ returns comes from the same trunk pass, with dropout off: the same vector
    np.testing.assert_allclose(plain[:1], emb.numpy(), atol=1e-5)


def test_serfiq_quality_formula():
    e = torch.nn.functional.normalize(torch.randn(2, 5, 16), dim=2)
    q = serfiq.quality_from_embeddings(e)
    for i in range(2):
        d = torch.cdist(e[i], e[i])
        mean = d[torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)].mean()
        assert q[i].item() == pytest.approx(2 * torch.sigmoid(-mean).item(), abs=1e-5)
    identical = torch.nn.functional.normalize(torch.ones(1, 4, 8), dim=2)
    assert serfiq.quality_from_embeddings(identical).item() == pytest.approx(1.0, abs=1e-3)
    assert serfiq.rescale(np.array([0.88]), 130, 0.88)[0] == pytest.approx(0.5)


# ------------------------------------------------------------------ DBCNN

def test_dbcnn_matches_a_direct_bilinear_computation_and_takes_any_size(synth_dir):
    scorer = dbcnn.DbcnnScorer(_ck(synth_dir, "dbcnn", "dbcnn"), "/tmp", CPU)
    net = scorer.net
    for size in (256, 384):
        imgs = np.stack([draw_face(size, 1), draw_face(size, 2)])
        got = scorer(imgs)
        x = to_input(imgs, CPU, published("dbcnn"))
        with torch.inference_mode():
            a, b = net.features1(x), net.features2(x)
            assert a.shape[-2:] == b.shape[-2:] == (size // 16, size // 16)  # no resize anywhere
            ref = []
            for i in range(2):
                fa = a[i].reshape(512, -1)
                fb = b[i].reshape(128, -1)
                bil = (fa @ fb.T / fa.shape[1]).reshape(-1)
                bil = torch.sqrt(bil + 1e-8)
                bil = bil / bil.norm()
                ref.append((net.fc.weight @ bil + net.fc.bias).item())
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # input normalisation: RGB in [0, 1], ImageNet mean/std
    x = to_input(np.full((1, 2, 2, 3), 255, np.uint8), CPU, published("dbcnn"))
    expect = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expect), atol=1e-6)


# ------------------------------------------------------------------ detection + alignment

def test_detector_is_batch_invariant_and_returns_five_landmarks(synth_dir, faces):
    for arch in ("retinaface_mobile0.25", "retinaface_resnet50"):
        det = FaceDetector(arch, _ck(synth_dir, arch, "detector"), "/tmp", CPU)
        batch = det(faces)
        assert batch.score.shape == (3,) and batch.box.shape == (3, 4) and batch.landmarks.shape == (3, 5, 2)
        assert np.all((batch.score >= 0) & (batch.score <= 1))
        single = det(faces[1:2])
        np.testing.assert_allclose(single.score, batch.score[1:2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(single.landmarks, batch.landmarks[1:2], rtol=1e-3, atol=1e-2)


def test_retinaface_input_is_bgr_minus_the_channel_means():
    rgb = np.zeros((1, 1, 1, 3), np.uint8)
    rgb[0, 0, 0] = (10, 20, 30)
    x = to_input(rgb, CPU, published("retinaface_resnet50"))
    assert x[0, :, 0, 0].tolist() == pytest.approx([30 - 104, 20 - 117, 10 - 123], abs=1e-3)


def test_similarity_alignment_puts_landmarks_on_the_arcface_template():
    angle, scale, shift = np.deg2rad(12), 2.7, np.array([100.0, 80.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (ARCFACE_TEMPLATE_112 @ rot.T) * scale + shift  # landmarks as found in a 384 crop
    m = similarity_transform(src)
    mapped = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE_112, atol=1e-3)
    # dots drawn at the landmarks land on the template after warping
    img = np.zeros((1, 384, 384, 3), np.uint8)
    for x, y in src:
        cv2.circle(img[0], (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    out = align_faces(img, src[None].astype(np.float32), np.array([True]))
    assert out.shape == (1, 112, 112, 3)
    for x, y in ARCFACE_TEMPLATE_112:
        assert out[0, int(round(y)), int(round(x))].max() > 200
    assert align_faces(img, src[None].astype(np.float32), np.array([False]))[0].max() == 0


# ------------------------------------------------------------------ parsing + mask

def test_label_orders_differ_between_bisenet_and_parsenet():
    assert bisenet.LABELS.index("nose") == 10 and parsenet.LABELS.index("nose") == 2
    assert len(bisenet.LABELS) == len(parsenet.LABELS) == 19
    assert set(bisenet.LABELS) == set(parsenet.LABELS)


def test_bisenet_logits_equal_facexlib_main_output(synth_dir, faces):
    """cafi skips the two auxiliary heads; the main output must be facexlib's, bit for bit."""
    masker = FaceMasker("bisenet", _ck(synth_dir, "bisenet", "parser"), "/tmp", CPU, face_labels=["skin"],
                        fill=[0, 0, 0], input_size=128)
    x = to_input(faces[:2], CPU, masker.record)
    with torch.inference_mode():
        torch.testing.assert_close(bisenet.logits(masker.net, x), masker.net(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bisenet", pytest.param("parsenet", marks=pytest.mark.slow)])  # ParseNet ~10 s
def test_face_masker_masks_the_background_with_the_fill(synth_dir, faces, arch):
    masker = FaceMasker(arch, _ck(synth_dir, arch, "parser"), "/tmp", CPU, face_labels=["skin", "nose"],
                        fill=[7, 8, 9], input_size=256)  # the parser sees a 256 resize
    names = bisenet.LABELS if arch == "bisenet" else parsenet.LABELS
    assert masker.face_ids.tolist() == [names.index("skin"), names.index("nose")]
    mask = masker.masks(faces[:2])
    live, fraction = masker(faces[:2])
    assert np.array_equal(live.numpy(), mask)
    masked = apply_mask(faces[:2], live, [7, 8, 9], CPU).numpy()
    assert mask.shape == (2, 384, 384) and masked.shape == faces[:2].shape and masked.dtype == np.uint8
    np.testing.assert_allclose(fraction, mask.mean(axis=(1, 2)), atol=1e-6)
    assert np.all(masked[~mask] == np.array([7, 8, 9], np.uint8))
    assert np.array_equal(masked[mask], faces[:2][mask])


# ------------------------------------------------------------------ runtime

def test_cpu_never_autocasts_and_auto_device_needs_a_gpu():
    assert pick_device("auto", 0) == CPU
    if not torch.cuda.is_available():
        assert pick_device("auto", 1) == CPU  # a logical GPU on a CPU box still runs
        with pytest.raises(RuntimeError, match="models.device is cuda"):
            pick_device("cuda", 1)
    with autocast(CPU, "fp16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU machine)")
def test_cuda_half_precision_scores_track_fp32(synth_dir, faces):
    gpu = torch.device("cuda")
    ck = _ck(synth_dir, "dbcnn", "dbcnn")
    ref = dbcnn.DbcnnScorer(ck, "/tmp", gpu, precision="fp32")(faces)
    for precision in ("fp16", "bf16"):
        got = dbcnn.DbcnnScorer(ck, "/tmp", gpu, precision=precision)(faces)
        np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.05)
    assert isinstance(arcface.build(), torch.nn.Module)
