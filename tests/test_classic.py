"""The score-based FQA ("classic") classifier: its features, its model and its training math, on
constructed aligned faces (fast, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cafi.classic import features, fit, gist
from cafi.models import classic

try:
    from .classic_kit import LABELS, labelled_face, unit_vectors
except ImportError:  # pragma: no cover
    from classic_kit import LABELS, labelled_face, unit_vectors  # type: ignore[no-redef]


def grating(angle_deg: float, period: float = 8.0, size: int = 112) -> np.ndarray:
    """A grey sinusoidal grating whose stripes run at `angle_deg` (its wave vector at angle + 90)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = np.deg2rad(angle_deg + 90)
    return 127.5 + 100 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)


def orientation_energy(g: np.ndarray) -> np.ndarray:
    """GIST energy per orientation (summed over scales and blocks)."""
    return g.reshape(gist.SCALES, gist.ORIENTATIONS, -1).sum(axis=(0, 2))


def test_gist_responds_to_orientation_and_is_batched():
    g = gist.gist(np.stack([grating(0), grating(90), grating(45)]))
    assert g.shape == (3, gist.DIM) == (3, 512)
    peaks = [int(np.argmax(orientation_energy(v))) for v in g]
    # a quarter turn moves the peak by a quarter of the bank (8 orientations over 180 degrees: 4 apart)
    assert (peaks[0] - peaks[1]) % gist.ORIENTATIONS == 4
    assert (peaks[0] - peaks[2]) % gist.ORIENTATIONS in (2, 6)
    energy = orientation_energy(g[0])
    assert energy.max() > 3 * np.median(energy)
    # a uniform grating fills the 4x4 blocks evenly; one image's descriptor does not depend on the batch
    blocks = g[0].reshape(gist.SCALES * gist.ORIENTATIONS, 16)[np.argmax(g[0].reshape(-1, 16).sum(1))]
    assert blocks.std() < 0.2 * blocks.mean()
    np.testing.assert_allclose(gist.gist(grating(90)[None])[0], g[1], rtol=1e-4, atol=1e-6)


def test_lbp_histograms_match_a_per_cell_count():
    from skimage.feature import local_binary_pattern

    faces = np.stack([labelled_face("good", 3), labelled_face("bad", 4)])
    gray = features.luma(faces)
    got = features.lbp(gray)
    assert got.shape == (2, 49 * 59)
    codes = local_binary_pattern(np.rint(gray[1]).astype(np.uint8), 8, 2, method="nri_uniform")
    cell = codes[16:32, 32:48]  # grid cell (1, 2)
    want = np.bincount(cell.astype(int).ravel(), minlength=59) / cell.size
    np.testing.assert_allclose(got[1].reshape(49, 59)[1 * 7 + 2], want, atol=1e-6)
    np.testing.assert_allclose(got.reshape(2, 49, 59).sum(axis=2), 1.0, atol=1e-5)


def test_extract_gives_every_kind_and_checks_its_input():
    faces = np.stack([labelled_face("average", s) for s in range(2)])
    feats = features.extract(faces, unit_vectors(2, 0))
    assert list(feats) == list(features.KINDS) == ["gist", "cnn", "hog", "lbp"]
    assert {k: v.shape[1] for k, v in feats.items()} == features.DIMS
    assert features.DIMS["hog"] == 6084 and all(v.dtype == np.float32 for v in feats.values())
    with pytest.raises(ValueError, match="112x112"):
        features.extract(np.zeros((1, 96, 96, 3), np.uint8), unit_vectors(1, 0))
    with pytest.raises(ValueError, match="512"):
        features.extract(faces, np.zeros((2, 128), np.float32))


def test_split_is_stratified_and_keeps_groups_together():
    labels = np.repeat([0, 1, 2], [10, 20, 3])
    train, held = fit.split(labels, 0.2, seed=0)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(labels)
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 4, 1]
    groups = np.repeat(np.arange(11), 3)  # each group of 3 rows one class (labels above are by blocks)
    labels_g = np.repeat([0, 1, 2], [12, 12, 9])
    train, held = fit.split(labels_g, 0.3, seed=1, groups=groups)
    assert set(groups[train]).isdisjoint(groups[held]) and len(held) > 0
    assert not np.array_equal(fit.split(labels, 0.2, 0)[1], fit.split(labels, 0.2, 1)[1])


def test_score_is_good_plus_half_average():
    p = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(classic.score_of(p), [1.0, 0.5, 0.0, 0.45], atol=1e-6)
    assert classic.CLASSES == ("good", "average", "bad")


@pytest.fixture(scope="module")
def constructed():
    """40 aligned faces per class, their features (CNN: label-free unit vectors) and labels."""
    labels = np.repeat(np.arange(3), 40)
    faces = np.stack([labelled_face(LABELS[c], i) for i, c in enumerate(labels)])
    return features.extract(faces, unit_vectors(len(labels), 1)), labels


QUICK = fit.FitSettings(epochs_autoencoder=10, epochs_classifier=100, epochs_finetune=10)


def _held_out_accuracy(feats, labels, seed: int = 0) -> tuple[float, classic.ClassicFqa, np.ndarray]:
    train, held = fit.split(labels, 0.3, seed)
    net, history = fit.fit({k: v[train] for k, v in feats.items()}, labels[train], QUICK)
    assert history["autoencoder_hog"][-1] < history["autoencoder_hog"][0]  # the pretraining learns
    result = fit.evaluate(net, {k: v[held] for k, v in feats.items()}, labels[held])
    assert np.sum(result["confusion"]) == len(held) == result["rows"]
    return result["accuracy"], net, held


def test_classifier_learns_visible_quality_and_not_shuffled_labels(constructed):
    feats, labels = constructed
    accuracy, net, held = _held_out_accuracy(feats, labels)
    assert accuracy >= 0.8
    scores = classic.score_of(fit.predict(net, {k: v[held] for k, v in feats.items()}))
    by_class = [scores[labels[held] == c].mean() for c in range(3)]
    assert by_class[0] > by_class[1] > by_class[2]  # good > average > bad on the score too
    shuffled = np.random.default_rng(7).permutation(labels)
    control, _, _ = _held_out_accuracy(feats, shuffled)
    assert control <= 0.55  # chance is 1/3; 36 held-out rows


def test_checkpoint_round_trip_scores_the_same(tmp_path, constructed):
    from cafi.weights import Checkpoint, sha256_of

    feats, labels = constructed
    torch.manual_seed(3)
    net = classic.build()
    with torch.no_grad():
        for ae in net.kind_ae.values():
            ae.mean.normal_()
    path = tmp_path / "classic.pth"
    torch.save(classic.checkpoint_object(net, {"embedding_model": None}), path)
    ckpt = Checkpoint(model="classic", uri=str(path), sha256=sha256_of(str(path)), state_key="state_dict")
    scorer = classic.ClassicScorer(ckpt, str(tmp_path / "cache"), torch.device("cpu"))
    some = {k: v[:5] for k, v in feats.items()}
    np.testing.assert_allclose(scorer(some), classic.score_of(fit.predict(net, some)), atol=1e-6)
    torch.save({"state_dict": net.state_dict(), "meta": {"classes": ["a", "b", "c"]}}, path)
    ckpt = Checkpoint(model="classic", uri=str(path), sha256=sha256_of(str(path)), state_key="state_dict")
    with pytest.raises(Exception, match="not a classic FQA checkpoint"):
        classic.ClassicScorer(ckpt, str(tmp_path / "cache"), torch.device("cpu"))


def test_the_stage_scores_aligned_faces_with_the_runs_embedding(tmp_path):
    """The stage on a batch as the pipeline hands it (after the embedding source), with a checkpoint in
    the layout `cafi weights synth` writes; rows not in flight stay NaN."""
    from cafi.config import load_config
    from cafi.stages.classic import SPEC
    from cafi.synth import write_checkpoint
    from cafi.weights import sha256_of

    path = write_checkpoint("classic_fqa", str(tmp_path))
    cfg = load_config([], ["input.uri=/in", "output.uri=/out", "output.embeddings=true", "models.fiqa.also=[classic]",
                           "models.detector.align=none", f"models.classic.weights.uri={path}",
                           f"models.classic.weights.sha256={sha256_of(path)}", f"models.cache_dir={tmp_path / 'c'}"])
    stage = SPEC.stage(SPEC, cfg)
    crops = np.stack([labelled_face(LABELS[i % 3], i, 128) for i in range(4)])
    emb = unit_vectors(4, 2).astype(np.float16)
    batch = {"uri": np.array([f"u{i}" for i in range(4)], object), "image": crops,
             "status": np.array(["ok", "ok", "no_face", "ok"], object), "embedding": emb}
    out = stage(batch)["classic"]
    live = out[[0, 1, 3]]
    assert np.isnan(out[2]) and np.isfinite(live).all() and ((live >= 0) & (live <= 1)).all()
    from cafi.classic.features import extract
    from cafi.faces.align import resize_aligned

    want = stage.model(extract(resize_aligned(crops[[0, 1, 3]]), emb[[0, 1, 3]].astype(np.float32)))
    np.testing.assert_allclose(out[[0, 1, 3]], want, atol=1e-6)


# ---------------------------------------------------------------- the command on a committed run


@pytest.mark.slow
def test_train_classic_on_a_committed_run(tmp_path, ray_local, capsys):
    """`cafi train classic` on a committed run of constructed crops (faces re-aligned from the stored
    landmarks, embeddings from the run): held-out accuracy, the outputs, and the checkpoint the scorer loads."""
    import json

    import cv2
    import yaml

    from cafi.cli import main
    from cafi.decision import OK
    from cafi.faces.align import ARCFACE_TEMPLATE_112
    from cafi.weights import Checkpoint, sha256_of

    try:
        from .test_report import decision_cfg, embedding_array, scored_table, write_run
    except ImportError:  # pragma: no cover
        from test_report import decision_cfg, embedding_array, scored_table, write_run  # type: ignore

    per, run_id = 30, "20250101T000000Z-c1a551"
    labels = [LABELS[i % 3] for i in range(3 * per)]
    uris = []
    for i, lab in enumerate(labels):
        path = tmp_path / f"crop{i}.png"
        cv2.imwrite(str(path), labelled_face(lab, i, 128)[..., ::-1])
        uris.append(str(path))
    n = len(uris)
    marks = np.tile((ARCFACE_TEMPLATE_112 * 384 / 112).ravel(), (n, 1)).astype(np.float32)  # the whole crop
    cfg = decision_cfg(min_serfiq=0.0)
    values = {"uri": uris, "status": [OK] * n, "serfiq": np.full(n, 0.9), "landmarks": list(marks),
              "embedding": embedding_array(unit_vectors(n, 4), valid=np.arange(n) != 5)}  # row 5: no embedding
    run = write_run(str(tmp_path / "out"), scored_table(values, cfg, run_id, "v1"), run_id, cfg, files=2)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,quality\n" + "".join(f"{u},{lab.upper()}\n" for u, lab in zip(uris, labels, strict=True))
                        + f"{tmp_path / 'elsewhere.png'},good\n")
    out = tmp_path / "model"
    assert main(["train", "classic", str(csv_path), "--run", run, "--out", str(out), "--uri-column", "path",
                 "--label-column", "quality", "--heldout", "0.3", "--epochs-autoencoder", "10",
                 "--epochs-classifier", "100", "--epochs-finetune", "10"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "train.json").read_text())
    assert doc["rows"]["labelled"] == n + 1 and doc["rows"]["used"] == n - 1 and doc["rows"]["not_found"] == 2
    split = doc["split"]
    assert split["heldout_rows"] + split["train_rows"] == n - 1 and split["heldout_rows"] == 27  # 9 of 29, 30, 30
    assert doc["heldout_accuracy"] >= 0.8 and "held-out accuracy" in printed
    assert np.sum(doc["heldout"]["confusion"]) == 27
    block = yaml.safe_load((out / "classic.yaml").read_text())["models"]["classic"]["weights"]
    assert block["sha256"] == sha256_of(str(out / "classic.pth")) and block["uri"].endswith("classic.pth")
    html = (out / "train.html").read_text()
    assert html.count("<svg") == 2 and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    ckpt = Checkpoint(model="classic", uri=block["uri"], sha256=block["sha256"], state_key="state_dict",
                      strip_prefixes=())
    scorer = classic.ClassicScorer(ckpt, str(tmp_path / "cache"), torch.device("cpu"))
    assert scorer.meta["run_id"] == run_id and scorer.meta["features"]["gist"]["orientations"] == 8
    faces = np.stack([cv2.resize(labelled_face(lab, i, 128), (112, 112), interpolation=cv2.INTER_AREA)
                      for i, lab in enumerate(labels[:6])])
    scores = scorer(features.extract(faces, unit_vectors(n, 4)[:6]))
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 1)).all()


def test_labels_csv_columns_are_configurable_and_bad_rows_name_their_line(tmp_path):
    from cafi.errors import CafiError
    from cafi.train.classic import read_class_labels

    path = tmp_path / "labels.csv"
    path.write_text("file,grade,person\na.png, Good ,p1\nb.png,BAD,\nc.png,average,p2\n")
    t = read_class_labels(str(path), None, uri_column="file", label_column="grade", identity_column="person")
    assert t.to_pydict() == {"uri": ["a.png", "b.png", "c.png"], "label": [0, 2, 1], "identity": ["p1", None, "p2"]}
    with pytest.raises(CafiError, match="no 'label' column .*--label-column"):
        read_class_labels(str(path), None, uri_column="file")
    path.write_text("uri,label\na.png,good\nb.png,blurry\n")
    with pytest.raises(CafiError, match="line 3: label 'blurry' is not one of good, average, bad"):
        read_class_labels(str(path), None)
    path.write_text("uri,label\na.png,good\na.png,bad\n")
    with pytest.raises(CafiError, match="line 3: a.png is labelled twice"):
        read_class_labels(str(path), None)


def test_preflight_refuses_embeddings_of_another_recognizer(tmp_path):
    from cafi import preflight
    from cafi.config import load_config
    from cafi.errors import ConfigError
    from cafi.weights import sha256_of

    def cfg_for(recognizer_sha: str, trained: dict | None):
        path = tmp_path / f"classic-{recognizer_sha[0]}-{trained is None}.pth"
        torch.save(classic.checkpoint_object(classic.build(), {"embedding_model": trained}), path)
        return load_config([], ["input.uri=/in", "output.uri=/out", "output.embeddings=true",
                                "models.fiqa.also=[classic]", "models.serfiq.weights.uri=/w/arcface.pth",
                                f"models.serfiq.weights.sha256={recognizer_sha}", f"models.classic.weights.uri={path}",
                                f"models.classic.weights.sha256={sha256_of(str(path))}",
                                f"models.cache_dir={tmp_path / 'c'}"])

    trained = {"stage": "serfiq", "arch": "arcface_ir_se50", "sha256": "1" * 64}
    preflight.check_recognizer(cfg_for("1" * 64, trained))  # the same recognizer
    preflight.check_recognizer(cfg_for("2" * 64, None))  # a checkpoint that records none
    with pytest.raises(ConfigError, match=r"models.classic.weights: trained on embeddings of serfiq .*1111.*but this "
                                          r"run's embedding comes from serfiq arcface_ir_se50 \(sha256 2222"):
        preflight.check_recognizer(cfg_for("2" * 64, trained))
