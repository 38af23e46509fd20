"""Training the SDD-FIQA regressor (`cafi train sddfiqa` without --labels-only): the held-out split, the
reduced net's layout and the published file layout (fast), and one real Ray Train training on constructed
crops whose visible degradation (noise) follows the hidden quality that drives the embeddings, killed
once a checkpoint is registered and resumed (slow, one module fixture)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from cafi.cli import main
from cafi.decision import OK
from cafi.faces.align import ARCFACE_TEMPLATE_112
from cafi.models import sddfiqa
from cafi.models.registry import published
from cafi.samples import draw_face
from cafi.train import sdd_fit
from cafi.train.faces import to_input
from cafi.train.split import split_identities
from cafi.weights import Checkpoint, build_loaded, load_into, sha256_of

try:  # tests/ is a package here; still importable if it is not
    from .test_edc import identity_set
    from .test_report import decision_cfg, embedding_array, scored_table, write_run
except ImportError:  # pragma: no cover
    from test_edc import identity_set  # type: ignore[no-redef]
    from test_report import decision_cfg, embedding_array, scored_table, write_run  # type: ignore

RUN_ID = "20250101T000000Z-7a11e0"
TINY = {"width": 8, "units": (1, 1, 1, 1)}


def test_heldout_split_is_by_identity_seeded_and_never_everything():
    ids = np.repeat([f"p{i}" for i in range(40)], 3)
    a, b, c = (split_identities(ids, 0.25, s) for s in (1, 1, 2))
    assert a == b and a != c and len(a) == 10 and a <= set(ids)
    assert len(split_identities(ids[:6], 0.9, 0)) == 1  # two identities: one held out, one trained
    with pytest.raises(ValueError, match="2 identities"):
        split_identities(ids[:3], 0.5, 0)


def test_the_default_net_is_the_published_layout_and_the_reduced_one_keeps_its_names():
    full = sddfiqa.build()
    tiny = sddfiqa.build(**TINY)
    assert full.quality[3].in_features == sddfiqa.FEATURES and len(full.body) == sum(sddfiqa.IR50_UNITS)
    names = {k.split(".", 1)[0] for k in tiny.state_dict()}
    assert names == {"input_layer", "quality", "body"}
    assert tiny(torch.zeros(2, 3, 112, 112)).shape == (2, 1)


def test_the_learning_rate_decays_from_lr_to_a_twentieth():
    lrs = [sdd_fit.epoch_lr(0.01, e, 10) for e in range(10)]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] > 0.0005 and sdd_fit.epoch_lr(0.01, 10, 10) == pytest.approx(0.0005)


def test_flips_mirror_about_half_the_faces():
    torch.manual_seed(0)
    img = torch.arange(64 * 4 * 4 * 3, dtype=torch.uint8).reshape(64, 4, 4, 3)
    x = to_input(img, flip=True)
    plain = to_input(img, flip=False)
    mirrored = [bool(torch.equal(x[i], plain[i].flip(-1))) for i in range(64)]
    assert 16 < sum(mirrored) < 48 and all(torch.equal(x[i], plain[i]) for i in range(64) if not mirrored[i])
    assert plain.min() >= -1 and plain.max() <= 1


# ---------------------------------------------------------------- the command on a committed run


SEED = 1        # the split, the labels' draws and the net's initialisation
EPOCHS = 10
SIZE = 128      # the constructed crops' side


def degrade(img: np.ndarray, q: float, k: int) -> np.ndarray:
    """The visible degradation of a crop of hidden quality q (0 worst, 1 clean): sensor noise of sd
    40 * (1 - q) levels. Noise alone: mixing in blur and down-scaling (which take high frequencies away
    where noise adds them) made the tiny net's held-out SRCC swing from 0.62 to 0.95 with the seed at
    this size, random kinds per crop were not learned at all; noise alone gave 0.75-0.93 (seeds 1-6)."""
    return np.clip(img + np.random.default_rng(k).normal(0, 40 * (1.0 - q), img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """A committed run of 36 identities x 5 crops: each crop is its identity's drawn face degraded with
    strength 1 - q (`degrade`), and its stored embedding's genuine similarity falls with the same hidden q."""
    root = tmp_path_factory.mktemp("sddtrain")
    emb, ids, q, _ = identity_set(n_ids=36, per=5, seed=3, sigma=2.0, power=1.0)
    uris = []
    for k, (ident, qk) in enumerate(zip(ids, q, strict=True)):
        img = degrade(draw_face(SIZE, seed=int(ident.split("-")[1])), qk, k)
        path = root / f"crop{k}.png"
        cv2.imwrite(str(path), img[..., ::-1])
        uris.append(str(path))
    n = len(uris)
    # The run's crops are decoded at the default 384 px: these landmarks align the whole crop (ArcFace template).
    marks = np.tile((ARCFACE_TEMPLATE_112 * 384 / 112).ravel(), (n, 1)).astype(np.float32)
    cfg = decision_cfg(min_serfiq=0.0)
    values = {"uri": uris, "status": [OK] * n, "serfiq": q, "embedding": embedding_array(emb),
              "landmarks": list(marks)}
    run = write_run(str(root / "out"), scored_table(values, cfg, RUN_ID, "v1"), RUN_ID, cfg, files=2)
    ids_csv = root / "ids.csv"
    ids_csv.write_text("uri,identity\n" + "".join(f"{u},{i}\n" for u, i in zip(uris, ids, strict=True)))
    return {"run": run, "ids": str(ids_csv), "q": dict(zip(uris, q, strict=True)), "identities": ids,
            "root": root}


def _registered_epochs(out) -> list[int]:
    """Epochs whose checkpoint Ray Train has registered (what a restart restores from): its checkpoint
    manager's snapshot under DIR/ray. Empty while there is none, or while it is being rewritten."""
    try:
        snap = json.loads((out / "ray" / sdd_fit.RUN_NAME / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(r["metrics"]["epoch"]) for r in snap.get("checkpoint_results", [])]


@pytest.fixture(scope="module")
def trained(crop_run, ray_local):
    """The command killed (SIGKILL to its process group: the driver, its Ray and the training worker) once
    Ray Train has registered a checkpoint, then run again on the same --out, resuming. What the second
    run wrote is kept for the tests (read once)."""
    import contextlib
    import io
    import os
    import signal
    import subprocess
    import sys
    import time

    out = crop_run["root"] / "model"
    argv = ["train", "sddfiqa", crop_run["run"], "--identities", crop_run["ids"], "--out", str(out),
            "--batch-size", "8", "--lr", "0.003", "--heldout", "0.25", "--seed", str(SEED),
            "--width", str(TINY["width"]), "--units", ",".join(map(str, TINY["units"])), "--epochs", str(EPOCHS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    killed = subprocess.Popen([sys.executable, "-m", "cafi.cli", *argv], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not _registered_epochs(out) and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        registered = _registered_epochs(out)
        assert killed.poll() is None, f"training ended before it was killed: {killed.stderr.read()[-3000:]!r}"
        assert registered, "no checkpoint registered within 600 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        killed.stderr.close()
    labels_written = (out / "labels.parquet").stat().st_mtime_ns
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {"out": out, "registered_at_kill": registered, "labels_written": labels_written,
            "doc": json.loads((out / "train.json").read_text()), "printed": printed.getvalue()}


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_checkpoint(trained):
    doc = trained["doc"]
    assert [e["epoch"] for e in doc["epochs"]] == list(range(1, EPOCHS + 1))
    # the killed start ran epochs 1..k; the second start ran only the rest, from the checkpoint of epoch k
    attempts = [e["attempt"] for e in doc["epochs"]]
    k = attempts.count(0)
    assert attempts == [0] * k + [1] * (EPOCHS - k), attempts
    assert 1 <= k < EPOCHS and k >= max(trained["registered_at_kill"]), (attempts, trained["registered_at_kill"])
    assert doc["training"]["epochs_done"] == EPOCHS and "held-out SRCC" in trained["printed"]
    # the labels the killed start wrote were trained on again, not recomputed
    assert (trained["out"] / "labels.parquet").stat().st_mtime_ns == trained["labels_written"]
    assert np.isfinite([e["heldout_srcc"] for e in doc["epochs"]]).all()


@pytest.mark.slow
def test_training_learns_the_visible_quality(trained, crop_run, tmp_path):
    """The held-out identities' faces (never trained on) are ranked as the hidden quality ranks them,
    by the weights as the sddfiqa stage would load them."""
    out, doc = trained["out"], trained["doc"]
    assert doc["init"]["source"] == "random" and "random initialisation" in doc["init"]["note"]
    assert doc["split"]["heldout_identities"] == 9 and doc["labels"]["labelled"] == 180
    block = yaml.safe_load((out / "sddfiqa.yaml").read_text())["models"]["sddfiqa"]["weights"]
    assert block["sha256"] == sha256_of(str(out / "sddfiqa.pth")) and block["uri"].endswith("sddfiqa.pth")
    rec = published("sddfiqa_ir50")
    raw = torch.load(out / "sddfiqa.pth", weights_only=True)
    assert all(k.startswith("module.") for k in raw)  # the published DataParallel layout
    ck = Checkpoint(model="sddfiqa", uri=block["uri"], sha256=block["sha256"], state_key=rec.state_key,
                    strip_prefixes=rec.strip_prefixes, drop_prefixes=rec.drop_prefixes)
    net = load_into(sddfiqa.build(**TINY), ck, str(tmp_path / "cache"))  # strict: every key, every shape
    held = split_identities(crop_run["identities"], 0.25, SEED)
    uris = [u for u, i in zip(crop_run["q"], crop_run["identities"], strict=True) if i in held]
    assert len(uris) == 45
    faces = np.stack([cv2.resize(cv2.imread(u)[..., ::-1], (112, 112), interpolation=cv2.INTER_AREA) for u in uris])
    with torch.inference_mode():
        pred = net(to_input(torch.from_numpy(faces), flip=False)).view(-1).numpy()
    assert spearmanr(pred, [crop_run["q"][u] for u in uris]).statistic >= 0.6


@pytest.mark.slow
def test_training_writes_its_page_and_the_heldout_identities_for_eval(trained, crop_run):
    from cafi.eval_inputs import read_identities

    out, doc = trained["out"], trained["doc"]
    html = (out / "train.html").read_text()
    assert html.count("<svg") == 4 and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    ids = read_identities(str(out / "heldout.csv"))  # the `cafi eval --identities` reader
    held = split_identities(crop_run["identities"], 0.25, SEED)
    want = {u: i for u, i in zip(crop_run["q"], crop_run["identities"], strict=True) if i in held}
    assert dict(zip(ids["uri"].to_pylist(), ids["identity"].to_pylist(), strict=True)) == want
    assert doc["split"]["heldout_rows"] == len(want) and doc["split"]["heldout_csv"].endswith("heldout.csv")


def test_the_published_layout_written_by_training_loads_into_the_stage(tmp_path):
    """What training writes for the default net (a `module.` prefixed state dict) loads strictly into the
    sddfiqa stage's IR-50 with the record's layout."""
    from cafi.train.sddfiqa import published_state

    path = tmp_path / "sddfiqa.pth"
    torch.save(published_state(sddfiqa.build().state_dict()), path)
    rec = published("sddfiqa_ir50")
    ck = Checkpoint(model="sddfiqa", uri=str(path), sha256=sha256_of(str(path)), state_key=rec.state_key,
                    strip_prefixes=rec.strip_prefixes, drop_prefixes=rec.drop_prefixes)
    net = build_loaded(sddfiqa.build, ck, str(tmp_path / "cache"))
    assert isinstance(net, sddfiqa.SddFiqaNet)


def test_training_starts_from_init_else_the_configured_weights_else_says_random(tmp_path):
    from cafi.train.sddfiqa import _init_state, published_state

    net = sddfiqa.build(**TINY)
    path = tmp_path / "start.pth"
    torch.save(published_state(net.state_dict()), path)
    state, doc = _init_state(str(path), {}, TINY["width"], TINY["units"], str(tmp_path / "c"), None)
    assert doc["source"] == "--init" and doc["sha256"] == sha256_of(str(path))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    summary = {"config": {"models": {"sddfiqa": {"weights": {"uri": str(path), "sha256": doc["sha256"]}}}}}
    state, doc = _init_state(None, summary, TINY["width"], TINY["units"], str(tmp_path / "c"), None)
    assert doc["source"] == "the run's models.sddfiqa.weights" and torch.equal(state["body.0.res_layer.1.weight"],
                                                                                 net.state_dict()["body.0.res_layer.1.weight"])
    state, doc = _init_state(None, {}, TINY["width"], TINY["units"], str(tmp_path / "c"), None)
    assert state is None and doc["source"] == "random" and "random initialisation" in doc["note"]
    with pytest.raises(Exception, match="does not fit the architecture"):
        _init_state(str(path), {}, 16, TINY["units"], str(tmp_path / "c"), None)  # strict: a wrong shape is refused


# ---------------------------------------------------------------- the MANIQA backbone (--backbone maniqa)

@pytest.fixture
def one_thread():
    """Toy-width nets are many tiny ops: one torch thread runs them several times faster than two on a
    shared box (the threads' hand-offs cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _faces112(n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([cv2.resize(draw_face(128, s), (112, 112), interpolation=cv2.INTER_AREA)
                                      for s in range(n)]))


def test_the_maniqa_backbone_is_a_maniqa_checkpoint_whose_score_head_regresses_the_labels(one_thread):
    import torch.nn.functional as F

    from cafi.models import maniqa

    torch.manual_seed(0)
    net = sdd_fit.build_net({"backbone": "sddfiqa_maniqa_tiny"})
    assert isinstance(net, maniqa.FaceRegressor)
    assert list(net.state_dict()) == list(maniqa.build("maniqa_tiny").state_dict())  # MANIQA's own keys
    x = to_input(_faces112(4), flip=False)
    with torch.inference_mode():  # the face scaled to one crop, through MANIQA's weighted score head
        one_crop = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(net(x).numpy(), maniqa.MANIQA.forward(net, one_crop, 1).numpy(), rtol=1e-6)
    target = torch.tensor([15.0, 40.0, 65.0, 90.0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    for _ in range(10):
        loss = F.smooth_l1_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        if not losses:  # the whole network learns, from the patch embedding to the score head
            assert net.vit.patch_embed.proj.weight.grad.abs().sum() > 0
            assert net.fc_score[3].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_what_maniqa_backbone_training_writes_loads_into_the_sddfiqa_stage(tmp_path, one_thread):
    """Training saves the regressor's bare state dict (MANIQA's layout); models.sddfiqa.arch
    sddfiqa_maniqa(_tiny) loads it strictly and scores the aligned faces as the trained net does."""
    from cafi.config import load_config
    from cafi.models import maniqa
    from cafi.stages.specs import spec

    net = sdd_fit.build_net({"backbone": "sddfiqa_maniqa_tiny"})
    path = tmp_path / "sddfiqa.pth"
    torch.save(net.state_dict(), path)
    cfg = load_config([], ["input.uri=/in", "output.uri=/out", "models.fiqa.kind=sddfiqa",
                           "models.sddfiqa.arch=sddfiqa_maniqa_tiny", f"models.sddfiqa.weights.uri={path}",
                           f"models.sddfiqa.weights.sha256={sha256_of(str(path))}",
                           f"models.cache_dir={tmp_path / 'cache'}"])
    s = spec("sddfiqa")
    stage = s.stage(s, cfg, load=True)
    assert isinstance(stage.model, maniqa.FaceRegressorScorer)
    faces = _faces112(3)
    with torch.inference_mode():
        ref = net(to_input(faces, flip=False)).numpy()
    np.testing.assert_allclose(stage.model(faces.numpy()), ref, rtol=1e-5)


def test_the_maniqa_backbone_starts_from_init_else_the_runs_maniqa_weights_else_random(tmp_path):
    from cafi.train.sddfiqa import _maniqa_init

    arch = "sddfiqa_maniqa_tiny"
    net = sdd_fit.build_net({"backbone": arch})
    path = tmp_path / "start.pth"
    torch.save(net.state_dict(), path)
    digest = sha256_of(str(path))
    state, doc = _maniqa_init(str(path), {}, arch, str(tmp_path / "c"), None)
    assert doc["source"] == "--init" and all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    iqa = {"arch": "maniqa_tiny", "weights": {"uri": str(path), "sha256": digest}}  # the IQA kind's MANIQA
    state, doc = _maniqa_init(None, {"config": {"models": {"maniqa": iqa}}}, arch, str(tmp_path / "c"), None)
    assert doc["source"] == "the run's models.maniqa.weights" and state is not None
    synthetic = {"maniqa": {**iqa, "weights": {**iqa["weights"], "synthetic": True}}}
    other = {"maniqa": {**iqa, "arch": "maniqa_koniq"}}  # the published size does not fit the tiny net
    for models in (synthetic, other):
        state, doc = _maniqa_init(None, {"config": {"models": models}}, arch, str(tmp_path / "c"), None)
        assert state is None and doc["source"] == "random" and "MANIQA's KonIQ-10k" in doc["note"]

