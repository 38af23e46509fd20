"""The optional scorers: MagFace (iResNet100 embedding norm), CR-FIQA (iResNet + quality head), SDD-FIQA
(TFace's IR-50 regressor), TOPIQ face (pyiqa's topiq_nr-face), MANIQA and MUSIQ (pyiqa's), loaded strictly
from synthetic checkpoints in the published layouts, and the FFHQ alignment."""

import os

import cv2
import numpy as np
import pytest
import torch

from cafi.config import WeightsConfig
from cafi.errors import WeightsError
from cafi.faces.align import FFHQ_BORDER_RGB, FFHQ_TEMPLATE_512, align_ffhq
from cafi.models import crfiqa, iresnet, magface, maniqa, musiq, sddfiqa, topiq
from cafi.models.registry import PUBLISHED, checkpoint, published
from cafi.samples import draw_face
from cafi.weights import Checkpoint, load_into, read_state_dict, sha256_of

CPU = torch.device("cpu")


def _ck(synth_dir, arch, model):
    """The stage's checkpoint for the synthetic file: the record's layout and renaming rules."""
    path = os.path.join(synth_dir, published(arch).file_name)
    return checkpoint(model, arch, WeightsConfig(uri=path, sha256=sha256_of(path), synthetic=True))


@pytest.fixture(scope="module")
def aligned112():
    return np.stack([cv2.resize(draw_face(384, s), (112, 112), interpolation=cv2.INTER_AREA) for s in range(2)])


@pytest.fixture(scope="module")
def magface_scorer(synth_dir):
    return magface.MagFaceScorer(_ck(synth_dir, "magface_iresnet100", "magface"), "/tmp", CPU)


# ------------------------------------------------------------------ MagFace

def test_magface_loads_the_published_layout_and_its_quality_is_the_raw_embedding_norm(
        synth_dir, magface_scorer, aligned112):
    raw = torch.load(os.path.join(synth_dir, PUBLISHED["magface_iresnet100"].file_name), weights_only=True)
    state = magface_scorer.net.state_dict()
    assert torch.equal(state["conv1.weight"], raw["state_dict"]["features.module.conv1.weight"])
    assert torch.equal(state["features.running_var"], raw["state_dict"]["features.module.features.running_var"])

    norm, quality, emb = magface_scorer(aligned112)
    assert norm.shape == quality.shape == (2,) and emb.shape == (2, 512)
    assert norm.dtype == quality.dtype == emb.dtype == np.float32
    # Reference: MagFace's preprocessing written out (BGR, /255, no mean) and the plain forward.
    x = torch.from_numpy(aligned112[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        ref = magface_scorer.net(x)
    np.testing.assert_allclose(norm, ref.norm(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_array_equal(quality, norm)
    np.testing.assert_allclose(emb, (ref / ref.norm(dim=1, keepdim=True)).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # a face scores the same alone as in a batch, and a tensor input is taken as is
    single = magface_scorer(torch.from_numpy(aligned112[1:2]))
    np.testing.assert_allclose(single[0], norm[1:2], rtol=1e-4)
    empty = magface_scorer(aligned112[:0])
    assert empty[0].shape == (0,) and empty[2].shape == (0, 512)


def test_magface_reads_the_dataparallel_layout_and_drops_either_margin_head(synth_dir, magface_scorer, tmp_path):
    """MagFace's DataParallel trainer saves `module.features.<k>` + `module.fc.weight`; its DDP trainer
    `features.module.<k>` + `parallel_fc.weight` (the published file). Both give the bare iResNet keys."""
    published_layout = torch.load(os.path.join(synth_dir, PUBLISHED["magface_iresnet100"].file_name),
                                  weights_only=True)["state_dict"]
    bare = {k.removeprefix("features.module."): v for k, v in published_layout.items() if k != "parallel_fc.weight"}
    dp = {f"module.features.{k}": v for k, v in bare.items()}
    dp["module.fc.weight"] = torch.zeros(10, 512)  # the margin head (classes x embedding)
    torch.save({"epoch": 25, "arch": "iresnet100", "state_dict": dp}, tmp_path / "dp.pth")
    rec = PUBLISHED["magface_iresnet100"]
    ck = Checkpoint("magface", str(tmp_path / "dp.pth"), sha256_of(str(tmp_path / "dp.pth")), rec.state_key,
                    strip_prefixes=rec.strip_prefixes, drop_prefixes=rec.drop_prefixes)
    renamed = read_state_dict(ck, ck.uri)
    assert list(renamed) == list(magface_scorer.net.state_dict())
    assert all(torch.equal(renamed[k], bare[k]) for k in bare)
    load_into(magface_scorer.net, ck, str(tmp_path))  # strict

    # anything beyond the backbone and the named heads still fails the strict load
    dp["module.features.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": dp}, tmp_path / "extra.pth")
    ck = Checkpoint("magface", str(tmp_path / "extra.pth"), sha256_of(str(tmp_path / "extra.pth")), "state_dict",
                    strip_prefixes=rec.strip_prefixes, drop_prefixes=rec.drop_prefixes)
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_into(magface_scorer.net, ck, str(tmp_path))


def test_ofiq_mapping_reproduces_ofiq_expected_results(magface_scorer, aligned112):
    # OFIQ data/tests/expected_results.csv: UnifiedQualityScore raw (the MagFace norm) -> scalar
    norms = np.array([24.329985, 26.449306, 16.142765, 13.334490, 27.733389])
    expected = [63, 79, 7, 2, 86]
    assert magface.ofiq_unified_quality(norms).tolist() == expected
    assert magface.ofiq_unified_quality(np.array([23.0]), round_to_int=False)[0] == pytest.approx(50.0)
    assert magface.ofiq_unified_quality(np.array([0.0, 1000.0])).tolist() == [0.0, 100.0]

    magface_scorer.ofiq_mapping = True
    try:
        norm, quality, _ = magface_scorer(aligned112)
    finally:
        magface_scorer.ofiq_mapping = False
    np.testing.assert_array_equal(quality, magface.ofiq_unified_quality(norm.astype(np.float64)).astype(np.float32))
    assert np.all(quality == np.round(quality)) and np.all((quality >= 0) & (quality <= 100))


def test_iresnet_depths_and_input_layout():
    assert len(iresnet.build(50).state_dict()) == 475  # MagFace's iresnet50, for completeness
    rec = PUBLISHED["magface_iresnet100"]
    assert rec.channel_order == "bgr" and rec.mean == (0, 0, 0) and rec.std == (1, 1, 1) and rec.input_size == 112
    assert rec.higher_is_better and rec.score_range == (10.0, 110.0)


# ------------------------------------------------------------------ CR-FIQA and SDD-FIQA

def _as_their_input(faces: np.ndarray) -> torch.Tensor:
    """CR-FIQA's QualityModel and TFace's eval.py, written out: RGB, / 255, - 0.5, / 0.5, NCHW."""
    return (torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def test_crfiqa_loads_the_published_layout_strictly_and_one_pass_gives_quality_and_embedding(
        synth_dir, aligned112):
    arch = "crfiqa_iresnet50"  # CR-FIQA(S): the iResNet100 variant loads in tests/test_specs.py (slow tier)
    scorer = crfiqa.CrFiqaScorer(arch, _ck(synth_dir, arch, "crfiqa"), "/tmp", CPU)
    raw = torch.load(os.path.join(synth_dir, PUBLISHED[arch].file_name), weights_only=True)
    state = scorer.net.state_dict()
    assert list(state) == list(raw) and all(torch.equal(v, raw[k]) for k, v in state.items())
    quality, emb = scorer(aligned112)
    assert quality.shape == (2,) and emb.shape == (2, 512) and quality.dtype == emb.dtype == np.float32
    with torch.inference_mode():
        ref_emb, ref_q = scorer.net(_as_their_input(aligned112))
    np.testing.assert_allclose(quality, ref_q.view(-1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(ref_emb, dim=1).numpy(), atol=1e-5)
    # the quality is the head on the same embedding, not a second pass
    np.testing.assert_allclose(quality, (ref_emb @ raw["qs.weight"].T + raw["qs.bias"]).view(-1).numpy(),
                               rtol=1e-4, atol=1e-5)
    assert [a.shape for a in scorer(aligned112[:0])] == [(0,), (0, 512)]
    # insightface's batch-norm eps, not MagFace's
    assert {m.eps for m in scorer.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {1e-5}


def test_sddfiqa_loads_the_dataparallel_layout_strictly_and_scores_as_tface(synth_dir, aligned112):
    ck = _ck(synth_dir, "sddfiqa_ir50", "sddfiqa")
    scorer = sddfiqa.SddFiqaScorer(ck, "/tmp", CPU)
    raw = torch.load(os.path.join(synth_dir, PUBLISHED["sddfiqa_ir50"].file_name), weights_only=True)
    state = scorer.net.state_dict()
    assert [f"module.{k}" for k in state] == list(raw)  # TFace's names and order, DataParallel's prefix
    assert all(torch.equal(v, raw[f"module.{k}"]) for k, v in state.items())
    scores = scorer(aligned112)
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.all(np.isfinite(scores))
    with torch.inference_mode():
        ref = scorer.net(_as_their_input(aligned112)).view(-1).numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5)
    assert len(scorer(aligned112[:0])) == 0


# ------------------------------------------------------------------ TOPIQ face

@pytest.mark.slow  # three ResNet-50 passes at 512x512 on the CPU
def test_topiq_face_loads_pyiqa_layout_strictly_and_is_batch_invariant(synth_dir):
    scorer = topiq.TopiqFaceScorer(_ck(synth_dir, "topiq_nr_face", "topiq_face"), "/tmp", CPU)
    raw = torch.load(os.path.join(synth_dir, PUBLISHED["topiq_nr_face"].file_name), weights_only=True)["params"]
    assert all(torch.equal(v, raw[k]) for k, v in scorer.net.state_dict().items())

    faces = np.stack([draw_face(512, s) for s in (3, 4)])
    scores = scorer(faces)
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.all(np.isfinite(scores))
    np.testing.assert_allclose(scorer(faces[1:2]), scores[1:2], rtol=1e-4, atol=1e-5)
    # pyiqa's preprocessing written out: RGB in [0, 1], ImageNet mean/std, no resize at 512
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(faces[:1]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.inference_mode():
        np.testing.assert_allclose(scorer.net(x).numpy(), scores[:1], rtol=1e-4, atol=1e-5)
    rec = PUBLISHED["topiq_nr_face"]
    assert rec.score_range == (0.0, 1.0) and rec.higher_is_better and rec.input_size == 512
    assert len(scorer(faces[:0])) == 0


def test_topiq_token_grid_follows_the_last_feature_map():
    """At 512 every level is pooled to layer4's 16x16 grid: 256 tokens per level, 5 levels."""
    net = topiq.build()
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for blk in net.sa_attn_blks]
    with torch.inference_mode():
        net(torch.zeros(1, 3, 64, 64))  # 64 -> layer4 2x2: pooled to 2x2 = 4 tokens
    for h in hooks:
        h.remove()
    assert seen == [(1, 4, 256)] * 5


# ------------------------------------------------------------------ MANIQA and MUSIQ

def test_maniqa_has_pyiqas_key_layout_at_the_published_size():
    """Built on the meta device (no memory, no init): the names and shapes pyiqa's KonIQ-10k file holds."""
    with torch.device("meta"):
        state = maniqa.build("maniqa_koniq").state_dict()
    assert len(state) == 316
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert list(shapes)[:3] == ["vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight"]
    assert shapes["vit.pos_embed"] == (1, 1 + 28 * 28, 768) and shapes["vit.patch_embed.proj.weight"] == (768, 3, 8, 8)
    assert shapes["vit.blocks.11.mlp.fc2.weight"] == (768, 3072) and shapes["vit.head.weight"] == (1000, 768)
    assert shapes["tablock1.1.c_v.weight"] == (784, 784)  # attention over the 28x28 tokens' axis
    assert shapes["conv1.weight"] == (768, 4 * 768, 1, 1) and shapes["conv2.weight"] == (384, 768, 1, 1)
    assert shapes["swintransformer1.downsample.weight"] == (768, 768, 3, 3)  # built, never called
    blk = "swintransformer1.layers.1.blocks.{}."
    assert shapes[blk.format(0) + "attn.relative_position_bias_table"] == (49, 4)  # (2*4-1)^2 offsets, 4 heads
    assert shapes[blk.format(0) + "attn.relative_position_index"] == (16, 16)
    assert shapes[blk.format(1) + "attn_mask"] == (49, 16, 16) and blk.format(0) + "attn_mask" not in shapes
    assert shapes["swintransformer2.layers.0.blocks.1.mlp.fc1.weight"] == (768, 384)  # dim_mlp 768 in both
    assert shapes["fc_score.3.weight"] == (1, 384) and shapes["fc_weight.0.weight"] == (384, 384)


def test_maniqa_crops_follow_pyiqas_uniform_grid():
    rows, cols = torch.meshgrid(torch.arange(384.0), torch.arange(384.0), indexing="ij")
    x = (rows * 1000 + cols).expand(2, 1, 384, 384)
    crops = maniqa.uniform_crops(x, 224, 20)
    assert crops.shape == (40, 1, 224, 224)
    # a 5x5 grid with step (384 - 224) // 4 = 40, the first 20 in row order; each image's crops together
    corners = [(40 * i, 40 * j) for i in range(5) for j in range(5)][:20]
    assert [(int(c[0, 0, 0]) // 1000, int(c[0, 0, 0]) % 1000) for c in crops[:20]] == corners
    assert torch.equal(crops[20:], crops[:20])
    small = maniqa.uniform_crops(torch.zeros(1, 3, 200, 300), 224, 1)  # shorter side <= 224: scaled to 225
    assert small.shape == (1, 3, 224, 224)


def test_maniqa_tiny_loads_its_synthetic_checkpoint_strictly_and_pools_its_crops(synth_dir):
    scorer = maniqa.ManiqaScorer(_ck(synth_dir, "maniqa_tiny", "maniqa"), "/tmp", CPU, arch="maniqa_tiny", crops=4)
    raw = torch.load(os.path.join(synth_dir, "maniqa_tiny.pth"), weights_only=True)
    assert all(torch.equal(v, raw[k]) for k, v in scorer.net.state_dict().items())
    mask = scorer.net.swintransformer1.layers[0].blocks[1].attn_mask  # 8x8 tokens, 4 windows, shift 2
    assert mask.shape == (4, 16, 16) and not mask[0].any() and set(mask[3].unique().tolist()) == {-100.0, 0.0}

    faces = np.stack([draw_face(128, s) for s in (5, 6)])
    scores = scorer(faces)
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.all(scores >= 0) and scores[0] != scores[1]
    np.testing.assert_allclose(scorer(faces[1:2]), scores[1:2], rtol=1e-5)
    # pyiqa's preprocessing written out: [0, 1], mean = std = 0.5, four 64-px crops on the grid
    x = (torch.from_numpy(faces[:1]).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    crops = torch.stack([x[0, :, t:t + 64, s:s + 64] for t in (0, 32) for s in (0, 32)])
    with torch.inference_mode():
        np.testing.assert_allclose(scorer.net(crops, 4).numpy(), scores[:1], rtol=1e-5)
    assert len(scorer(faces[:0])) == 0


def test_musiq_encodes_three_scales_with_hashed_positions_and_masks_the_padding():
    d = musiq.DIMS["musiq_koniq"]
    patches, spatial, scale, mask = musiq.multiscale_patches(torch.zeros(1, 3, 384, 384), d)
    assert patches.shape == (1, 49 + 144 + 144, 3, 32, 32) and bool(mask.all())
    assert torch.bincount(scale[0]).tolist() == [49, 144, 144]  # 224 (7x7), 384 (12x12), the original
    # a 7x7 patch grid hashed onto 10x10 by nearest neighbour: rows/cols 0,1,2,4,5,7,8
    assert spatial[0, :7].tolist() == [0, 1, 2, 4, 5, 7, 8] and spatial[0, 7] == 10
    wide = musiq.multiscale_patches(torch.zeros(2, 3, 268, 384), d)
    live = wide[3][0]
    # 224: 156x224 -> 5x7 of 49; 384: 268x384 -> 9x12 of 144; the original 9x12, all kept
    assert live.shape == (49 + 144 + 108,) and int(live.sum()) == 35 + 108 + 108
    assert not live[35:49].any() and not live[49 + 108:49 + 144].any()


def test_musiq_tiny_loads_its_synthetic_checkpoint_strictly_and_scores_any_size(synth_dir):
    scorer = musiq.MusiqScorer(_ck(synth_dir, "musiq_tiny", "musiq"), "/tmp", CPU, arch="musiq_tiny")
    raw = torch.load(os.path.join(synth_dir, "musiq_tiny.pth"), weights_only=True)
    assert all(torch.equal(v, raw[k]) for k, v in scorer.net.state_dict().items())
    faces = np.stack([draw_face(96, s) for s in (5, 6)])
    scores = scorer(faces)
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.all(np.isfinite(scores))
    assert scores[0] != scores[1]
    np.testing.assert_allclose(scorer(faces[1:2]), scores[1:2], rtol=1e-5, atol=1e-6)
    assert np.isfinite(scorer(faces[:1, :, :70])).all()  # non-square: padded tokens masked
    assert len(scorer(faces[:0])) == 0


# ------------------------------------------------------------------ FFHQ alignment

def test_align_ffhq_puts_the_landmarks_on_the_ffhq_template():
    angle, scale, shift = np.deg2rad(-9), 0.6, np.array([-40.0, -30.0])  # the face near the top left corner
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (FFHQ_TEMPLATE_512 @ rot.T) * scale + shift  # landmarks as found in a 384 crop
    img = np.zeros((1, 384, 384, 3), np.uint8)
    for x, y in src:
        cv2.circle(img[0], (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    out = align_ffhq(img, src[None].astype(np.float32))
    assert out.shape == (1, 512, 512, 3) and out.dtype == np.uint8
    for x, y in FFHQ_TEMPLATE_512:
        assert out[0, int(round(y)), int(round(x))].min() > 200
    # beyond the source image: facexlib's grey (BGR 135,133,132 in pyiqa's BGR warp), here in RGB
    assert out[0, 0, 0].tolist() == list(FFHQ_BORDER_RGB) == [132, 133, 135]
    assert out[0, -1, -1].tolist() == [0, 0, 0]  # inside the (black) source
    small = align_ffhq(img, src[None].astype(np.float32), size=256)
    for x, y in FFHQ_TEMPLATE_512 / 2:
        assert small[0, int(round(y)), int(round(x))].min() > 150
    skipped = align_ffhq(img, src[None].astype(np.float32), valid=np.array([False]))
    assert np.all(skipped == np.array(FFHQ_BORDER_RGB, np.uint8))


# ------------------------------------------------------------------ GPU fast paths

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU machine)")
def test_cuda_fast_paths_of_the_new_scorers_track_cpu_fp32(synth_dir, aligned112):
    """channels_last weights and inputs, fp16/bf16 autocast: the same scores as fp32 on the CPU."""
    gpu = torch.device("cuda")
    mck = _ck(synth_dir, "magface_iresnet100", "magface")
    ref_norm, _, ref_emb = magface.MagFaceScorer(mck, "/tmp", CPU)(aligned112)
    tck = _ck(synth_dir, "topiq_nr_face", "topiq_face")
    faces = np.stack([draw_face(512, s) for s in (3, 4)])
    ref_topiq = topiq.TopiqFaceScorer(tck, "/tmp", CPU)(faces)
    for precision, rtol in (("fp32", 1e-3), ("fp16", 0.03), ("bf16", 0.05)):
        norm, _, emb = magface.MagFaceScorer(mck, "/tmp", gpu, precision=precision)(aligned112)
        np.testing.assert_allclose(norm, ref_norm, rtol=rtol)
        assert np.all(np.sum(emb * ref_emb, axis=1) > 0.99)
        got = topiq.TopiqFaceScorer(tck, "/tmp", gpu, precision=precision)(torch.from_numpy(faces).to(gpu))
        np.testing.assert_allclose(got, ref_topiq, rtol=rtol, atol=rtol * 0.1)
