"""`cafi eval` on a labelled set built here: degradation ladders of the same crops, where the order is known."""

from __future__ import annotations

import csv
import json
import math
import os

import cv2
import numpy as np
import pytest
import scipy.stats

from cafi import evaluate
from cafi.cli import main
from cafi.errors import CafiError
from cafi.samples import draw_face, encode
from cafi.stages import ERROR, NO_FACE, OK

try:  # tests/ is a package here; still importable if it is not
    from .test_report import decision_cfg, scored_table, write_run
except ImportError:  # pragma: no cover
    from test_report import decision_cfg, scored_table, write_run  # type: ignore[no-redef]

FACES = 8
LEVELS = 6
BLUR_SIGMA = (0.0, 0.8, 1.6, 2.4, 3.2, 4.8)
JPEG_QUALITY = (95, 50, 25, 12, 6, 2)
ACCEPT_MAX_LEVEL = 2          # the human keeps levels 0..2 of every ladder
RUN = "20250101T000000Z-1abe15"


def degrade_to(img: np.ndarray, kind: str, level: int) -> np.ndarray:
    if kind == "blur":
        s = BLUR_SIGMA[level]
        return img.copy() if s == 0 else cv2.GaussianBlur(img, (0, 0), s)
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY[level]])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def sharpness(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64), cv2.CV_64F).var())


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """Crops, their MOS and human decisions, and a committed run with scores monotone in the ladder."""
    root = tmp_path_factory.mktemp("ladder")
    rng = np.random.default_rng(7)
    rows = []
    for face in range(FACES):
        clean = draw_face(128, 100 + face)
        for kind in ("blur", "jpeg"):
            imgs = [degrade_to(clean, kind, lv) for lv in range(LEVELS)]
            # The ladder really is ordered: sharpness falls with blur, error grows as JPEG quality falls.
            if kind == "blur":
                sharp = [sharpness(i) for i in imgs]
                assert all(a > b for a, b in zip(sharp, sharp[1:], strict=False)), sharp
            else:
                err = [float(np.abs(i.astype(float) - clean.astype(float)).mean()) for i in imgs]
                assert all(a < b for a, b in zip(err, err[1:], strict=False)), err
            for level, img in enumerate(imgs):
                path = root / "crops" / kind / f"face{face}_level{level}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode(img, "PNG"))
                mos = round(4.6 - 0.75 * level + 0.02 * face - (0.11 if kind == "jpeg" else 0.0), 4)
                rows.append({"uri": str(path), "kind": kind, "face": face, "level": level, "mos": mos,
                             "accept": level <= ACCEPT_MAX_LEVEL})
    # Scores: SER-FIQ a monotone function of the MOS plus a little noise; DBCNN monotone in the level
    # of each ladder but with a large per-face offset (a weaker correlate of the MOS).
    for r in rows:
        r["serfiq"] = 1 / (1 + math.exp(-1.6 * (r["mos"] - 3.0))) + rng.normal(0, 0.001)
        r["dbcnn"] = 0.8 - 0.09 * r["level"] + 0.04 * ((r["face"] * 5) % FACES) + rng.normal(0, 0.002)
        r["status"], r["error"], r["mask_fraction"] = OK, None, 0.4
    # Rows the pipeline could not score: a human-accepted crop that errored (a false negative whatever
    # the thresholds), a no_face and a face_too_small crop the human rejects.
    special = {(0, "blur", 0): ("error",), (1, "jpeg", 5): ("no_face",), (2, "blur", 4): ("small",)}
    for r in rows:
        what = special.get((r["face"], r["kind"], r["level"]))
        if what == ("error",):
            r.update(status=ERROR, error="cannot decode image: truncated", serfiq=math.nan, dbcnn=math.nan,
                     mask_fraction=math.nan)
        elif what == ("no_face",):
            r.update(status=NO_FACE, serfiq=math.nan, dbcnn=math.nan, mask_fraction=math.nan)
        elif what == ("small",):
            r.update(mask_fraction=0.01)
    cfg = decision_cfg(min_serfiq=0.2)    # too permissive: accepts many crops the human rejects
    table = scored_table({k: [r[k] for r in rows] for k in ("uri", "status", "error", "serfiq", "dbcnn",
                                                             "mask_fraction")}, cfg, RUN, "v1")
    out = str(root / "out")
    run = write_run(out, table, RUN, cfg, files=3)
    decided = {r["uri"]: r for r in table.to_pylist()}
    for r in rows:
        r["accepted"], r["cafi"] = decided[r["uri"]]["accepted"], decided[r["uri"]]["cafi"]
    labels = str(root / "labels.csv")
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "mos", "accept"])
        for r in rows:
            w.writerow([r["uri"], f"{r['mos']:.4f}", "1" if r["accept"] else "0"])
    return {"rows": rows, "out": out, "run": run, "labels": labels, "root": root}


# ---------------------------------------------------------------- statistics


def test_srcc_plcc_match_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 10, 500):
        x = rng.normal(size=n)
        y = x + rng.normal(scale=0.7, size=n)
        ties = np.round(x * 2) / 2  # heavy ties
        assert evaluate.srcc(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
        assert evaluate.srcc(ties, y) == pytest.approx(scipy.stats.spearmanr(ties, y)[0], abs=1e-12)
        assert evaluate.plcc(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert evaluate.srcc([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.srcc([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(evaluate.srcc([1.0], [2.0]))
    assert math.isnan(evaluate.plcc([1, 1, 1], [1, 2, 3]))


def test_confusion_by_hand():
    pred = [True, True, False, False, True, False]
    truth = [True, False, True, False, True, False]
    c = evaluate.confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(2 / 3)
    none = evaluate.confusion([False, False], [True, False])
    assert math.isnan(none.precision) and none.recall == 0 and none.f1 == 0


# ---------------------------------------------------------------- the ladder


def test_correlations_on_the_ladder(ladder):
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    rows = ladder["rows"]
    assert res.labels == res.matched == len(rows) == FACES * 2 * LEVELS
    c = res.correlations
    scored = [r for r in rows if np.isfinite(r["serfiq"])]
    assert c["serfiq"]["n"] == c["dbcnn"]["n"] == len(scored) == len(rows) - 2
    mos = np.array([r["mos"] for r in scored])
    for col in ("serfiq", "dbcnn"):
        v = np.array([r[col] for r in scored], np.float32).astype(float)
        assert c[col]["srcc"] == pytest.approx(scipy.stats.spearmanr(v, mos)[0], abs=1e-9)
        assert c[col]["plcc"] == pytest.approx(scipy.stats.pearsonr(v, mos)[0], abs=1e-9)
    # SER-FIQ follows the MOS: rank correlation ~ 1. DBCNN follows each ladder but not across faces.
    assert c["serfiq"]["srcc"] > 0.99
    assert 0.5 < c["dbcnn"]["srcc"] < c["serfiq"]["srcc"]
    accepted = [r for r in rows if r["accepted"]]
    assert c["cafi"]["n"] == len(accepted)
    assert c["cafi"]["srcc"] == pytest.approx(
        scipy.stats.spearmanr([np.float32(r["cafi"]) for r in accepted], [r["mos"] for r in accepted])[0],
        abs=1e-9)
    # Within every ladder, SER-FIQ falls strictly with the level.
    for face in range(FACES):
        for kind in ("blur", "jpeg"):
            s = [r["serfiq"] for r in rows if r["face"] == face and r["kind"] == kind and np.isfinite(r["serfiq"])]
            assert all(a > b for a, b in zip(s, s[1:], strict=False))


def test_decision_metrics_by_hand(ladder):
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    tp = fp = fn = tn = 0
    for r in ladder["rows"]:
        if r["accepted"] and r["accept"]:
            tp += 1
        elif r["accepted"]:
            fp += 1
        elif r["accept"]:
            fn += 1
        else:
            tn += 1
    d = res.decision
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (tp, fp, fn, tn)
    assert fp > 0  # min_serfiq 0.2 lets low-quality crops through
    assert d["precision"] == pytest.approx(tp / (tp + fp))
    assert d["recall"] == pytest.approx(tp / (tp + fn))
    assert d["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert res.human_accepts == sum(r["accept"] for r in ladder["rows"])


def test_suggested_thresholds_separate_the_ladder(ladder):
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    s = res.suggestion
    rows = ladder["rows"]
    keep = [r for r in rows if r["accept"] and r["status"] == OK and r["mask_fraction"] >= 0.05]
    drop = [r for r in rows if not r["accept"] and r["status"] == OK and r["mask_fraction"] >= 0.05]
    # The SER-FIQ threshold falls between the worst kept crop and the best dropped one.
    assert max(np.float32(r["serfiq"]) for r in drop) < np.float32(s.min_serfiq) <= \
        min(np.float32(r["serfiq"]) for r in keep)
    # Everything the human keeps is kept, except the crop that could not be read.
    positives = sum(r["accept"] for r in rows)
    assert (s.confusion.tp, s.confusion.fp, s.confusion.fn) == (positives - 1, 0, 1)
    assert s.confusion.f1 == pytest.approx(2 * (positives - 1) / (2 * positives - 1))
    # Applying the suggested thresholds ourselves reproduces the human decision on every scorable crop.
    for r in keep + drop:
        ok = np.float32(r["serfiq"]) >= np.float32(s.min_serfiq) and (
            s.min_dbcnn is None or np.float32(r["dbcnn"]) >= np.float32(s.min_dbcnn))
        assert ok == r["accept"], r


def brute_force(serfiq, dbcnn, eligible, truth, precision=None):
    """Every (SER-FIQ cut, DBCNN cut or none) pair, evaluated directly."""
    serfiq, dbcnn = np.asarray(serfiq, np.float32), np.asarray(dbcnn, np.float32)
    ok = np.asarray(eligible) & np.isfinite(serfiq) & np.isfinite(dbcnn)
    best = None
    for ts in np.unique(serfiq[ok]):
        for td in [None, *np.unique(dbcnn[ok])]:
            pred = ok & (serfiq >= ts) & (True if td is None else dbcnn >= td)
            c = evaluate.confusion(pred, truth)
            if c.tp == 0 or (precision is not None and c.precision < precision):
                continue
            key = (c.f1,) if precision is None else (c.recall,)
            if best is None or key > best[0]:
                best = (key, c)
    return best[1] if best else None


@pytest.mark.parametrize("precision", [None, 0.8, 0.9, 0.97])
def test_suggest_matches_brute_force_on_noisy_labels(precision):
    rng = np.random.default_rng(11)
    n = 80
    quality = rng.uniform(0, 1, n)
    truth = quality + rng.normal(0, 0.15, n) > 0.5
    serfiq = np.clip(quality + rng.normal(0, 0.2, n), 0, 1)
    dbcnn = quality + rng.normal(0, 0.25, n)
    dbcnn[:3] = dbcnn[3]  # ties
    eligible = rng.random(n) > 0.05
    got = evaluate.suggest(serfiq, dbcnn, eligible, truth, precision)
    want = brute_force(serfiq, dbcnn, eligible, truth, precision)
    if want is None:
        assert got is None
        return
    assert got is not None
    if precision is None:
        assert got.confusion.f1 == pytest.approx(want.f1)
    else:
        assert got.confusion.recall == pytest.approx(want.recall)
        assert got.confusion.precision >= precision
    # The printed thresholds themselves give the reported confusion.
    pred = evaluate.accept_rule(serfiq, dbcnn, eligible & np.isfinite(serfiq), got.min_serfiq, got.min_dbcnn)
    c = evaluate.confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (got.confusion.tp, got.confusion.fp, got.confusion.fn, got.confusion.tn)
    assert 0.0 <= got.min_serfiq <= 1.0


def test_suggest_unreachable_precision_and_no_positives():
    serfiq = np.array([0.9, 0.8, 0.7])
    dbcnn = np.array([0.5, 0.5, 0.5])
    truth = np.array([False, True, False])
    assert evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), truth, precision=1.0) is None
    assert evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), np.zeros(3, bool)) is None
    only = evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), np.array([True, False, False]))
    assert only.min_dbcnn is None and 0.8 < only.min_serfiq <= 0.9


# ---------------------------------------------------------------- the command line


def test_cli_eval_table(ladder, capsys):
    assert main(["eval", ladder["run"], ladder["labels"]]) == 0
    out = capsys.readouterr().out
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    assert f"{res.matched} of {res.labels} labelled URIs found in run {RUN}" in out
    for col in ("serfiq", "dbcnn", "cafi"):
        c = res.correlations[col]
        assert any(line.split()[:4] == [col, str(c["n"]), f"{c['srcc']:.3f}", f"{c['plcc']:.3f}"]
                   for line in out.splitlines())
    assert "this run (its accepted column)" in out and "suggested (max F1)" in out
    assert f"  min_serfiq: {res.suggestion.min_serfiq:g}" in out
    # The output root reads the latest committed model version: the same rows here.
    assert main(["eval", ladder["out"], ladder["labels"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matched"] == res.matched and data["decision"] == res.decision
    assert data["suggestion"]["min_serfiq"] == res.suggestion.min_serfiq
    assert "model version v1, 1 committed run(s)" in data["source"]


def test_cli_eval_precision_target(ladder, capsys):
    assert main(["eval", ladder["run"], ladder["labels"], "--precision", "0.99", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s = data["suggestion"]
    assert s["precision"] >= 0.99 and s["goal"].startswith("precision >= 0.99")
    assert main(["eval", ladder["run"], ladder["labels"], "--precision", "1.5"]) == 1
    assert capsys.readouterr().err.strip() == "cafi: error: --precision 1.5 is not in (0, 1]"


def test_cli_eval_mos_only_and_accept_only(ladder, tmp_path, capsys):
    rows = ladder["rows"]
    mos_only = tmp_path / "mos.csv"
    mos_only.write_text("uri,mos\n" + "".join(f"{r['uri']},{r['mos']}\n" for r in rows[:20]))
    assert main(["eval", ladder["run"], str(mos_only)]) == 0
    out = capsys.readouterr().out
    assert "SRCC" in out and "No human accept/reject" in out
    acc_only = tmp_path / "acc.csv"
    words = ["yes", "no", "accept", "reject", "true", "false"]
    acc_only.write_text("uri,human\n" + "".join(f"{r['uri']},{words[i % 6]}\n" for i, r in enumerate(rows)))
    assert main(["eval", ladder["run"], str(acc_only), "--accept-column", "human", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["correlations"] == {} and data["decision_rows"] == len(rows)
    assert data["human_accepts"] == sum(1 for i in range(len(rows)) if i % 2 == 0)


@pytest.mark.parametrize("content, message", [
    ("path,mos\na,1\n", "has no 'uri' column"),
    ("uri,score\na,1\n", "needs a 'mos' and/or an 'accept' column"),
    ("uri,mos\na,good\n", "line 2: mos 'good' is not a number"),
    ("uri,accept\na,maybe\n", "line 2: accept value 'maybe' is not one of"),
    ("uri,mos\na,1\na,2\n", "line 3: uri a is labelled twice (first on line 2)"),
    ("uri,mos\n", "has no rows"),
    ("uri,mos\n/not/in/the/run.jpg,3\n", "none of the 1 labelled URIs is in run"),
])
def test_cli_eval_bad_labels_one_line(ladder, tmp_path, capsys, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    assert main(["eval", ladder["run"], str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("cafi: error: ") and message in err, err


def test_unmatched_labels_are_reported(ladder, tmp_path, capsys):
    rows = ladder["rows"]
    path = tmp_path / "labels.csv"
    path.write_text("uri,mos,accept\n" + "".join(f"{r['uri']},{r['mos']},{int(r['accept'])}\n" for r in rows)
                    + "/elsewhere/x.jpg,4.0,1\n")
    res = evaluate.evaluate(ladder["run"], str(path))
    assert res.labels == len(rows) + 1 and res.matched == len(rows)
    assert res.unmatched_examples == ["/elsewhere/x.jpg"]
    assert "1 labelled URIs are not in the manifest, e.g. /elsewhere/x.jpg" in evaluate.format_result(res)


def test_eval_missing_inputs(ladder, tmp_path):
    with pytest.raises(CafiError, match="labels: .* does not exist"):
        evaluate.evaluate(ladder["run"], str(tmp_path / "nope.csv"))
    with pytest.raises(CafiError, match="does not exist"):
        evaluate.evaluate(str(tmp_path / "no-output"), ladder["labels"])
    assert os.path.exists(ladder["labels"])
