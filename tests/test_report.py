"""The HTML run report: streaming aggregates, thumbnails of the shown rows only, a real browser."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cafi import columns, fetch, manifest, report, runs
from cafi.config import DecisionConfig, load_config, to_dict
from cafi.decision import ERROR, NO_FACE, OK, REASONS, SCORED, reject_reasons
from cafi.errors import CafiError
from cafi.samples import broken_inputs, degrade, draw_face, encode, png_flat
from cafi.stages import specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")

# ---------------------------------------------------------------- building committed runs without models


def decision_cfg(fiqa: str | None = None, iqa: str | None = None, **decision) -> dict:
    """A job config as a run summary holds it; `fiqa`/`iqa` set models.<fiqa|iqa>.kind in the dict."""
    over = ["input.uri=unused", "output.uri=unused"] + [f"decision.{k}={'null' if v is None else v}"
                                                         for k, v in decision.items()]
    cfg = to_dict(load_config([], over))
    for role, kind in (("fiqa", fiqa), ("iqa", iqa)):
        if kind is not None:
            cfg["models"].setdefault(role, {})["kind"] = kind
    return cfg


def embedding_array(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """(n, 512) floats -> the manifest's fixed_size_list<float16, 512>; rows where `valid` is False are null."""
    vectors = np.asarray(vectors, np.float16)
    mask = None if valid is None else pa.array(~np.asarray(valid, bool))
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), columns.EMBEDDING_DIM, mask=mask)


def scored_table(values: dict, cfg: dict, run_id: str, version: str) -> pa.Table:
    """Fabricated rows as the manifest holds them, with the real decision (`cafi.decision`) applied to
    the rows whose status is OK. `values` may hold any column of `cafi.columns.SCHEMA` (a float
    column as a list or array, `embedding` as an Arrow array); every other column is null, so the
    helper keeps up with the schema. `mask_fraction` defaults to 0.4."""
    n = len(values["uri"])
    status = np.asarray(values.get("status", [OK] * n), dtype=object)
    floats = {c: np.asarray(v, np.float32) for c, v in values.items()
              if c in columns.BY_NAME and pa.types.is_floating(columns.BY_NAME[c].type)}
    floats.setdefault("mask_fraction", np.full(n, 0.4, np.float32))
    if "serfiq" in floats:
        floats.setdefault("serfiq_raw", floats["serfiq"])
    fiqa, iqa = runs.scorers({"config": cfg})
    dec = DecisionConfig(**cfg["decision"])
    reason = reject_reasons({"status": status, **floats}, dec, *specs.score_rules(dec, fiqa, iqa))
    ok = status == OK
    status[ok] = SCORED
    accepted = ok & np.equal(reason, None)
    iqa_values = floats.get(iqa, np.full(n, np.nan, np.float32))
    cols = {
        **{c: v for c, v in values.items() if c in columns.BY_NAME}, **floats,
        "status": status.tolist(), "error": list(values.get("error", [None] * n)),
        "width": [384] * n, "height": [384] * n, "det_score": np.where(ok, 0.99, np.nan).astype(np.float32),
        "cafi": np.where(accepted, iqa_values, np.nan).astype(np.float32), "accepted": accepted,
        "decision": np.where(accepted, "accepted", "rejected").tolist(), "reject_reason": reason.tolist(),
        "model_version": [version] * n, "run_id": [run_id] * n,
        "scored_at": np.full(n, np.datetime64("2025-01-01T00:00:00", "us")),
    }

    def arrow(f: pa.Field) -> pa.Array:
        v = cols[f.name]
        return v if isinstance(v, pa.Array) else pa.array(v, type=f.type)

    return pa.table({f.name: arrow(f) if f.name in cols else pa.nulls(n, f.type) for f in columns.SCHEMA})

def write_run(output: str, table: pa.Table, run_id: str, cfg: dict, files: int = 1, summary: dict | None = None,
              commit: bool = True) -> str:
    """Write rows as Ray's partitioned writer lays them out, then commit the run. Returns the run URI."""
    parts = ["model_version", "decision"]
    keys = table.select(parts).to_pylist()
    for key in {tuple(k.values()) for k in keys}:
        mask = pc.and_(pc.equal(table["model_version"], key[0]), pc.equal(table["decision"], key[1]))
        sub = table.filter(mask).drop_columns(parts)
        d = os.path.join(manifest.manifest_uri(output), f"model_version={key[0]}", f"decision={key[1]}")
        os.makedirs(d, exist_ok=True)
        step = max(1, -(-sub.num_rows // files))
        for i in range(0, sub.num_rows, step):
            pq.write_table(sub.slice(i, step), os.path.join(d, f"{run_id}_{i // step:06d}_0.parquet"))
    if commit:
        reasons = Counter(r for r in table["reject_reason"].to_pylist() if r is not None)
        counts = {"rows": table.num_rows, "distinct_uris": table.num_rows,
                  "status": dict(Counter(table["status"].to_pylist())), "reject_reason": dict(reasons),
                  "accepted": table.num_rows - sum(reasons.values())}
        full = {
            "run_id": run_id, "model_version": table["model_version"][0].as_py(), "synthetic_weights": True,
            "inputs": table.num_rows, "counts": counts, "started_at": "2025-01-01T00:00:00+00:00",
            "finished_at": f"2025-01-01T00:00:{int(time.time() * 1000) % 60:02d}+00:00",
            "wall_seconds": 12.5, "images_per_second": round(table.num_rows / 12.5, 3),
            "stages": {"operators": [
                {"operator": "ReadDecode", "tasks": 2, "blocks": 2, "wall_seconds": 1.5, "rows": table.num_rows,
                 "rows_per_second": round(table.num_rows / 1.5, 3)},
                {"operator": "MapBatches(Detect)", "tasks": 2, "blocks": 2, "wall_seconds": 6.0,
                 "rows": table.num_rows, "rows_per_second": round(table.num_rows / 6.0, 3)},
                {"operator": "MapBatches(decide)", "tasks": 2, "blocks": 2, "wall_seconds": 0.2,
                 "rows": table.num_rows, "rows_per_second": round(table.num_rows / 0.2, 3)},
            ]},
            "output": {"manifest": manifest.manifest_uri(output), "run": manifest.run_uri(output, run_id)},
            "config": cfg,
        }
        full.update(summary or {})
        manifest.commit(output, run_id, full, None)
    return manifest.run_uri(output, run_id)


# Thresholds for the component rules, and rows built to fail exactly one of them (by i % 10).
COMPONENT_RULES = {"max_yaw": 30, "max_pitch": 25, "min_inter_eye_px": 20, "min_sharpness": 50,
                   "min_luma_mean": 0.15, "max_luma_mean": 0.85, "max_over_exposed": 0.2}


def component_values(i: int, rng: np.random.Generator) -> dict:
    """Plausible quality components of a scored row; i % 10 in 1..4 fails pose, low_resolution, blur, exposure."""
    v = {"yaw": rng.uniform(-20, 20), "pitch": rng.uniform(-15, 15), "roll": rng.uniform(-10, 10),
         "inter_eye_px": rng.uniform(30, 90), "face_fraction": rng.uniform(0.3, 0.8),
         "sharpness": rng.uniform(80, 400), "luma_mean": rng.uniform(0.35, 0.65), "luma_std": rng.uniform(0.1, 0.25),
         "under_exposed": rng.uniform(0, 0.05), "over_exposed": rng.uniform(0, 0.05),
         "dynamic_range": rng.uniform(5, 7.5)}
    fail = {1: ("yaw", rng.choice([-1, 1]) * rng.uniform(40, 70)), 2: ("inter_eye_px", rng.uniform(8, 18)),
            3: ("sharpness", rng.uniform(5, 40)), 4: ("luma_mean", rng.uniform(0.02, 0.12))}.get(i % 10)
    if fail:
        v[fail[0]] = fail[1]
    return {k: float(x) for k, x in v.items()}


def face_run(tmp_path, n: int = 40, seed: int = 0, run_id: str = "20250101T000000Z-aaaaaa", version: str = "v1",
             components: bool = False, **decision) -> tuple[str, str, pa.Table]:
    """A committed run over real image files: scored, rejected for each reason, no_face and error rows.
    With `components`, the rows also carry quality components, the component rules are on, and
    SER-FIQ falls with |yaw| (as it does on real side faces)."""
    rng = np.random.default_rng(seed)
    img_dir = tmp_path / "crops"
    img_dir.mkdir(exist_ok=True)
    kinds = ("clean", "blur", "downscale", "noise", "jpeg", "dark")
    rows = []
    broken = list(broken_inputs(seed).items())
    unscored = dict.fromkeys(["serfiq", "dbcnn", "mask_fraction", *(columns.COMPONENTS if components else ())],
                             np.nan)
    for i in range(n):
        if i % 10 == 9:  # an undecodable file: an error row, no preview possible
            name, data = broken[i // 10 % len(broken)]
            path = img_dir / f"err_{i:03d}_{name}"
            path.write_bytes(data)
            rows.append({"uri": str(path), "status": ERROR, "error": f"cannot decode image: {name}", **unscored})
            continue
        kind = kinds[i % len(kinds)]
        path = img_dir / f"face_{i:03d}_{kind}.jpg"
        path.write_bytes(encode(degrade(draw_face(160, seed + i), kind, seed + i), "JPEG"))
        if i % 10 == 8:
            rows.append({"uri": str(path), "status": NO_FACE, "error": None, **unscored})
            continue
        row = {"uri": str(path), "status": OK, "error": None,
               "serfiq": 0.2 if i % 10 == 5 else 0.8 if i % 10 == 6 else float(rng.uniform(0.05, 0.95)),
               "dbcnn": 0.1 if i % 10 == 6 else float(rng.normal(0.5, 0.15)),
               "mask_fraction": 0.01 if i % 10 == 7 else float(rng.uniform(0.15, 0.6))}
        if components:
            row.update(component_values(i, rng))
            if i % 10 != 5:
                row["serfiq"] = float(np.clip(0.95 - 0.012 * abs(row["yaw"]) + rng.normal(0, 0.03), 0, 1))
        rows.append(row)
    cfg = decision_cfg(**({"min_serfiq": 0.4, "min_dbcnn": 0.3} | (COMPONENT_RULES if components else {})
                          | decision))
    table = scored_table({k: [r[k] for r in rows] for k in rows[0]}, cfg, run_id, version)
    out = str(tmp_path / "out")
    return out, write_run(out, table, run_id, cfg, files=2), table


# ---------------------------------------------------------------- aggregates


def test_aggregates_match_brute_force(tmp_path):
    out, run, table = face_run(tmp_path, n=60)
    ref = runs.resolve_run(run)
    agg = report.aggregate(ref, top_k=5, per_reason=3)
    rows = table.to_pylist()
    assert agg.rows == len(rows) == 60
    assert dict(agg.decision) == {d: sum(r["decision"] == d for r in rows) for d in ("accepted", "rejected")}
    reasons = {r["reject_reason"] for r in rows} - {None}
    assert reasons == {"unrecognisable", "face_too_small", "low_quality", "no_face", "error"}
    assert dict(agg.reason) == {k: sum(r["reject_reason"] == k for r in rows) for k in reasons}
    assert dict(agg.status) == {k: sum(r["status"] == k for r in rows) for k in ("scored", "no_face", "error")}

    # Histograms: each finite score lands in exactly one bin of its decision.
    for col in ("serfiq", "dbcnn", "cafi", "mask_fraction"):
        hist = agg.hists[col]
        for dec in ("accepted", "rejected"):
            vals = [r[col] for r in rows if r["decision"] == dec and r[col] is not None and np.isfinite(r[col])]
            assert hist.counts[dec].sum() == len(vals), (col, dec)
            assert np.array_equal(hist.counts[dec], np.histogram(vals, bins=hist.edges)[0])
    assert [t.value for t in agg.hists["serfiq"].thresholds] == [0.4]
    assert [t.value for t in agg.hists["dbcnn"].thresholds] == [0.3]
    assert [t.value for t in agg.hists["cafi"].thresholds] == [0.3]
    assert [t.value for t in agg.hists["mask_fraction"].thresholds] == [0.05]
    # A run without components or other scorers draws no chart for them.
    assert set(agg.hists) == {"serfiq", "dbcnn", "cafi", "mask_fraction"} and set(agg.scatters) == {"decision"}
    assert agg.hists["serfiq"].edges[0] == 0.0 and agg.hists["serfiq"].edges[-1] == 1.0

    accepted = sorted((r for r in rows if r["accepted"]), key=lambda r: (-r["cafi"], r["uri"]))
    assert agg.best.column("uri").to_pylist() == [r["uri"] for r in accepted[:5]]
    worst = sorted((r for r in rows if r["accepted"]), key=lambda r: (r["cafi"], r["uri"]))
    assert agg.worst.column("uri").to_pylist() == [r["uri"] for r in worst[:5]]
    for reason, sample in agg.samples.items():
        assert sample.num_rows == min(3, agg.reason[reason])
        assert set(sample.column("reject_reason").to_pylist()) == {reason}
    assert list(agg.samples) == ["error", "no_face", "unrecognisable", "face_too_small", "low_quality"]
    scored = [r for r in rows if r["status"] == "scored"]
    scatter = agg.scatters["decision"]
    assert (scatter.x, scatter.y) == ("serfiq", "dbcnn")
    assert scatter.total == scatter.points.num_rows == len(scored)
    assert sorted(scatter.points.column("group").to_pylist()) == sorted(r["reject_reason"] or "accepted"
                                                                       for r in scored)


def test_uri_hash_is_stable_and_spread():
    uris = [f"s3://bucket/crops/{i:07d}.jpg" for i in range(20000)] + ["", "a", "ü/ñ"]
    arr = pa.array(uris)
    h = report.uri_hash(arr)
    assert len(set(h.tolist())) == len(uris)
    # Same value whatever the batch boundaries, the array offset or the string type.
    assert np.array_equal(np.concatenate([report.uri_hash(arr.slice(0, 777)), report.uri_hash(arr.slice(777))]), h)
    assert np.array_equal(report.uri_hash(pa.chunked_array([arr.slice(0, 5), arr.slice(5)])), h)
    assert np.array_equal(report.uri_hash(arr.cast(pa.large_string())), h)
    assert report.uri_hash(pa.array(["a", None]))[1] == report.uri_hash(pa.array([""]))[0]
    # The documented definition, computed the slow way.
    m, inv = 1 << 64, pow(report._BASE, -1, 1 << 64)
    for u in ("", "a", "ü/ñ", uris[12345], "s3://b/" * 40):
        b = u.encode()
        poly = sum(c * pow(inv, i, m) for i, c in enumerate(b)) % m
        mixed = np.uint64(poly ^ (len(b) * 0xD6E8FEB86659FD93 % m))
        assert report._mix(np.array([mixed], np.uint64))[0] == report.uri_hash(pa.array([u]))[0]
    # Roughly uniform: the smallest 10% by hash is not the first 10% of the list.
    low = np.argsort(h)[: len(h) // 10]
    assert 0.3 < np.mean(low < len(h) // 2) < 0.7


def test_resolve_run_and_root(tmp_path):
    out, run, _ = face_run(tmp_path, n=10, run_id="20250101T000000Z-aaaaaa")
    ref = runs.resolve_run(run)
    assert (ref.output, ref.run_id, ref.uri) == (out, "20250101T000000Z-aaaaaa", run)
    assert runs.resolve_run(run + "/").run_id == ref.run_id
    # A later run: the output root resolves to it.
    cfg = decision_cfg()
    t2 = scored_table({"uri": ["x1", "x2"], "serfiq": [0.9, 0.1], "dbcnn": [0.5, 0.5]}, cfg,
                      "20250102T000000Z-bbbbbb", "v2")
    write_run(out, t2, "20250102T000000Z-bbbbbb", cfg, summary={"finished_at": "2025-01-02T00:00:00+00:00"})
    assert runs.resolve_run(out).run_id == "20250102T000000Z-bbbbbb"
    # An uncommitted run is refused, with the reason.
    t3 = scored_table({"uri": ["y"], "serfiq": [0.9], "dbcnn": [0.5]}, cfg, "20250103T000000Z-cccccc", "v2")
    uncommitted = write_run(out, t3, "20250103T000000Z-cccccc", cfg, commit=False)
    os.makedirs(uncommitted)
    with pytest.raises(CafiError, match="not committed"):
        runs.resolve_run(uncommitted)
    with pytest.raises(CafiError, match="does not exist"):
        runs.resolve_run(str(tmp_path / "nowhere"))
    with pytest.raises(CafiError, match="neither a run"):
        runs.resolve_run(str(tmp_path / "crops"))
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    with pytest.raises(CafiError, match="no committed run"):
        runs.resolve_run(str(empty))


def test_report_only_counts_its_own_run(tmp_path):
    out, run, table = face_run(tmp_path, n=20, run_id="20250101T000000Z-aaaaaa")
    cfg = decision_cfg()
    other = scored_table({"uri": [f"/other/{i}.jpg" for i in range(7)], "serfiq": [0.9] * 7, "dbcnn": [0.5] * 7},
                         cfg, "20250102T000000Z-bbbbbb", "v1")
    write_run(out, other, "20250102T000000Z-bbbbbb", cfg)
    agg = report.aggregate(runs.resolve_run(run))
    assert agg.rows == 20
    assert report.aggregate(runs.resolve_run(manifest.run_uri(out, "20250102T000000Z-bbbbbb"))).rows == 7


# ---------------------------------------------------------------- the page


def test_report_is_self_contained_and_fetches_shown_rows_only(tmp_path, monkeypatch):
    out, run, table = face_run(tmp_path, n=80)
    fetched: list[str] = []
    caps: list = []
    real = fetch.read_bytes

    def counting(uris, storage, counts=None, max_bytes=None):
        fetched.extend(uris)
        caps.append(max_bytes)
        return real(uris, storage, counts, max_bytes=max_bytes)

    monkeypatch.setattr(fetch, "read_bytes", counting)
    path = report.write_report(run)
    assert path == os.path.join(run, "report.html")
    page = open(path, encoding="utf-8").read()
    ref = runs.resolve_run(run)
    agg = report.aggregate(ref)
    shown = {u for t in (agg.best, agg.worst, *agg.samples.values()) for u in t.column("uri").to_pylist()}
    assert set(fetched) == shown and len(fetched) == len(shown) < table.num_rows
    assert caps and set(caps) == {runs.image_config(ref.summary).max_bytes}  # every read capped at the run's limit

    # Nothing is loaded from elsewhere when the page is viewed.
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:image/jpeg;base64,"), attr
    assert "<link" not in page and "@import" not in page and "url(" not in page
    # Charts, counts, model version, config and stage throughput are on the page.
    for chart in ("hist-serfiq", "hist-dbcnn", "hist-cafi", "hist-mask_fraction", "scatter", "stages"):
        assert f'data-chart="{chart}"' in page
    assert "decision.min_serfiq = 0.4" in page and "min_dbcnn = 0.3" in page
    assert "MapBatches(Detect)" in page and "images/s" in page
    assert "&quot;min_serfiq&quot;: 0.4" in page  # the config block
    assert ref.summary["model_version"] in page
    for reason in agg.reason:
        assert f"Rejected: {reason}" in page
    # Every decodable shown crop is an inline thumbnail; the undecodable (error rows) get a placeholder.
    figure_uris = [u for t in (agg.best, agg.worst, *agg.samples.values()) for u in t.column("uri").to_pylist()]
    thumbs = report.thumbnails([{"uri": u} for u in figure_uris], None)
    assert page.count('<figure class="thumb">') == len(figure_uris)
    assert page.count('<img class="thumb"') == sum(isinstance(thumbs[u], str) for u in figure_uris)
    assert page.count('class="noimg"') == sum(isinstance(thumbs[u], Exception) for u in figure_uris)
    assert all(isinstance(thumbs[u], str) for u in figure_uris if "/face_" in u)
    assert any(isinstance(thumbs[u], Exception) for u in figure_uris if "/err_" in u)
    # Captions carry the scores and the URI.
    best = agg.best.to_pylist()[0]
    assert f"serfiq {best['serfiq']:.3f}" in page and best["uri"] in page


def test_report_out_option_and_root(tmp_path):
    out, run, _ = face_run(tmp_path, n=12)
    dest = str(tmp_path / "elsewhere" / "r.html")
    assert report.write_report(out, out=dest) == dest
    assert "cafi run report: 20250101T000000Z-aaaaaa" in open(dest, encoding="utf-8").read()


def test_thumbnails_of_hostile_images_are_made_in_bounded_memory_or_are_placeholders(tmp_path):
    """Thumbnails decode with min_side=1: a 3.9 KB PNG of 4,000,000 x 1 (an error row in a run) was
    padded to a 43.7 TiB square and raised MemoryError in `cafi report` and the end-of-run report."""
    files = {"face.jpg": encode(draw_face(200, 1), "JPEG"), "line.png": png_flat(4_000_000, 1, 255),
             "long.png": png_flat(1_250_000, 32, 255), "bomb.png": broken_inputs()["bomb.png"],
             "doc.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"}
    rows = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        rows.append({"uri": str(tmp_path / name)})
    thumbs = report.thumbnails(rows, None)
    got = {os.path.basename(uri): thumb for uri, thumb in thumbs.items()}
    assert all(isinstance(got[n], str) and got[n].startswith("data:image/jpeg;base64,")
               for n in ("face.jpg", "line.png", "long.png"))
    assert "image too large" in str(got["bomb.png"]) and "unsupported image format: EPS" in str(got["doc.eps"])
    page = report._figure({"uri": rows[-1]["uri"], "status": "error", "error": str(got["doc.eps"])}, thumbs,
                          "serfiq", "dbcnn")
    assert 'class="noimg"' in page


def test_report_of_run_without_scored_rows(tmp_path):
    cfg = decision_cfg()
    t = scored_table({"uri": ["/nope/a.jpg", "/nope/b.jpg"], "status": [ERROR, NO_FACE], "error": ["gone", None],
                      "serfiq": [np.nan, np.nan], "dbcnn": [np.nan, np.nan]}, cfg, "20250101T000000Z-dddddd", "v1")
    out = str(tmp_path / "out")
    run = write_run(out, t, "20250101T000000Z-dddddd", cfg, summary={"stages": {}})
    page = open(report.write_report(run), encoding="utf-8").read()
    assert "no scored rows" in page and "no operator statistics" in page
    assert page.count('class="noimg"') == 2


def test_report_of_quality_components_and_their_reasons(tmp_path):
    out, run, table = face_run(tmp_path, n=60, components=True)
    rows = table.to_pylist()
    agg = report.aggregate(runs.resolve_run(run), per_reason=3)
    # Every component has values here, so every one has a histogram, with the rows of its decision in it.
    assert set(agg.hists) == {"serfiq", "dbcnn", "cafi", "mask_fraction", *columns.COMPONENTS}
    for col in columns.COMPONENTS:
        hist = agg.hists[col]
        for dec in ("accepted", "rejected"):
            vals = [r[col] for r in rows if r["decision"] == dec and r[col] is not None and np.isfinite(r[col])]
            assert np.array_equal(hist.counts[dec], np.histogram(vals, bins=hist.edges)[0]), col
    # Thresholds as configured: yaw and pitch at +-, luminance at both ends, one-sided limits once.
    lines = {c: sorted(t.value for t in h.thresholds) for c, h in agg.hists.items()}
    assert lines["yaw"] == [-30, 30] and lines["pitch"] == [-25, 25]
    assert lines["luma_mean"] == [0.15, 0.85] and lines["inter_eye_px"] == [20] and lines["sharpness"] == [50]
    assert lines["over_exposed"] == [0.2] and lines["under_exposed"] == [] and lines["roll"] == []
    # Signed angles are drawn symmetric about frontal.
    assert agg.hists["yaw"].edges[0] == pytest.approx(-agg.hists["yaw"].edges[-1])
    # The new reasons have their thumbnails, in the decision's precedence order.
    assert {"pose", "low_resolution", "blur", "exposure"} <= set(agg.samples)
    assert list(agg.samples) == [r for r in REASONS if r in agg.reason]
    # Yaw against the FIQA score the run decided with, every scored row with a yaw.
    pose = agg.scatters["pose"]
    assert (pose.x, pose.y) == ("yaw", "serfiq")
    assert pose.total == pose.points.num_rows == sum(r["status"] == "scored" for r in rows)
    page = report.render(runs.resolve_run(run), agg, {})
    for chart in ("hist-yaw", "hist-pitch", "hist-inter_eye_px", "hist-luma_mean", "scatter-pose"):
        assert f'data-chart="{chart}"' in page
    assert "decision.max_yaw = ±30" in page and "decision.min_luma_mean = 0.15" in page
    assert "Rejected: pose" in page and "Rejected: exposure" in page
    assert page.index("Rejected: pose") < page.index("Rejected: low_resolution") < page.index("Rejected: blur")
    pose_row = agg.samples["pose"].to_pylist()[0]
    assert f"yaw {pose_row['yaw']:.2f}" in page  # the caption shows the measure behind the reason


def test_report_follows_the_runs_scorers(tmp_path):
    """A run that decided with MagFace and TOPIQ-face: its histograms, thresholds and axes are theirs."""
    rng = np.random.default_rng(4)
    n = 30
    cfg = decision_cfg(fiqa="magface", iqa="topiq_face", min_magface=22, min_topiq_face=0.4)
    table = scored_table({"uri": [f"/no/such/{i}.jpg" for i in range(n)], "magface": rng.uniform(15, 35, n),
                          "topiq_face": rng.uniform(0.1, 0.9, n)}, cfg, "20250101T000000Z-777777", "v1")
    out = str(tmp_path / "out")
    run = write_run(out, table, "20250101T000000Z-777777", cfg)
    assert set(table["reject_reason"].to_pylist()) == {None, "unrecognisable", "low_quality"}
    agg = report.aggregate(runs.resolve_run(run))
    assert (agg.fiqa, agg.iqa) == ("magface", "topiq_face")
    assert set(agg.hists) == {"magface", "topiq_face", "cafi", "mask_fraction"}  # no SER-FIQ, no DBCNN
    assert [t.value for t in agg.hists["magface"].thresholds] == [22]
    assert [t.value for t in agg.hists["cafi"].thresholds] == [0.4]
    assert (agg.scatters["decision"].x, agg.scatters["decision"].y) == ("magface", "topiq_face")
    page = report.render(runs.resolve_run(run), agg, {})
    assert "magface vs topiq_face" in page and "decision.min_magface = 22" in page
    assert "FIQA magface, IQA topiq_face" in page


def test_decision_config_reads_every_threshold():
    every = {f.name: 0.5 + i for i, f in enumerate(dataclasses.fields(DecisionConfig))}
    summary = {"config": {"decision": {**every, "min_something_newer": 3}}}
    assert dataclasses.asdict(runs.decision_config(summary)) == every
    old = runs.decision_config({"config": {"decision": {"min_serfiq": 0.6, "min_mask_fraction": 0.1,
                                                          "min_dbcnn": None}}})
    assert old == DecisionConfig(min_serfiq=0.6, min_mask_fraction=0.1)
    assert runs.decision_config({}) == DecisionConfig()
    assert runs.scorers({}) == ("serfiq", "dbcnn")
    assert runs.scorers({"config": {"models": {"fiqa": {"kind": "magface"}}}}) == ("magface", "dbcnn")


def test_report_config_table_shows_no_credential_of_a_uri(tmp_path, monkeypatch):
    """A summary written before redaction holds the weights URI resolved (token in the userinfo, a
    signature in the query): the report's config table and run URI show them redacted."""
    token, sig = "tok-5e1f0c2a9b", "sig-77d2c4e0aa"
    monkeypatch.setenv("CAFI_TEST_TOKEN", token)
    cfg = to_dict(load_config([], ["input.uri=unused", "output.uri=unused",
                                   "models.dbcnn.weights.uri=https://user:${oc.env:CAFI_TEST_TOKEN}@host/w.pth?sig="
                                   + sig, "models.dbcnn.weights.sha256=" + "a" * 64]))
    assert token in json.dumps(cfg) and sig in json.dumps(cfg)  # what a summary held until now
    t = scored_table({"uri": ["/nope/a.jpg"], "status": [ERROR], "error": ["gone"], "serfiq": [np.nan],
                      "dbcnn": [np.nan]}, cfg, "20250101T000000Z-5ec5ec", "v1")
    out = str(tmp_path / "out")
    run = write_run(out, t, "20250101T000000Z-5ec5ec", cfg, summary={"stages": {}})
    page = open(report.write_report(run), encoding="utf-8").read()
    assert token not in page and sig not in page and "user:" not in page
    assert "https://host/w.pth" in page  # the config table still names the checkpoint
    ref = runs.RunRef(out, "20250101T000000Z-5ec5ec", f"s3://user:{token}@b/out/runs/r?sig={sig}",
                      runs.resolve_run(run).summary)
    agg = report.aggregate(runs.resolve_run(run))
    page = report.render(ref, agg, {})
    assert token not in page and sig not in page and "s3://b/out/runs/r" in page


def test_report_of_a_run_in_object_storage(tmp_path, s3):
    """Manifest, summary and crops in S3 (a real S3 server on loopback); the report is written there too."""
    s3.mkdir("cafi-bucket")
    uris = []
    for i in range(6):
        key = f"cafi-bucket/crops/face_{i}.jpg"
        s3.pipe(key, encode(draw_face(128, i), "JPEG"))
        uris.append(f"s3://{key}")
    cfg = decision_cfg(min_serfiq=0.5)
    cfg["input"]["uri"] = "s3://cafi-bucket/crops/"  # what the run listed: thumbnails read its scheme only
    run_id = "20250101T000000Z-5a5a5a"
    table = scored_table({"uri": uris, "serfiq": [0.9, 0.8, 0.7, 0.3, 0.2, 0.95], "dbcnn": [0.5] * 6}, cfg,
                         run_id, "v1")
    local = str(tmp_path / "local")
    write_run(local, table, run_id, cfg)
    s3.put(local + "/", "cafi-bucket/out", recursive=True)
    run = f"s3://cafi-bucket/out/runs/{run_id}"
    assert runs.resolve_run("s3://cafi-bucket/out").run_id == run_id
    dest = report.write_report(run)
    assert dest == f"{run}/report.html"
    page = s3.cat(dest[len("s3://"):]).decode("utf-8")
    assert page.count('<img class="thumb"') == page.count('<figure class="thumb">') > 0
    assert 'class="noimg"' not in page


# ---------------------------------------------------------------- scale: streamed, never loaded whole

SCALE_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import pyarrow as pa
    from cafi import fetch, report
    calls = []
    real = fetch.read_bytes
    fetch.read_bytes = lambda uris, storage, counts=None, max_bytes=None: calls.append(list(uris)) or real(
        uris, storage, counts, max_bytes)
    pool = pa.default_memory_pool()
    t0 = time.time()
    ref, page = report.build(sys.argv[1])
    print(json.dumps({"seconds": time.time() - t0, "arrow_peak": pool.max_memory(),
                      "fetched": sum(len(c) for c in calls), "page_bytes": len(page),
                      "figures": page.count('<figure class="thumb">'),
                      "scatter_note": page.count("sample by URI hash")}))
""")


def big_run(output: str, rows: int, run_id: str = "20250101T000000Z-eeeeee") -> int:
    """A committed run of `rows` synthetic rows (URIs of files that do not exist), written in chunks
    with vectorised Arrow compute (the decision rule of `decide`, without its per-row Python).
    Returns the bytes the run's rows would take as one in-memory table.

    The files have every column but `embedding` (as a run without output.embeddings may write them;
    readers see nulls): a null fixed-size list still holds its 512 zeros per row in memory."""
    rng = np.random.default_rng(1)
    cfg = decision_cfg(min_serfiq=0.5, min_dbcnn=0.2)
    chunk, nbytes = 250_000, 0
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = pa.array(np.arange(start, start + n)).cast(pa.string())
        serfiq = pa.array(rng.beta(5, 2, n).astype(np.float32))
        dbcnn = pa.array(rng.normal(0.45, 0.2, n).astype(np.float32))
        frac = pa.array(rng.uniform(0.0, 0.6, n).astype(np.float32))
        no_face = pa.array(rng.random(n) < 0.03)
        reason = pc.case_when(
            pc.make_struct(no_face, pc.less(serfiq, 0.5), pc.less(frac, 0.05), pc.less(dbcnn, 0.2)),
            "no_face", "unrecognisable", "face_too_small", "low_quality")
        accepted = pc.is_null(reason)
        nan = pa.array(np.full(n, np.nan, np.float32))
        t = pa.table({
            "uri": pc.binary_join_element_wise(f"{output}/no-such-crops/shard-0042/", idx, ".jpg", ""),
            "status": pc.if_else(no_face, "no_face", "scored"), "error": pa.nulls(n, pa.string()),
            "width": pa.array(np.full(n, 384, np.int32)), "height": pa.array(np.full(n, 384, np.int32)),
            "det_score": pc.if_else(no_face, nan, pa.array(np.full(n, 0.99, np.float32))),
            "mask_fraction": pc.if_else(no_face, nan, frac), "serfiq": pc.if_else(no_face, nan, serfiq),
            "serfiq_raw": pc.if_else(no_face, nan, serfiq), "dbcnn": pc.if_else(no_face, nan, dbcnn),
            "cafi": pc.if_else(accepted, dbcnn, nan), "accepted": accepted,
            "decision": pc.if_else(accepted, "accepted", "rejected"), "reject_reason": reason,
            "model_version": pa.array(["v1"] * n), "run_id": pa.array([run_id] * n),
            "scored_at": pa.array(np.full(n, np.datetime64("2025-01-01T00:00:00", "us"))),
        })
        t = pa.table({f.name: t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(n, f.type)
                      for f in columns.SCHEMA if f.name != "embedding"})
        nbytes += t.nbytes
        for dec in ("accepted", "rejected"):
            d = os.path.join(manifest.manifest_uri(output), "model_version=v1", f"decision={dec}")
            os.makedirs(d, exist_ok=True)
            sub = t.filter(pc.equal(t["decision"], dec)).drop_columns(["model_version", "decision"])
            pq.write_table(sub, os.path.join(d, f"{run_id}_{start // chunk:06d}_0.parquet"), row_group_size=65536)
    manifest.commit(output, run_id, {"run_id": run_id, "model_version": "v1", "inputs": rows, "config": cfg,
                                     "finished_at": "2025-01-01T00:00:00+00:00"}, None)
    return nbytes


def test_million_row_run_is_streamed(tmp_path):
    out = str(tmp_path / "big")
    nbytes = big_run(out, 1_000_000)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SCALE_SCRIPT, out], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n1M-row report: {res}; the run as one table: {nbytes / 1e6:.0f} MB")
    # Arrow's peak allocation is a few batches, a small fraction of the run as one table.
    assert res["arrow_peak"] < nbytes / 3, (res, nbytes)
    # Only the shown rows were fetched (their files do not exist: placeholders, no failure).
    assert res["fetched"] == res["figures"] == 2 * report.TOP_K + 4 * report.PER_REASON
    assert res["scatter_note"] >= 1
    assert res["page_bytes"] < 1_000_000


# ---------------------------------------------------------------- a real browser

def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def load_in_chromium(binary: str, tmp_path, path: str) -> tuple[str, dict]:
    """The DOM of a page after load, and its body's attributes (set by the page script)."""
    dom = _chromium(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", "file://" + os.path.abspath(path))
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-report-ready") == "1", attrs
    return dom.stdout, attrs


needs_chromium = pytest.mark.skipif(chromium_binary() is None,
                                    reason="no chromium binary on PATH (apt-get install -y chromium)")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    binary = chromium_binary()
    out, run, _ = face_run(tmp_path, n=50, components=True)
    path = report.write_report(run)
    url = "file://" + os.path.abspath(path)
    ref = runs.resolve_run(run)
    agg = report.aggregate(ref)
    source = open(path, encoding="utf-8").read()
    n_thumbs = source.count('<img class="thumb"')
    assert n_thumbs > 0

    html, attrs = load_in_chromium(binary, tmp_path, path)
    assert attrs["data-broken-images"] == "0", attrs
    assert int(attrs["data-images-loaded"]) == int(attrs["data-images-total"]) == n_thumbs
    # 4 score histograms, 11 components, 2 scatters, the stage bars.
    assert int(attrs["data-charts"]) == source.count('<svg class="chart"') == 18
    for chart in ("hist-serfiq", "hist-dbcnn", "hist-cafi", "hist-mask_fraction", "hist-yaw", "hist-sharpness",
                  "scatter", "scatter-pose", "stages"):
        assert re.search(rf'<svg[^>]*data-chart="{chart}"', html), chart
    # The bars and points were rendered into the DOM.
    assert len(re.findall(r"<rect [^>]*fill=\"#2e9d5b\"", html)) > 3
    assert 'class="dots"' in html
    assert agg.best.column("uri")[0].as_py() in html

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "report.png")
    if os.path.exists(shot):
        os.remove(shot)
    proc = _chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1400,6000", "--hide-scrollbars",
                     "--virtual-time-budget=5000", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.getsize(shot) > 20_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 6000)
        # Not a blank page: the screenshot has real variety of colour.
        small = np.asarray(im.convert("RGB").resize((140, 600)))
        assert small.std() > 10
    shutil.copy(path, os.path.join(ARTIFACTS, "report.html"))


# ---------------------------------------------------------------- the real pipeline writes it

@pytest.mark.slow  # a real Ray pipeline run (about 2 minutes on the reference box)
def test_pipeline_run_writes_report(tmp_path, fast_config, ray_local, monkeypatch, caplog):
    from cafi import pipeline
    from cafi.samples import good_crops

    inp = tmp_path / "in"
    inp.mkdir()
    for name, data in good_crops(4).items():
        (inp / name).write_bytes(data)
    cfg = load_config(fast_config, [f"input.uri={inp}", f"output.uri={tmp_path / 'out'}", "output.report=true"])
    real = pipeline.write_report  # the report is written by a Ray task, then this hook fails

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("report exploded")

    monkeypatch.setattr(pipeline, "write_report", write_then_fail)
    with caplog.at_level(logging.WARNING, logger="cafi"):
        summary = pipeline.run(cfg)
    run = manifest.run_uri(str(tmp_path / "out"), summary["run_id"])
    assert manifest.is_committed(str(tmp_path / "out"), summary["run_id"])
    assert "report exploded" in caplog.text
    page = open(os.path.join(run, "report.html"), encoding="utf-8").read()
    assert f"cafi run report: {summary['run_id']}" in page
    assert glob.glob(os.path.join(run, "*")) and os.path.exists(os.path.join(run, "_SUCCESS"))
