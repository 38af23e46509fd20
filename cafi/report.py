"""One self-contained HTML page per committed run: counts, score and quality-component histograms,
the decision space, thumbnails of the best, worst and rejected crops, and per-stage throughput.

Everything is computed by streaming the run's rows out of the Parquet manifest in record
batches (two passes over a few columns), so a run of millions of rows never sits in memory
whole: counts and histogram bins are summed per batch, and the rows to show (top and bottom
k accepted, a deterministic sample per reject reason, at most a few thousand points per
scatter) are kept with `pyarrow.compute.select_k_unstable` over bounded candidate tables.
Image bytes are fetched only for the rows shown, shrunk to small JPEG thumbnails and inlined
as data URIs; charts are inline SVG (cafi/charts.py). The page needs no network when viewed.

Which columns are drawn follows the run: its FIQA and IQA scorers (`models.fiqa.kind`,
`models.iqa.kind` in its summary), and every other score or quality component that has values.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import logging
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import columns, runs
from cafi.charts import Line, Region, bars_svg, esc, histogram_svg, num, page, scatter_svg, tick
from cafi.config import DecisionConfig, ImageConfig, StorageConfig
from cafi.decision import REASONS
from cafi.errors import CafiError
from cafi.redact import redact_uri, redact_values
from cafi.runs import RunRef, decision_config, resolve_run, run_ids
from cafi.stages.specs import all_specs
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

REPORT = "report.html"
BINS = 40
THUMB = 96
TOP_K = 12
PER_REASON = 8
SCATTER_POINTS = 5000
COLORS = {
    "accepted": "#2e9d5b", "rejected": "#d1495b", "unrecognisable": "#d1495b", "face_too_small": "#e09a1a",
    "low_quality": "#8d5fd3", "pose": "#1f77b4", "low_resolution": "#17becf", "blur": "#8c564b",
    "exposure": "#bcbd22", "no_face": "#5c6b73", "error": "#333333",
}
_SCORER_SPECS = [s for s in all_specs() if s.score]  # every scorer's title and range: its spec's
SCORERS = tuple(s.score for s in _SCORER_SPECS)
HIST_COLUMNS = (*SCORERS, "cafi", "mask_fraction", *columns.COMPONENTS)
# Scales fixed by definition: histograms of different runs compare.
FIXED_RANGE = {**{s.score: s.value_range for s in _SCORER_SPECS if s.value_range}, "mask_fraction": (0.0, 1.0),
               "face_fraction": (0.0, 1.0), "luma_mean": (0.0, 1.0), "under_exposed": (0.0, 1.0),
               "over_exposed": (0.0, 1.0), "dynamic_range": (0.0, 8.0)}
SIGNED_ANGLES = ("yaw", "pitch", "roll")  # drawn symmetric about 0 (frontal)
TITLES = {**{s.score: s.title for s in _SCORER_SPECS},
          "cafi": "CAFI score (accepted rows)", "mask_fraction": "face mask fraction",
          "yaw": "head yaw", "pitch": "head pitch", "roll": "head roll", "inter_eye_px": "eye distance in the source",
          "face_fraction": "face box fraction", "sharpness": "sharpness (Laplacian variance)",
          "luma_mean": "mean face luminance", "luma_std": "face luminance spread",
          "under_exposed": "under-exposed face pixels", "over_exposed": "over-exposed face pixels",
          "dynamic_range": "face luminance entropy"}
# The one-sided thresholds that bound each column (the decision rules of cafi/decision.py).
LIMITS = {"mask_fraction": ("min_mask_fraction",), "inter_eye_px": ("min_inter_eye_px",),
          "sharpness": ("min_sharpness",), "luma_mean": ("min_luma_mean", "max_luma_mean"),
          "under_exposed": ("max_under_exposed",), "over_exposed": ("max_over_exposed",)}
SYMMETRIC_LIMITS = {"yaw": "max_yaw", "pitch": "max_pitch"}  # |value| <= limit
# What a rejected crop's caption shows besides the scores: the measure behind its reason.
REASON_COLUMNS = {"pose": ("yaw", "pitch"), "low_resolution": ("inter_eye_px",), "blur": ("sharpness",),
                  "exposure": ("luma_mean", "under_exposed", "over_exposed")}
SHOW_COLUMNS = list(dict.fromkeys(["uri", "status", "error", *SCORERS, "cafi", "mask_fraction", "det_score",
                                   "reject_reason", *(c for cs in REASON_COLUMNS.values() for c in cs),
                                   "shard_offset", "shard_size"]))  # where a shard sample's bytes are
SCATTER_SCHEMA = pa.schema([("x", pa.float32()), ("y", pa.float32()), ("group", pa.string()),
                            ("h", pa.uint64())])


# ---------------------------------------------------------------- streaming aggregation

_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2**64
_POW = np.ones(1, dtype=np.uint64)    # _BASE**i mod 2**64
_IPOW = np.ones(1, dtype=np.uint64)   # _BASE**-i mod 2**64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _POW, _IPOW
    if len(_POW) < n:
        size = max(n, 2 * len(_POW), 1 << 16)
        one = np.ones(1, dtype=np.uint64)
        _POW = np.concatenate([one, np.cumprod(np.full(size - 1, _BASE, np.uint64), dtype=np.uint64)])
        _IPOW = np.concatenate([one, np.cumprod(np.full(size - 1, pow(_BASE, -1, 1 << 64), np.uint64),
                                                dtype=np.uint64)])
    return _POW, _IPOW


def uri_hash(arr: pa.Array | pa.ChunkedArray, rows_per_step: int = 4096) -> np.ndarray:
    """A stable 64-bit hash per string, vectorised: the same URI always gets the same value,
    whatever batch it arrives in, so hash-ordered samples are deterministic.

    A polynomial hash of the bytes (sum of b_i * BASE**-(i - start) mod 2**64, from one prefix
    sum over the byte buffer), then mixed with the length by splitmix64's finaliser."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    for a in range(0, n, rows_per_step):  # steps keep the power tables and temporaries small
        off = offsets[a:min(n, a + rows_per_step) + 1]
        lo, hi = int(off[0]), int(off[-1])
        pw, ipw = _powers(hi - lo + 1)
        prefix = np.zeros(hi - lo + 1, dtype=np.uint64)
        np.cumsum(data[lo:hi] * ipw[: hi - lo], dtype=np.uint64, out=prefix[1:])
        starts, ends = off[:-1] - lo, off[1:] - lo
        h = (prefix[ends] - prefix[starts]) * pw[starts]
        out[a:a + len(starts)] = _mix(h ^ (np.diff(off).astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
    return out


class _Keep:
    """The k smallest rows by some sort keys, over a stream of tables."""

    def __init__(self, k: int, sort_keys: list[tuple[str, str]]):
        self.k, self.sort_keys, self.table = k, sort_keys, None

    def _cut(self, t: pa.Table) -> pa.Table:
        if t.num_rows <= self.k:
            return t
        return t.take(pc.select_k_unstable(t, k=self.k, sort_keys=self.sort_keys))

    def add(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        t = self._cut(t)
        self.table = t if self.table is None else self._cut(pa.concat_tables([self.table, t]))

    def result(self, schema: pa.Schema) -> pa.Table:
        if self.table is None:
            return schema.empty_table()
        order = pc.sort_indices(self.table, sort_keys=self.sort_keys)
        return self.table.take(order)


@dataclass
class Histogram:
    column: str
    edges: np.ndarray
    counts: dict[str, np.ndarray]          # per decision
    thresholds: list[Line] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(int(c.sum()) for c in self.counts.values()))


@dataclass
class Scatter:
    x: str                                  # column names
    y: str
    points: pa.Table                        # x, y, group, h: at most SCATTER_POINTS rows, by URI hash
    total: int                              # rows with both values


@dataclass
class Aggregates:
    fiqa: str = runs.DEFAULT_FIQA           # the scorer columns the run decided with
    iqa: str = runs.DEFAULT_IQA
    rows: int = 0
    status: Counter = field(default_factory=Counter)
    decision: Counter = field(default_factory=Counter)
    reason: Counter = field(default_factory=Counter)
    hists: dict[str, Histogram] = field(default_factory=dict)
    scatters: dict[str, Scatter] = field(default_factory=dict)   # "decision" (FIQA x IQA), "pose" (yaw x FIQA)
    best: pa.Table | None = None           # accepted, highest cafi first
    worst: pa.Table | None = None          # accepted, lowest cafi first
    samples: dict[str, pa.Table] = field(default_factory=dict)


def _floats(batch: pa.RecordBatch, col: str) -> np.ndarray:
    """A float column as float64 numpy, nulls as NaN."""
    return pc.fill_null(batch.column(col), float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def _counter(arr: pa.Array) -> Counter:
    out: Counter = Counter()
    for item in pc.value_counts(arr).to_pylist():
        out[item["values"]] += item["counts"]
    return out


def _edges(lo: float, hi: float, thresholds: list[Line], fixed: tuple[float, float] | None,
           symmetric: bool = False) -> np.ndarray:
    if fixed is not None:
        lo, hi = fixed
    for t in thresholds:
        if math.isfinite(t.value):
            lo, hi = min(lo, t.value), max(hi, t.value)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if symmetric:  # frontal (0) in the middle, so left and right turns compare
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    elif fixed is None:  # a little room, so the extreme rows do not sit on the frame
        pad = 0.02 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, BINS + 1)


def threshold_key(score: str) -> str:
    """decision.<key> of a scorer's rule: its spec's (a scorer newer than this code: min_<score>)."""
    return next((s.threshold for s in _SCORER_SPECS if s.score == score), f"min_{score}")


def thresholds(column: str, dec: DecisionConfig, fiqa: str, iqa: str) -> list[Line]:
    """The configured thresholds on a column's axis, as dashed lines. A scorer's threshold is drawn
    only for the scorer the run decided with (the other's threshold did not apply)."""
    def limit(name: str) -> list[Line]:
        v = getattr(dec, name, None)
        return [] if v is None else [Line(float(v), f"decision.{name} = {tick(float(v))}")]

    if column in (fiqa, iqa):
        return limit(threshold_key(column))
    if column in SCORERS:
        return []
    if column == "cafi":
        return limit(threshold_key(iqa))
    if column in SYMMETRIC_LIMITS:
        name = SYMMETRIC_LIMITS[column]
        v = getattr(dec, name)
        return [] if v is None else [Line(float(v), f"decision.{name} = ±{tick(float(v))}"), Line(-float(v))]
    return [line for name in LIMITS.get(column, ()) for line in limit(name)]


def _reason_order(reasons) -> list[str]:
    known = [r for r in REASONS if r in reasons]
    return known + sorted(r for r in reasons if r not in REASONS)


def _group(batch: pa.RecordBatch) -> pa.Array:
    """Per row: "accepted" or its reject reason (the colour of its point)."""
    reason = batch.column("reject_reason")
    return pc.if_else(pc.is_null(reason), pa.scalar("accepted"), reason)


def _points(batch: pa.RecordBatch, x: np.ndarray, y: np.ndarray, h: pa.Array) -> pa.Table:
    ok = np.isfinite(x) & np.isfinite(y)
    return pa.table({"x": pa.array(x[ok], pa.float32()), "y": pa.array(y[ok], pa.float32()),
                     "group": _group(batch).filter(pa.array(ok)), "h": h.filter(pa.array(ok))})


def aggregate(ref: RunRef, storage: StorageConfig | None = None, top_k: int = TOP_K, per_reason: int = PER_REASON,
              scatter_points: int = SCATTER_POINTS) -> Aggregates:
    """Counts, histograms and the rows to show, in two streaming passes over the run's rows."""
    dec = decision_config(ref.summary)
    fiqa, iqa = runs.scorers(ref.summary)
    agg = Aggregates(fiqa, iqa)
    candidates = list(dict.fromkeys([fiqa, iqa, *HIST_COLUMNS]))  # a scorer newer than this list, too
    missing = [c for c in (fiqa, iqa) if c not in columns.BY_NAME]
    if missing:
        raise CafiError(f"run {ref.run_id} decided with {', '.join(missing)}, which the manifest has no column for")
    # Pass 1: counts and the value ranges (for fixed histogram bins).
    lo = {c: math.inf for c in candidates}
    hi = {c: -math.inf for c in candidates}
    for batch in runs.scan(ref, storage, ["status", "decision", "reject_reason", *candidates]):
        agg.rows += batch.num_rows
        agg.status.update(_counter(batch.column("status")))
        agg.decision.update(_counter(batch.column("decision")))
        agg.reason.update({k: v for k, v in _counter(batch.column("reject_reason")).items() if k is not None})
        for c in candidates:
            if batch.column(c).null_count == batch.num_rows:
                continue
            v = _floats(batch, c)
            v = v[np.isfinite(v)]
            if len(v):
                lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
    # The decision's scorers, CAFI and the mask always have a chart; other columns where they have values.
    shown = [c for c in candidates if c in (fiqa, iqa, "cafi", "mask_fraction") or math.isfinite(lo[c])]
    # The IQA score and CAFI share one scale: one range, so their histograms compare.
    lo["cafi"] = lo[iqa] = min(lo[iqa], lo["cafi"])
    hi["cafi"] = hi[iqa] = max(hi[iqa], hi["cafi"])
    groups = sorted(agg.decision) or ["accepted", "rejected"]
    for c in shown:
        lines = thresholds(c, dec, fiqa, iqa)
        edges = _edges(lo[c], hi[c], lines, FIXED_RANGE.get(c), symmetric=c in SIGNED_ANGLES)
        agg.hists[c] = Histogram(c, edges, {g: np.zeros(BINS, dtype=np.int64) for g in groups}, lines)

    # Pass 2: histogram bins, the scatter samples, best/worst accepted and per-reason samples.
    pairs = {"decision": (fiqa, iqa)}
    if math.isfinite(lo["yaw"]):  # the finding that FIQA collapses on side faces, on this run's data
        pairs["pose"] = ("yaw", fiqa)
    scatter = {k: _Keep(scatter_points, [("h", "ascending")]) for k in pairs}
    totals = dict.fromkeys(pairs, 0)
    best = _Keep(top_k, [("cafi", "descending"), ("uri", "ascending")])
    worst = _Keep(top_k, [("cafi", "ascending"), ("uri", "ascending")])
    per = {r: _Keep(per_reason, [("h", "ascending"), ("uri", "ascending")]) for r in agg.reason}
    read = list(dict.fromkeys([*SHOW_COLUMNS, "decision", *shown, *(c for p in pairs.values() for c in p)]))
    for batch in runs.scan(ref, storage, read):
        decision = batch.column("decision").to_numpy(zero_copy_only=False).astype(object)
        values = {c: _floats(batch, c) for c in dict.fromkeys([*shown, *(c for p in pairs.values() for c in p)])}
        for c, hist in agg.hists.items():
            v = values[c]
            for g in hist.counts:
                sel = v[(decision == g) & np.isfinite(v)]
                if len(sel):
                    hist.counts[g] += np.histogram(sel, bins=hist.edges)[0]
        h = pa.array(uri_hash(batch.column("uri")), pa.uint64())
        for k, (x, y) in pairs.items():
            pts = _points(batch, values[x], values[y], h)
            totals[k] += pts.num_rows
            scatter[k].add(pts)
        table = pa.Table.from_batches([batch]).select(SHOW_COLUMNS + ["decision"]).append_column("h", h)
        acc = (decision == "accepted") & np.isfinite(values["cafi"])
        if acc.any():
            accepted = table.filter(pa.array(acc))
            best.add(accepted)
            worst.add(accepted)
        reason = batch.column("reject_reason")
        for r, keep in per.items():
            keep.add(table.filter(pc.fill_null(pc.equal(reason, r), False)))
    agg.scatters = {k: Scatter(*pairs[k], scatter[k].result(SCATTER_SCHEMA), totals[k]) for k in pairs}
    show_schema = _show_schema()
    agg.best = best.result(show_schema)
    agg.worst = worst.result(show_schema)
    agg.samples = {r: per[r].result(show_schema) for r in _reason_order(agg.reason)}
    return agg


def _show_schema() -> pa.Schema:
    return pa.schema([columns.SCHEMA.field(c) for c in [*SHOW_COLUMNS, "decision"]] + [pa.field("h", pa.uint64())])


# ---------------------------------------------------------------- thumbnails

def thumbnails(rows: list[dict], storage: StorageConfig | None, image_cfg: ImageConfig | None = None,
               size: int = THUMB, image_column: str = "jpg", input_format: str | None = None,
               schemes: tuple[str, ...] | None = None) -> dict[str, str | Exception]:
    """uri -> a data: URI of a small JPEG thumbnail, or the reason there is none, for manifest rows
    (uri, shard_offset, shard_size). Reads only these images: whole objects, or a shard sample's
    member by a ranged read, never more than the run's image.max_bytes (an oversized one is a
    placeholder, unread); decoding keeps the pipeline's size limits (bombs stay undecoded), its
    image formats and its memory bound (pixels, never the square of the longer side: a 4,000,000 x 1
    PNG is a thin line, not a 48 TB canvas)."""
    from PIL import Image

    from cafi import imaging
    from cafi.inputs.samples import read_samples

    base = image_cfg or ImageConfig()
    cfg = ImageConfig(crop_size=size, min_side=1, max_pixels=base.max_pixels, max_bytes=base.max_bytes)
    unique = list({r["uri"]: r for r in rows}.values())
    out: dict[str, str | Exception] = {}
    for start in range(0, len(unique), 64):
        chunk = unique[start:start + 64]
        got = read_samples([r["uri"] for r in chunk], [r.get("shard_offset") for r in chunk],
                           [r.get("shard_size") for r in chunk], storage, image_column=image_column,
                           max_bytes=cfg.max_bytes, input_format=input_format, schemes=schemes)
        for uri, data in zip([r["uri"] for r in chunk], got, strict=True):
            if isinstance(data, Exception):
                out[uri] = data
                continue
            try:  # imaging.decode never raises; a thumbnail that cannot be made is a placeholder
                dec = imaging.decode(data, cfg)
                if dec.error is not None:
                    out[uri] = ValueError(dec.error)
                    continue
                buf = io.BytesIO()
                Image.fromarray(dec.image).save(buf, format="JPEG", quality=80)
                out[uri] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            except Exception as exc:  # noqa: BLE001 - the page is written with "no preview" instead
                out[uri] = exc
    return out


# ---------------------------------------------------------------- charts of this page

def _unit(column: str) -> str:
    col = columns.BY_NAME.get(column)
    return f"{column} ({col.unit})" if col is not None and col.unit else column


def histogram_chart(hist: Histogram) -> str:
    return histogram_svg(f"hist-{hist.column}", TITLES.get(hist.column, hist.column), hist.edges, hist.counts,
                         COLORS, hist.thresholds, x_label=_unit(hist.column))


def _range(agg: Aggregates, column: str) -> tuple[float, float]:
    h = agg.hists.get(column)
    return (float(h.edges[0]), float(h.edges[-1])) if h is not None else FIXED_RANGE.get(column, (0.0, 1.0))


def decision_scatter(agg: Aggregates, dec: DecisionConfig) -> str:
    s = agg.scatters["decision"]
    fmin, imin = getattr(dec, threshold_key(agg.fiqa), None), getattr(dec, threshold_key(agg.iqa), None)
    return scatter_svg(
        "scatter", f"{agg.fiqa} vs {agg.iqa}: the CAFI decision space", s.points["x"].to_numpy(),
        s.points["y"].to_numpy(), s.points["group"].to_numpy(zero_copy_only=False), COLORS, _range(agg, agg.fiqa),
        _range(agg, agg.iqa), agg.fiqa, agg.iqa, _sample_note(s, "scored rows"),
        vlines=thresholds(agg.fiqa, dec, agg.fiqa, agg.iqa), hlines=thresholds(agg.iqa, dec, agg.fiqa, agg.iqa),
        region=Region(x_lo=fmin, y_lo=imin, title="accepted region (if every other rule passes)"))


def pose_scatter(agg: Aggregates, dec: DecisionConfig) -> str:
    s = agg.scatters["pose"]
    fmin = getattr(dec, threshold_key(agg.fiqa), None)
    return scatter_svg(
        "scatter-pose", f"head yaw vs {agg.fiqa}: recognisability of side faces", s.points["x"].to_numpy(),
        s.points["y"].to_numpy(), s.points["group"].to_numpy(zero_copy_only=False), COLORS, _range(agg, "yaw"),
        _range(agg, agg.fiqa), _unit("yaw"), agg.fiqa, _sample_note(s, "rows with a yaw"),
        vlines=thresholds("yaw", dec, agg.fiqa, agg.iqa), hlines=thresholds(agg.fiqa, dec, agg.fiqa, agg.iqa),
        region=Region(-dec.max_yaw if dec.max_yaw is not None else None, dec.max_yaw, fmin,
                      title="accepted region (if every other rule passes)"), empty_text="no rows with a yaw")


def _sample_note(s: Scatter, what: str) -> str:
    shown = s.points.num_rows
    return f"{shown:,} of {s.total:,} {what}" + (" (sample by URI hash)" if shown < s.total else "")


def stages_chart(operators: list[dict]) -> str:
    ops = [o for o in operators if isinstance(o.get("wall_seconds"), (int, float))]
    rows = []
    for o in ops:
        rate = o.get("rows_per_second")
        rows.append((str(o.get("operator")), float(o["wall_seconds"]),
                     f"{o['wall_seconds']:.2f} s" + (f" · {rate:,.1f} rows/s" if rate else "")))
    return bars_svg("stages", "wall seconds per stage", rows, empty_text="no operator statistics in the run summary")


# ---------------------------------------------------------------- HTML

def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "–"


def _count_table(title: str, counts: Counter, total: int, order: list[str] | None = None) -> str:
    keys = order if order is not None else sorted(counts, key=lambda k: (-counts[k], str(k)))
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="n">{counts[k]:,}</td><td class="n">{_pct(counts[k], total)}'
                   f"</td></tr>" for k in keys)
    return (f"<table><tr><th>{esc(title)}</th><th class=\"n\">rows</th><th class=\"n\">share</th></tr>{rows}"
            f'<tr><td><b>total</b></td><td class="n"><b>{total:,}</b></td><td></td></tr></table>')


def _caption_measures(row: dict) -> str:
    """The measures behind a component rule's rejection, e.g. "yaw 41.0 · pitch 3.2"."""
    cols = REASON_COLUMNS.get(row.get("reject_reason") or "", ())
    return " · ".join(f"{c} {num(row.get(c), 2)}" for c in cols)


def _figure(row: dict, thumbs: dict[str, str | Exception], fiqa: str, iqa: str) -> str:
    uri = row["uri"]
    img = thumbs.get(uri)
    if isinstance(img, str):
        pic = f'<img class="thumb" src="{img}" width="{THUMB}" height="{THUMB}" alt="{esc(uri)}">'
    else:
        why = str(img).splitlines()[0] if img is not None else "not fetched"
        pic = f'<div class="noimg" title="{esc(why)}">no preview</div>'
    scores = (f"{fiqa} {num(row.get(fiqa))} · {iqa} {num(row.get(iqa))}"
              f"<br>cafi {num(row.get('cafi'))} · mask {num(row.get('mask_fraction'), 2)}")
    measures = _caption_measures(row)
    if measures:
        scores += f"<br>{esc(measures)}"
    extra = ""
    if row.get("status") == "error" and row.get("error"):
        extra = f'<span class="why">{esc(row["error"])}</span>'
    elif row.get("reject_reason"):
        extra = f'<span class="why">{esc(row["reject_reason"])}</span>'
    return (f'<figure class="thumb">{pic}<figcaption>{scores}{extra}<span class="uri">{esc(uri)}</span>'
            f"</figcaption></figure>")


def _grid(title: str, table: pa.Table, thumbs: dict, agg: Aggregates, note: str = "") -> str:
    rows = table.to_pylist()
    body = "".join(_figure(r, thumbs, agg.fiqa, agg.iqa) for r in rows) or "<p>none</p>"
    return f"<h3>{esc(title)}</h3>{f'<p>{esc(note)}</p>' if note else ''}<div class=\"grid-thumbs\">{body}</div>"


def _stage_table(summary: dict) -> str:
    ops = (summary.get("stages") or {}).get("operators") or []
    head = ("<table><tr><th>operator</th><th class=\"n\">tasks</th><th class=\"n\">blocks</th>"
            "<th class=\"n\">wall s</th><th class=\"n\">rows</th><th class=\"n\">rows/s</th></tr>")
    rows = "".join(
        f"<tr><td>{esc(o.get('operator'))}</td><td class=\"n\">{esc(o.get('tasks', '–'))}</td>"
        f"<td class=\"n\">{esc(o.get('blocks', '–'))}</td><td class=\"n\">{num(o.get('wall_seconds'), 2)}</td>"
        f"<td class=\"n\">{esc(o.get('rows', '–'))}</td><td class=\"n\">{num(o.get('rows_per_second'), 1)}</td></tr>"
        for o in ops)
    return head + rows + "</table>" + stages_chart(ops)


def _thresholds_text(dec: DecisionConfig) -> str:
    on = [f"{f.name} = {getattr(dec, f.name)}" for f in fields(dec)
          if getattr(dec, f.name) is not None and f.name != "fusion"]
    if dec.fusion.weights:
        on.append("fused = " + " + ".join(f"{w:g} {c}" for c, w in dec.fusion.weights.items()) + " (normalised)")
    return ", ".join(on) + " (every other rule off)"


def render(ref: RunRef, agg: Aggregates, thumbs: dict[str, str | Exception]) -> str:
    s = ref.summary
    dec = decision_config(s)
    version = s.get("model_version", "?")
    included = [r for r in run_ids(ref) if r != ref.run_id]
    meta = [
        ("run", ref.run_id), ("run URI", redact_uri(ref.uri)), ("model version", version),
        ("synthetic weights", s.get("synthetic_weights")), ("inputs", s.get("inputs")),
        *([("scored by this run", s["scored_now"])] if "scored_now" in s else []),
        ("rows in this report", f"{agg.rows:,}" + (f" (written by this run and by {len(included)} earlier attempt(s) "
                                                    "of this model version it took over)" if included else "")),
        ("started", s.get("started_at")), ("finished", s.get("finished_at")),
        ("wall seconds", s.get("wall_seconds")), ("images / second", s.get("images_per_second")),
        ("scorers", f"FIQA {agg.fiqa}, IQA {agg.iqa}"), ("thresholds", _thresholds_text(dec)),
    ]
    warn = ""
    if s.get("synthetic_weights"):
        warn += ('<div class="warn">Scored with <b>synthetic (random) weights</b>: the numbers show the '
                 "pipeline works, not the quality of these crops.</div>")
    head = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in meta)
    counts = (_count_table("decision", agg.decision, agg.rows)
              + _count_table("reject reason", agg.reason, sum(agg.reason.values()), _reason_order(agg.reason))
              + _count_table("status", agg.status, agg.rows))
    scores = "".join(histogram_chart(h) for c, h in agg.hists.items() if c not in columns.COMPONENTS)
    components = "".join(histogram_chart(h) for c, h in agg.hists.items() if c in columns.COMPONENTS)
    scatters = decision_scatter(agg, dec) + (pose_scatter(agg, dec) if "pose" in agg.scatters else "")
    grids = [_grid(f"Best accepted (highest CAFI, top {TOP_K})", agg.best, thumbs, agg),
             _grid(f"Worst accepted (lowest CAFI, bottom {TOP_K})", agg.worst, thumbs, agg)]
    for reason, table in agg.samples.items():
        grids.append(_grid(f"Rejected: {reason}", table, thumbs, agg,
                           f"{table.num_rows} of {agg.reason.get(reason, 0):,} rows (sample by URI hash)"))
    # Redacted again: a summary written before redaction (or by hand) may hold a URI's credentials.
    config = json.dumps(redact_values(s.get("config", {})), indent=2, sort_keys=True, default=str)
    fingerprints = json.dumps(s.get("stage_fingerprints", {}), indent=2, sort_keys=True, default=str)
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    component_section = ("<h2>Quality components</h2><p>Stacked by decision; dashed lines are the configured "
                         f"thresholds (yaw and pitch: |angle| at most the limit).</p><div class=\"charts\">{components}"
                         "</div>") if components else ""
    body = f"""<h1>cafi run report: {esc(ref.run_id)}</h1>
<p>model version <code>{esc(version)}</code> · generated {esc(generated)}</p>{warn}
<table class="meta">{head}</table>
<h2>Counts</h2><div class="charts">{counts}</div>
<h2>Score distributions</h2><p>Stacked by decision; dashed lines are the configured thresholds. Rows without a
score (no face, error) are counted above but have no bar here.</p><div class="charts">{scores}</div>
{component_section}
<h2>Decision space</h2><div class="charts">{scatters}</div>
<h2>Crops</h2>{"".join(grids)}
<h2>Stages</h2><p>{esc(s.get("inputs"))} inputs in {num(s.get("wall_seconds"), 2)} s
({num(s.get("images_per_second"), 2)} images/s).</p>{_stage_table(s)}
<h2>Configuration</h2><details><summary>config of this run</summary><pre>{esc(config)}</pre></details>
<details><summary>stage fingerprints</summary><pre>{esc(fingerprints)}</pre></details>"""
    return page(f"cafi run {ref.run_id}", body, {"data-run-id": ref.run_id})


def build(uri: str, storage: StorageConfig | None = None, image_storage: StorageConfig | None = None
          ) -> tuple[RunRef, str]:
    """The report of a run (or of an output root's latest committed run) as an HTML string.

    `storage` reads the run (default: endpoint and region from the environment); `image_storage`
    reads the crops (default: `storage` if given, else the storage settings the run was scored with)."""
    if image_storage is None and storage is not None:
        image_storage = storage
    storage = storage if storage is not None else StorageConfig()
    ref = resolve_run(uri, storage)
    agg = aggregate(ref, storage)
    shown = [t for t in (agg.best, agg.worst, *agg.samples.values()) if t is not None]
    rows = [r for t in shown for r in t.select(["uri", "shard_offset", "shard_size"]).to_pylist()]
    if image_storage is None:
        image_storage = runs.storage_config(ref.summary)
    reads = runs.sample_reads(ref.summary)  # what the run could read, and no more
    thumbs = thumbnails(rows, image_storage, runs.image_config(ref.summary), image_column=reads["image_column"],
                        input_format=reads["input_format"], schemes=reads["schemes"])
    return ref, render(ref, agg, thumbs)


def write_report(uri: str, out: str | None = None, storage: StorageConfig | None = None,
                 image_storage: StorageConfig | None = None) -> str:
    """Write the report; returns where. Default: `<run>/report.html`."""
    ref, page_html = build(uri, storage, image_storage)
    dest = out or join(ref.uri, REPORT)
    fs, path = filesystem(dest, storage if storage is not None else StorageConfig())
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(page_html.encode("utf-8"))
    return dest
