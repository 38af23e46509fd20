"""`cafi eval` on a labelled set built here: degradation ladders of the same crops, where the order is known."""

from __future__ import annotations

import csv
import json
import math
import os
import re

import cv2
import numpy as np
import pytest
import scipy.stats

from cafi import columns, evaluate
from cafi.cli import main
from cafi.decision import ERROR, NO_FACE, OK
from cafi.errors import CafiError
from cafi.samples import draw_face, encode

try:  # tests/ is a package here; still importable if it is not
    from .test_edc import identity_set
    from .test_report import (
        chromium_binary,
        decision_cfg,
        embedding_array,
        load_in_chromium,
        needs_chromium,
        scored_table,
        write_run,
    )
except ImportError:  # pragma: no cover
    from test_edc import identity_set  # type: ignore[no-redef]
    from test_report import (  # type: ignore
        chromium_binary,
        decision_cfg,
        embedding_array,
        load_in_chromium,
        needs_chromium,
        scored_table,
        write_run,
    )

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
                             "accept": level <= ACCEPT_MAX_LEVEL, "sharpness": sharpness(img)})
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
                     mask_fraction=math.nan, sharpness=math.nan)
        elif what == ("no_face",):
            r.update(status=NO_FACE, serfiq=math.nan, dbcnn=math.nan, mask_fraction=math.nan, sharpness=math.nan)
        elif what == ("small",):
            r.update(mask_fraction=0.01)
    cfg = decision_cfg(min_serfiq=0.2)    # too permissive: accepts many crops the human rejects
    table = scored_table({k: [r[k] for r in rows] for k in ("uri", "status", "error", "serfiq", "dbcnn",
                                                             "mask_fraction", "sharpness")}, cfg, RUN, "v1")
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


def ranked(res) -> dict:
    return {e["column"]: e for e in res.labels.ranking}


def test_correlations_on_the_ladder(ladder):
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    rows = ladder["rows"]
    lr = res.labels
    assert lr.labels == lr.matched == len(rows) == FACES * 2 * LEVELS
    c = ranked(res)
    scored = [r for r in rows if np.isfinite(r["serfiq"])]
    assert c["serfiq"]["n_mos"] == c["dbcnn"]["n_mos"] == len(scored) == len(rows) - 2
    mos = np.array([r["mos"] for r in scored])
    for col in ("serfiq", "dbcnn", "sharpness"):
        v = np.array([r[col] for r in scored], np.float32).astype(float)
        assert c[col]["srcc"] == pytest.approx(scipy.stats.spearmanr(v, mos)[0], abs=1e-9)
        assert c[col]["plcc"] == pytest.approx(scipy.stats.pearsonr(v, mos)[0], abs=1e-9)
    # SER-FIQ follows the MOS: rank correlation ~ 1. DBCNN follows each ladder but not across faces.
    assert c["serfiq"]["srcc"] > 0.99
    assert 0.5 < c["dbcnn"]["srcc"] < c["serfiq"]["srcc"]
    accepted = [r for r in rows if r["accepted"]]
    assert c["cafi"]["n_mos"] == len(accepted)
    assert c["cafi"]["srcc"] == pytest.approx(
        scipy.stats.spearmanr([np.float32(r["cafi"]) for r in accepted], [r["mos"] for r in accepted])[0],
        abs=1e-9)
    # Every quality column with values is ranked, best SRCC first; columns the run did not fill are not.
    assert set(c) == {"serfiq", "serfiq_raw", "dbcnn", "cafi", "sharpness", "det_score", "mask_fraction"}
    srccs = [e["srcc"] for e in lr.ranking if math.isfinite(e["srcc"])]
    assert srccs == sorted(srccs, reverse=True) and lr.ranking[0]["column"] in ("serfiq", "serfiq_raw")
    assert math.isnan(c["det_score"]["srcc"]) and lr.ranking[-1]["column"] == "det_score"  # a constant
    # Within every ladder, SER-FIQ falls strictly with the level.
    for face in range(FACES):
        for kind in ("blur", "jpeg"):
            s = [r["serfiq"] for r in rows if r["face"] == face and r["kind"] == kind and np.isfinite(r["serfiq"])]
            assert all(a > b for a, b in zip(s, s[1:], strict=False))


def test_sharpness_ranks_high_on_the_blur_ladder(ladder, tmp_path):
    """A quality component measured on the real crops (Laplacian variance) carries the team's notion of
    quality where the degradation is blur, and much less where it is JPEG compression."""
    position = {}
    for kind in ("blur", "jpeg"):
        path = tmp_path / f"{kind}.csv"
        path.write_text("uri,mos,accept\n" + "".join(f"{r['uri']},{r['mos']},{int(r['accept'])}\n"
                                                      for r in ladder["rows"] if r["kind"] == kind))
        res = evaluate.evaluate(ladder["run"], str(path))
        order = [e["column"] for e in res.labels.ranking]
        position[kind] = order.index("sharpness")
        c = ranked(res)
        if kind == "blur":
            assert c["sharpness"]["srcc"] > 0.8 and c["sharpness"]["f1"] > 0.8, c["sharpness"]
            assert position["blur"] <= 2, order  # behind SER-FIQ (built to follow the MOS) at most
            assert c["sharpness"]["rule"].startswith("sharpness >= ")
    assert position["blur"] < position["jpeg"]


def test_best_single_threshold_matches_brute_force():
    rng = np.random.default_rng(5)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        v = np.round(rng.normal(size=n), 1)        # ties
        v[rng.random(n) < 0.1] = np.nan            # rows without a value are never kept
        truth = rng.random(n) < 0.5
        f = evaluate.best_filter(v, truth)
        if not truth.any() or not np.isfinite(v).any():
            assert f is None
            continue
        best = max(evaluate.confusion(v >= t, truth).f1 for t in np.unique(v[np.isfinite(v)]))
        assert f.confusion.f1 == pytest.approx(best), trial
        with np.errstate(invalid="ignore"):
            assert f.confusion == evaluate.confusion(v >= f.threshold, truth)  # the printed threshold does it


@pytest.mark.parametrize("name, oriented, value, rule", [
    ("sharpness", 12.5, 12.5, "sharpness >= 12.5"),
    ("over_exposed", -0.2, 0.2, "over_exposed <= 0.2"),
    ("yaw", -23.5, 23.5, "|yaw| <= 23.5"),
    ("luma_mean", -0.3, 0.3, "|luma_mean - 0.5| <= 0.3"),
])
def test_thresholds_in_the_columns_own_units(name, oriented, value, rule):
    col = columns.BY_NAME[name]
    assert evaluate.own_units(col, oriented) == (value, rule)
    # The rule keeps exactly the rows whose oriented value reaches the oriented threshold.
    raw = np.array([-40.0, -10.0, 0.0, 0.1, 0.2, 0.5, 0.7, 0.9, 12.0, 13.0, 30.0])
    keep_oriented = col.oriented(raw) >= oriented
    keep_rule = {"higher": raw >= value, "lower": raw <= value, "abs_lower": np.abs(raw) <= value,
                 "near_half": np.abs(raw - 0.5) <= value}[col.better]
    assert np.array_equal(keep_oriented, keep_rule)


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
    d = res.labels.decision
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (tp, fp, fn, tn)
    assert fp > 0  # min_serfiq 0.2 lets low-quality crops through
    assert d["precision"] == pytest.approx(tp / (tp + fp))
    assert d["recall"] == pytest.approx(tp / (tp + fn))
    assert d["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert res.labels.human_accepts == sum(r["accept"] for r in ladder["rows"])


def test_suggested_thresholds_separate_the_ladder(ladder):
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    s = res.labels.suggestion
    assert (s.fiqa, s.iqa) == ("serfiq", "dbcnn")
    rows = ladder["rows"]
    keep = [r for r in rows if r["accept"] and r["status"] == OK and r["mask_fraction"] >= 0.05]
    drop = [r for r in rows if not r["accept"] and r["status"] == OK and r["mask_fraction"] >= 0.05]
    # The SER-FIQ threshold falls between the worst kept crop and the best dropped one.
    assert max(np.float32(r["serfiq"]) for r in drop) < np.float32(s.min_fiqa) <= \
        min(np.float32(r["serfiq"]) for r in keep)
    # Everything the human keeps is kept, except the crop that could not be read.
    positives = sum(r["accept"] for r in rows)
    assert (s.confusion.tp, s.confusion.fp, s.confusion.fn) == (positives - 1, 0, 1)
    assert s.confusion.f1 == pytest.approx(2 * (positives - 1) / (2 * positives - 1))
    # Applying the suggested thresholds ourselves reproduces the human decision on every scorable crop.
    for r in keep + drop:
        ok = np.float32(r["serfiq"]) >= np.float32(s.min_fiqa) and (
            s.min_iqa is None or np.float32(r["dbcnn"]) >= np.float32(s.min_iqa))
        assert ok == r["accept"], r


def test_suggestion_respects_the_other_rules(ladder, tmp_path):
    """A component rule that is on (here blur, from the run's thresholds) is left as it is: the rows it
    rejects are not eligible, whatever the FIQA/IQA thresholds."""
    rows = ladder["rows"]
    cfg = decision_cfg(min_serfiq=0.2, min_sharpness=float(np.median([r["sharpness"] for r in rows
                                                                        if np.isfinite(r["sharpness"])])))
    table = scored_table({k: [r[k] for r in rows] for k in ("uri", "status", "error", "serfiq", "dbcnn",
                                                             "mask_fraction", "sharpness")}, cfg, RUN, "v1")
    run = write_run(str(tmp_path / "out"), table, RUN, cfg)
    res = evaluate.evaluate(run, ladder["labels"])
    blurred = [r for r in rows if r["status"] == OK and r["sharpness"] < cfg["decision"]["min_sharpness"]]
    assert blurred and "blur" in set(table["reject_reason"].to_pylist())
    s = res.labels.suggestion
    assert s.confusion.tp <= sum(r["accept"] for r in rows) - sum(r["accept"] for r in blurred) - 1
    assert res.labels.thresholds["min_sharpness"] == cfg["decision"]["min_sharpness"]


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
    pred = evaluate.accept_rule(serfiq, dbcnn, eligible & np.isfinite(serfiq), got.min_fiqa, got.min_iqa)
    c = evaluate.confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (got.confusion.tp, got.confusion.fp, got.confusion.fn, got.confusion.tn)
    assert 0.0 <= got.min_fiqa <= 1.0


def test_suggest_unreachable_precision_and_no_positives():
    serfiq = np.array([0.9, 0.8, 0.7])
    dbcnn = np.array([0.5, 0.5, 0.5])
    truth = np.array([False, True, False])
    assert evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), truth, precision=1.0) is None
    assert evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), np.zeros(3, bool)) is None
    only = evaluate.suggest(serfiq, dbcnn, np.ones(3, bool), np.array([True, False, False]))
    assert only.min_iqa is None and 0.8 < only.min_fiqa <= 0.9


# ---------------------------------------------------------------- the command line


def test_cli_eval_table(ladder, capsys):
    assert main(["eval", ladder["run"], ladder["labels"]]) == 0
    out = capsys.readouterr().out
    res = evaluate.evaluate(ladder["run"], ladder["labels"])
    lr = res.labels
    assert f"{lr.matched} of {lr.labels} labelled URIs found in run {RUN}" in out
    c = ranked(res)
    for col in ("serfiq", "dbcnn", "cafi", "sharpness"):
        e = c[col]
        assert any(line.split()[:5] == [col, "higher", str(e["n_mos"]), f"{e['srcc']:.3f}", f"{e['plcc']:.3f}"]
                   and line.rstrip().endswith(e["rule"]) for line in out.splitlines()), col
    assert "this run (its accepted column)" in out and "suggested (max F1)" in out
    assert f"  min_serfiq: {lr.suggestion.min_fiqa:g}" in out
    # The output root reads the latest committed model version: the same rows here.
    assert main(["eval", ladder["out"], ladder["labels"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edc"] is None
    labels = data["labels"]
    assert labels["matched"] == lr.matched and labels["decision"] == lr.decision
    assert labels["suggestion"]["min_serfiq"] == lr.suggestion.min_fiqa
    assert "min_dbcnn" in labels["suggestion"] and labels["sorted_by"] == "srcc"
    assert [e["column"] for e in labels["ranking"]] == [e["column"] for e in lr.ranking]
    assert "model version v1, 1 committed run(s)" in data["source"]


def test_cli_eval_precision_target(ladder, capsys):
    assert main(["eval", ladder["run"], ladder["labels"], "--precision", "0.99", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s = data["labels"]["suggestion"]
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
    data = json.loads(capsys.readouterr().out)["labels"]
    assert data["sorted_by"] == "f1" and all("srcc" not in e for e in data["ranking"])
    assert data["decision_rows"] == len(rows)
    assert data["human_accepts"] == sum(1 for i in range(len(rows)) if i % 2 == 0)


def test_cli_eval_needs_labels_or_identities(ladder, capsys):
    assert main(["eval", ladder["run"]]) == 2
    assert capsys.readouterr().err.strip() == ("cafi: error: eval: nothing to evaluate against: give LABELS.csv "
                                               "and/or --identities IDS.csv")


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
    assert res.labels.labels == len(rows) + 1 and res.labels.matched == len(rows)
    assert res.labels.unmatched_examples == ["/elsewhere/x.jpg"]
    assert "1 labelled URIs are not in the manifest, e.g. /elsewhere/x.jpg" in evaluate.format_result(res)


def test_eval_missing_inputs(ladder, tmp_path):
    with pytest.raises(CafiError, match="labels: .* does not exist"):
        evaluate.evaluate(ladder["run"], str(tmp_path / "nope.csv"))
    with pytest.raises(CafiError, match="does not exist"):
        evaluate.evaluate(str(tmp_path / "no-output"), ladder["labels"])
    assert os.path.exists(ladder["labels"])


# ---------------------------------------------------------------- EDC from a committed run with embeddings

ID_RUN = "20250101T000000Z-1d5e75"


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """A committed run (real Parquet, the full schema) of 60 identities x 5 samples with embeddings whose
    genuine similarity falls with a hidden quality q. Its columns: serfiq = q; yaw = +-60 (1 - q) (the
    same order, turned: |yaw| lower is better); dbcnn random; over_exposed = q / 2 (lower is better:
    the reverse order); sharpness = q on half of the samples only. Two no_face rows have no embedding."""
    root = tmp_path_factory.mktemp("identities")
    emb, ids, q, rng = identity_set(n_ids=60, per=5, seed=3)
    n = len(ids)
    uris = [f"/crops/{ids[k]}/{k % 5}.jpg" for k in range(n)]
    status = np.array([OK] * n, dtype=object)
    status[[3, 17]] = NO_FACE
    scored = status == OK
    nan = np.full(n, np.nan)
    yaw = np.where(scored, 60 * (1 - q) * rng.choice([-1, 1], n), nan)
    values = {
        "uri": uris, "status": status.tolist(), "serfiq": np.where(scored, q, nan), "yaw": yaw,
        "dbcnn": np.where(scored, rng.uniform(0, 1, n), nan),
        "over_exposed": np.where(scored, q / 2, nan), "sharpness": np.where(scored & (np.arange(n) % 2 == 0), q, nan),
        "mask_fraction": np.where(scored, 0.4, nan), "embedding": embedding_array(emb, scored),
    }
    cfg = decision_cfg(min_serfiq=0.0)
    table = scored_table(values, cfg, ID_RUN, "v1")
    out = str(root / "out")
    run = write_run(out, table, ID_RUN, cfg, files=2)
    path = root / "ids.csv"
    path.write_text("uri,person\n" + "".join(f"{u},{i}\n" for u, i in zip(uris, ids, strict=True))
                    + "/crops/not-scored.jpg,person-999\n")
    return {"run": run, "out": out, "ids": str(path), "q": q, "yaw": yaw, "identities": ids, "scored": scored,
            "root": root}


def expected_mated(identities: np.ndarray, scored: np.ndarray) -> int:
    _, sizes = np.unique(identities[scored], return_counts=True)
    return int((sizes * (sizes - 1) // 2).sum())


def test_cli_eval_edc_end_to_end(identity_run, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    argv = ["eval", identity_run["run"], "--identities", identity_run["ids"], "--identity-column", "person",
            "--nonmated", "20000", "--target-fnmr", "0.05", "--out", str(out_dir), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    e = data["edc"]
    assert data["labels"] is None and e["message"] is None
    assert (e["listed"], e["found"], e["samples"]) == (301, 300, 298)
    assert e["mated_pairs"] == expected_mated(identity_run["identities"], identity_run["scored"])
    assert e["nonmated_pairs"] == 20000 and "seeded sample" in e["nonmated_sampling"]
    assert e["threshold"]["set_by"] == "fmr" and e["threshold"]["fmr"] == pytest.approx(1e-3, rel=0.2)
    rows = {r["score"]: r for r in e["pauc"]}
    assert [r["order"] for r in e["pauc"]][0] == "ideal" and e["pauc"][-1]["order"] == "random"
    # Every quality column with values, none without.
    assert {r["score"] for r in e["pauc"] if r["order"] == "score"} == \
        {"serfiq", "serfiq_raw", "yaw", "dbcnn", "cafi", "over_exposed", "sharpness", "det_score", "mask_fraction"}
    # The hidden quality, however it is stored, orders the discards the same way.
    assert rows["yaw"]["pauc"] == pytest.approx(rows["serfiq"]["pauc"]) and rows["serfiq"]["relative"] < 0.3
    assert abs(rows["dbcnn"]["relative"] - 1) < 0.3 and rows["over_exposed"]["relative"] > 1
    assert rows["sharpness"]["unrated_pairs"] > 0 and rows["serfiq"]["unrated_pairs"] == 0
    # The threshold for the target FNMR, in the column's own units.
    assert rows["yaw"]["target"]["rule"].startswith("|yaw| <= ") and rows["yaw"]["target"]["reached"]
    assert rows["serfiq"]["target"]["rule"].startswith("serfiq >= ")
    q, yaw, scored = identity_run["q"], identity_run["yaw"], identity_run["scored"]
    kept_by_serfiq = scored & (q.astype(np.float32) >= rows["serfiq"]["target"]["threshold"])
    kept_by_yaw = scored & (np.abs(yaw.astype(np.float32)) <= rows["yaw"]["target"]["threshold"])
    assert np.array_equal(kept_by_serfiq, kept_by_yaw) and 0 < kept_by_yaw.sum() < scored.sum()
    # Files: every curve point, the pAUC table, the page.
    assert sorted(os.listdir(out_dir)) == ["edc.csv", "edc.json", "eval.html", "pauc.csv"]
    strict = json.loads((out_dir / "edc.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict == data
    with open(out_dir / "edc.csv", newline="") as fh:
        points = list(csv.DictReader(fh))
    assert set(points[0]) == {"score", "order", "discard_fraction", "fnmr"}
    assert {p["order"] for p in points} == {"score", "ideal", "random"}
    for curve in e["curves"]:
        mine = [p for p in points if p["score"] == curve["score"]]
        assert [float(p["discard_fraction"]) for p in mine] == curve["discard"]
        assert float(mine[0]["discard_fraction"]) == 0 and float(mine[0]["fnmr"]) == pytest.approx(
            e["threshold"]["start_fnmr"])
    with open(out_dir / "pauc.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["score"] for r in table] == [r["score"] for r in e["pauc"]]
    page = (out_dir / "eval.html").read_text()
    assert 'data-chart="edc"' in page and 'data-chart="edc-zoom"' in page and "|yaw| &lt;= " in page
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        raise AssertionError(f"a resource in the eval page: {attr}")
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_cli_eval_edc_table_with_labels(identity_run, ladder, tmp_path, capsys):
    """Labels and identities in one call: both sections, from one read of the rows."""
    labels = tmp_path / "labels.csv"
    q = identity_run["q"]
    uris = [f"/crops/{i}/{k % 5}.jpg" for k, i in enumerate(identity_run["identities"])]
    labels.write_text("uri,mos\n" + "".join(f"{u},{5 * q[k]:.4f}\n" for k, u in enumerate(uris)))
    assert main(["eval", identity_run["run"], str(labels), "--identities", identity_run["ids"],
                 "--identity-column", "person", "--nonmated", "20000", "--start-fnmr", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "300 of 300 labelled URIs found" in out and "EDC (ISO/IEC 29794-1:2024)" in out
    assert "(starting FNMR 0.10" in out and "(ideal)" in out and "(random)" in out
    assert any(line.split()[:2] == ["serfiq", "higher"] for line in out.splitlines())
    assert any(line.split()[:3] == ["yaw", "|x|", "lower"] for line in out.splitlines())


def test_cli_eval_too_few_mated_pairs(identity_run, tmp_path, capsys):
    out_dir = tmp_path / "few"
    argv = ["eval", identity_run["run"], "--identities", identity_run["ids"], "--identity-column", "person",
            "--min-mated", "100000", "--out", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fewer than the minimum of 100,000 (--min-mated): no EDC is computed." in out and "pAUC" not in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["edc"]
    assert data["message"].startswith("only ") and data["pauc"] == [] and data["curves"] == []
    page = (out_dir / "eval.html").read_text()
    assert 'data-edc="none"' in page and 'data-chart="edc"' not in page and "no EDC is computed" in page


def test_cli_eval_without_embeddings_is_one_line(ladder, tmp_path, capsys):
    ids = tmp_path / "ids.csv"
    ids.write_text("uri,identity\n" + "".join(f"{r['uri']},face{r['face']}\n" for r in ladder["rows"]))
    assert main(["eval", ladder["run"], "--identities", str(ids)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no embeddings" in err and "output.embeddings=true" in err


def _record_recognizers(identity_run, dest, models) -> str:
    """A copy of the identity run whose manifest files carry these recognizers (cycled over the files) in
    the `embedding` field metadata, as the pipeline writes it."""
    import glob
    import shutil

    import pyarrow.parquet as pq

    from cafi import manifest

    out = str(dest / "out")
    shutil.copytree(identity_run["out"], out)
    for i, path in enumerate(sorted(glob.glob(os.path.join(out, "manifest", "**", "*.parquet"), recursive=True))):
        table = pq.read_table(path, partitioning=None)
        pq.write_table(table.cast(manifest.with_embedding_model(table.schema, models[i % len(models)])), path)
    return identity_run["run"].replace(identity_run["out"], out)


def test_cli_eval_edc_names_the_recognizer_and_refuses_to_mix_two(identity_run, tmp_path, capsys):
    crfiqa = {"stage": "crfiqa", "arch": "crfiqa_iresnet100", "sha256": "ab" * 32}
    serfiq = {"stage": "serfiq", "arch": "arcface_ir_se50", "sha256": "cd" * 32}
    argv = ["--identities", identity_run["ids"], "--identity-column", "person", "--nonmated", "2000"]
    run = _record_recognizers(identity_run, tmp_path / "one", [crfiqa])
    assert main(["eval", run, *argv]) == 0
    assert "  embeddings: crfiqa_iresnet100 (the crfiqa stage's own pass; sha256 abababababab)" in \
        capsys.readouterr().out
    assert main(["eval", run, *argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edc"]["embedding_model"] == crfiqa
    mixed = _record_recognizers(identity_run, tmp_path / "two", [crfiqa, serfiq])
    assert main(["eval", mixed, *argv]) == 1
    err = capsys.readouterr().err
    assert "come from 2 recognizers (crfiqa_iresnet100 (sha256 abababababab), arcface_ir_se50 (sha256 " in err
    assert main(["eval", identity_run["run"], *argv]) == 0  # written before cafi recorded it: said so
    assert "  embeddings: not recorded" in capsys.readouterr().out


def test_edc_window_chart_scales_to_the_window_offers_a_log_axis_and_fades_the_components():
    """A constructed set whose curves stay low up to the pAUC limit while the whole curve's tail is high:
    the window chart's FNMR axis is the window's; with many columns the scorers are drawn, the
    components faded."""
    from cafi import edc as edc_mod
    from cafi.eval_identities import EdcSection
    from cafi.eval_page import FAINT, edc_charts, window_range

    emb, ids, q, rng = identity_set(n_ids=40, per=4, seed=5)
    names = ["crfiqa", "sddfiqa", "serfiq", "magface", "yaw", "sharpness", "luma_mean", "det_score"]
    qualities = {n: q + rng.normal(0, 0.05 * (i + 1), len(q)) for i, n in enumerate(names)}
    qualities["luma_mean"] = -q  # a column that orders the samples backwards: its tail climbs to FNMR 1
    result = edc_mod.evaluate(emb, ids, qualities, edc_mod.Options(nonmated=5000, start_fnmr=0.02, pauc_limit=0.2,
                                                                   min_mated=10))
    html_ = edc_charts(EdcSection("ids.csv", "identity", len(ids), len(ids), len(ids), result))
    charts_ = dict(re.findall(r'<svg class="chart" data-chart="([^"]+)"(.*?)</svg>', html_, flags=re.S))
    assert set(charts_) == {"edc", "edc-zoom", "edc-zoom-log"}

    def y_labels(svg):
        return [float(v) for v in re.findall(r'class="yl">([^<]+)<', svg)]

    window = [*result.scores, result.ideal, result.random]
    in_window = max(float(s.curve.fnmr[s.curve.discard <= 0.2].max()) for s in window)
    whole_top, zoom_top = max(y_labels(charts_["edc"])), max(y_labels(charts_["edc-zoom"]))
    assert in_window < 0.05 and whole_top > 5 * zoom_top  # the tail is far above the window's curves
    assert in_window <= zoom_top * 1.3 and zoom_top <= in_window * 1.06  # the window's own scale
    # log axis: labels at 1, 2 and 5 times a power of ten, from the decade under the smallest FNMR in the window
    logs = y_labels(charts_["edc-zoom-log"])
    assert len(logs) >= 3 and all(round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) in (1, 2, 5) for v in logs)
    smallest = min(float(v) for s in window for v in s.curve.fnmr[s.curve.discard <= 0.2] if v > 0)
    assert min(logs) <= smallest and max(logs) >= in_window / 2.5
    assert window_range([], 0.2, log=True)[0] > 0  # no curve: still a valid log range
    faded = re.findall(rf'stroke-opacity="{FAINT:g}" class="curve"><title>(\w+) ', charts_["edc-zoom"])
    assert sorted(faded) == ["det_score", "luma_mean", "sharpness", "yaw"]
    strong = re.findall(r'stroke-width="2.0" class="curve"><title>(\w+) ', charts_["edc-zoom"])
    assert sorted(strong) == ["crfiqa", "magface", "sddfiqa", "serfiq"]
    few = edc_mod.evaluate(emb, ids, {n: qualities[n] for n in names[4:]}, result.options)
    assert "stroke-opacity" not in edc_charts(EdcSection("ids.csv", "identity", 1, 1, 1, few))  # a handful: all


@pytest.mark.parametrize("args, message", [
    (["--fmr", "0"], "--fmr 0.0 is not in (0, 1)"),
    (["--start-fnmr", "1.5"], "--start-fnmr 1.5 is not in (0, 1)"),
    (["--pauc-limit", "0"], "--pauc-limit 0.0 is not in (0, 1]"),
    (["--nonmated", "0"], "--nonmated 0 is not a positive count"),
])
def test_cli_eval_bad_edc_options(identity_run, capsys, args, message):
    assert main(["eval", identity_run["run"], "--identities", identity_run["ids"], "--identity-column", "person",
                 *args]) == 1
    assert capsys.readouterr().err.strip() == f"cafi: error: {message}"


@needs_chromium
def test_eval_page_renders_in_headless_chromium(identity_run, ladder, tmp_path, capsys):
    out_dir = tmp_path / "page"
    assert main(["eval", identity_run["run"], "--identities", identity_run["ids"], "--identity-column", "person",
                 "--nonmated", "20000", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    html, attrs = load_in_chromium(chromium_binary(), tmp_path, str(out_dir / "eval.html"))
    assert attrs["data-broken-images"] == "0" and int(attrs["data-charts"]) == 3  # whole, window, window (log)
    assert len(re.findall(r'<path [^>]*class="curve"', html)) >= 3 * 11  # 9 scores + ideal + random, thrice
