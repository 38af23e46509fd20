"""One self-contained HTML page per committed run: counts, score histograms, the CAFI decision
space, thumbnails of the best, worst and rejected crops, and per-stage throughput.

Everything is computed by streaming the run's rows out of the Parquet manifest in record
batches (two passes over a few columns), so a run of millions of rows never sits in memory
whole: counts and histogram bins are summed per batch, and the rows to show (top and bottom
k accepted, a deterministic sample per reject reason, at most a few thousand scatter points)
are kept with `pyarrow.compute.select_k_unstable` over bounded candidate tables. Image bytes
are fetched only for the rows shown, shrunk to small JPEG thumbnails and inlined as data
URIs; charts are inline SVG. The page needs no network when it is viewed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from cafi import manifest
from cafi.config import DecisionConfig, ImageConfig, StorageConfig
from cafi.errors import CafiError
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

REPORT = "report.html"
BINS = 40
THUMB = 96
TOP_K = 12
PER_REASON = 8
SCATTER_POINTS = 5000
BATCH_ROWS = 16_384
REASON_ORDER = ("unrecognisable", "face_too_small", "low_quality", "no_face", "error")
COLORS = {
    "accepted": "#2e9d5b", "rejected": "#d1495b", "unrecognisable": "#d1495b", "face_too_small": "#e09a1a",
    "low_quality": "#8d5fd3", "no_face": "#5c6b73", "error": "#333333",
}
SCORE_COLUMNS = ("serfiq", "dbcnn", "cafi", "mask_fraction")
SHOW_COLUMNS = ["uri", "status", "error", "serfiq", "dbcnn", "cafi", "mask_fraction", "det_score", "reject_reason"]


# ---------------------------------------------------------------- which run

@dataclass
class RunRef:
    output: str     # the output root (holds manifest/ and runs/)
    run_id: str
    uri: str        # <output>/runs/<run_id>
    summary: dict


def _split(uri: str) -> tuple[str, str]:
    base = uri.rstrip("/")
    if "/" not in base:
        return ".", base
    parent, name = base.rsplit("/", 1)
    if parent.endswith("://"):  # s3://bucket
        return parent + name, ""
    return (parent or "/"), name


def resolve_run(uri: str, storage: StorageConfig | None = None) -> RunRef:
    """A run URI (`<output>/runs/<run_id>`) or an output root (its latest committed run)."""
    fs, path = filesystem(uri, storage)
    parent, run_id = _split(uri)
    grand, runs_dir = _split(parent)
    if runs_dir == manifest.RUNS_DIR and run_id and fs.isdir(path):
        if not fs.exists(posixpath.join(path, manifest.SUCCESS)):
            raise CafiError(f"run {run_id} at {uri} is not committed (no {manifest.SUCCESS}); "
                            "its rows are incomplete")
        with fs.open(posixpath.join(path, manifest.SUMMARY), "r") as fh:
            summary = json.load(fh)
        return RunRef(grand, run_id, uri.rstrip("/"), summary)
    if fs.isdir(posixpath.join(path, manifest.RUNS_DIR)) or fs.isdir(posixpath.join(path, manifest.MANIFEST_DIR)):
        runs = manifest.committed_runs(uri, storage)
        if not runs:
            raise CafiError(f"no committed run under {uri}")
        latest = runs[-1]
        return RunRef(uri.rstrip("/"), latest["run_id"], manifest.run_uri(uri.rstrip("/"), latest["run_id"]),
                      latest)
    if not fs.exists(path):
        raise CafiError(f"{uri} does not exist")
    raise CafiError(f"{uri} is neither a run (<output>/runs/<run_id>) nor a cafi output root")


def run_ids(ref: RunRef) -> list[str]:
    """The run ids whose rows are this run's: its own and those of the attempts it resumed."""
    return sorted({ref.run_id, *(ref.summary.get("includes_runs") or [])})


def decision_config(summary: dict) -> DecisionConfig:
    d = (summary.get("config") or {}).get("decision") or {}
    known = {k: d[k] for k in ("min_serfiq", "min_mask_fraction", "min_dbcnn") if k in d}
    return DecisionConfig(**known)


def _storage_from_summary(summary: dict) -> StorageConfig:
    s = (summary.get("config") or {}).get("storage") or {}
    return StorageConfig(**{k: s[k] for k in ("endpoint_url", "region", "anon") if k in s})


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
    threshold: float | None = None
    threshold_name: str | None = None

    @property
    def total(self) -> int:
        return int(sum(int(c.sum()) for c in self.counts.values()))


@dataclass
class Aggregates:
    rows: int = 0
    status: Counter = field(default_factory=Counter)
    decision: Counter = field(default_factory=Counter)
    reason: Counter = field(default_factory=Counter)
    hists: dict[str, Histogram] = field(default_factory=dict)
    scored_points: int = 0
    scatter: pa.Table | None = None        # serfiq, dbcnn, group (<= SCATTER_POINTS rows)
    best: pa.Table | None = None           # accepted, highest cafi first
    worst: pa.Table | None = None          # accepted, lowest cafi first
    samples: dict[str, pa.Table] = field(default_factory=dict)


def _scan(ref: RunRef, storage: StorageConfig | None, columns: list[str]):
    ds = manifest.dataset(ref.output, storage)
    # A resumed run's rows include those of the crashed attempts it took over.
    flt = pc.field("run_id").isin(run_ids(ref))
    version = ref.summary.get("model_version")
    if version:
        flt = flt & (pc.field("model_version") == version)  # prunes model_version= partitions
    # One batch at a time, no whole-file pre-buffering: memory stays a few batches, whatever the run's size.
    scanner = ds.scanner(columns=columns, filter=flt, batch_size=BATCH_ROWS, batch_readahead=1,
                         fragment_readahead=1, use_threads=False,
                         fragment_scan_options=pds.ParquetFragmentScanOptions(pre_buffer=False))
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def _floats(batch: pa.RecordBatch, col: str) -> np.ndarray:
    """A float column as float64 numpy, nulls as NaN."""
    return pc.fill_null(batch.column(col), float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def _counter(arr: pa.Array) -> Counter:
    out: Counter = Counter()
    for item in pc.value_counts(arr).to_pylist():
        out[item["values"]] += item["counts"]
    return out


def _edges(lo: float, hi: float, thresholds: list[float | None], fixed: tuple[float, float] | None) -> np.ndarray:
    if fixed is not None:
        lo, hi = fixed
    for t in thresholds:
        if t is not None and math.isfinite(t):
            lo, hi = min(lo, t), max(hi, t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    elif fixed is None:  # a little room, so the extreme rows do not sit on the frame
        pad = 0.02 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, BINS + 1)


def aggregate(ref: RunRef, storage: StorageConfig | None = None, top_k: int = TOP_K, per_reason: int = PER_REASON,
              scatter_points: int = SCATTER_POINTS) -> Aggregates:
    """Counts, histograms and the rows to show, in two streaming passes over the run's rows."""
    dec = decision_config(ref.summary)
    agg = Aggregates()
    # Pass 1: counts and the score ranges (for fixed histogram bins).
    lo = {c: math.inf for c in SCORE_COLUMNS}
    hi = {c: -math.inf for c in SCORE_COLUMNS}
    for batch in _scan(ref, storage, ["status", "decision", "reject_reason", *SCORE_COLUMNS]):
        agg.rows += batch.num_rows
        agg.status.update(_counter(batch.column("status")))
        agg.decision.update(_counter(batch.column("decision")))
        agg.reason.update({k: v for k, v in _counter(batch.column("reject_reason")).items() if k is not None})
        for c in SCORE_COLUMNS:
            v = _floats(batch, c)
            v = v[np.isfinite(v)]
            if len(v):
                lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
    # DBCNN and CAFI share one scale: one range, so their histograms compare.
    q_lo, q_hi = min(lo["dbcnn"], lo["cafi"]), max(hi["dbcnn"], hi["cafi"])
    specs = {
        "serfiq": (_edges(lo["serfiq"], hi["serfiq"], [dec.min_serfiq], (0.0, 1.0)), dec.min_serfiq,
                   "decision.min_serfiq"),
        "dbcnn": (_edges(q_lo, q_hi, [dec.min_dbcnn], None), dec.min_dbcnn, "decision.min_dbcnn"),
        "cafi": (_edges(q_lo, q_hi, [dec.min_dbcnn], None), dec.min_dbcnn, "decision.min_dbcnn"),
        "mask_fraction": (_edges(lo["mask_fraction"], hi["mask_fraction"], [dec.min_mask_fraction], (0.0, 1.0)),
                          dec.min_mask_fraction, "decision.min_mask_fraction"),
    }
    groups = sorted(agg.decision) or ["accepted", "rejected"]
    for c, (edges, thr, name) in specs.items():
        agg.hists[c] = Histogram(c, edges, {g: np.zeros(BINS, dtype=np.int64) for g in groups}, thr,
                                 name if thr is not None else None)

    # Pass 2: histogram bins, the scatter sample, best/worst accepted and per-reason samples.
    scatter = _Keep(scatter_points, [("h", "ascending")])
    best = _Keep(top_k, [("cafi", "descending"), ("uri", "ascending")])
    worst = _Keep(top_k, [("cafi", "ascending"), ("uri", "ascending")])
    per = {r: _Keep(per_reason, [("h", "ascending"), ("uri", "ascending")]) for r in agg.reason}
    for batch in _scan(ref, storage, [*SHOW_COLUMNS, "decision"]):
        decision = batch.column("decision").to_numpy(zero_copy_only=False).astype(object)
        values = {c: _floats(batch, c) for c in SCORE_COLUMNS}
        for c, hist in agg.hists.items():
            v = values[c]
            for g in hist.counts:
                sel = v[(decision == g) & np.isfinite(v)]
                if len(sel):
                    hist.counts[g] += np.histogram(sel, bins=hist.edges)[0]
        table = pa.Table.from_batches([batch])
        h = uri_hash(batch.column("uri"))
        table = table.append_column("h", pa.array(h, pa.uint64()))
        reason = batch.column("reject_reason")
        scored = np.isfinite(values["serfiq"]) & np.isfinite(values["dbcnn"])
        if scored.any():
            agg.scored_points += int(scored.sum())
            group = pc.if_else(pc.is_null(reason), pa.scalar("accepted"), reason)
            pts = pa.table({"serfiq": batch.column("serfiq"), "dbcnn": batch.column("dbcnn"), "group": group,
                            "h": table.column("h")}).filter(pa.array(scored))
            scatter.add(pts)
        acc = (decision == "accepted") & np.isfinite(values["cafi"])
        if acc.any():
            accepted = table.filter(pa.array(acc))
            best.add(accepted)
            worst.add(accepted)
        for r, keep in per.items():
            keep.add(table.filter(pc.fill_null(pc.equal(reason, r), False)))
    show_schema = _show_schema()
    agg.scatter = scatter.result(pa.schema([("serfiq", pa.float32()), ("dbcnn", pa.float32()),
                                            ("group", pa.string()), ("h", pa.uint64())]))
    agg.best = best.result(show_schema)
    agg.worst = worst.result(show_schema)
    agg.samples = {r: per[r].result(show_schema) for r in _reason_order(agg.reason)}
    return agg


def _show_schema() -> pa.Schema:
    fields = [manifest.SCHEMA.field(c) for c in SHOW_COLUMNS] + [manifest.SCHEMA.field("decision")]
    return pa.schema(fields + [pa.field("h", pa.uint64())])


def _reason_order(reasons) -> list[str]:
    known = [r for r in REASON_ORDER if r in reasons]
    return known + sorted(r for r in reasons if r not in REASON_ORDER)


# ---------------------------------------------------------------- thumbnails

def thumbnails(uris: list[str], storage: StorageConfig | None, image_cfg: ImageConfig | None = None,
               size: int = THUMB) -> dict[str, str | Exception]:
    """uri -> a data: URI of a small JPEG thumbnail, or the reason there is none.
    Reads only these objects; decoding keeps the pipeline's size limits (bombs stay undecoded)."""
    from PIL import Image

    from cafi import imaging, stages

    base = image_cfg or ImageConfig()
    cfg = ImageConfig(crop_size=size, min_side=1, max_pixels=base.max_pixels, max_bytes=base.max_bytes)
    unique = list(dict.fromkeys(uris))
    out: dict[str, str | Exception] = {}
    for start in range(0, len(unique), 64):
        chunk = unique[start:start + 64]
        for uri, data in zip(chunk, stages.read_bytes(chunk, storage), strict=True):
            if isinstance(data, Exception):
                out[uri] = data
                continue
            dec = imaging.decode(data, cfg)
            if dec.error is not None:
                out[uri] = ValueError(dec.error)
                continue
            buf = io.BytesIO()
            Image.fromarray(dec.image).save(buf, format="JPEG", quality=80)
            out[uri] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return out


# ---------------------------------------------------------------- SVG charts

def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _tick(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks inside [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def histogram_svg(hist: Histogram, title: str, w: int = 520, h: int = 250) -> str:
    ml, mr, mt, mb = 52, 12, 30, 38
    pw, ph = w - ml - mr, h - mt - mb
    lo, hi = float(hist.edges[0]), float(hist.edges[-1])
    groups = list(hist.counts)
    stacked = np.sum([hist.counts[g] for g in groups], axis=0) if groups else np.zeros(BINS)
    top = max(1, int(stacked.max()) if len(stacked) else 1)

    def sx(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def sy(c: float) -> float:
        return mt + ph - c / top * ph

    parts = [f'<svg class="chart" data-chart="hist-{_e(hist.column)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">',
             f'<text x="8" y="17" class="t">{_e(title)}</text>',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plot"/>']
    for v in [t for t in _ticks(0, top, 4) if t == int(t)]:
        y = sy(v)
        parts.append(f'<line x1="{ml - 4}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{ml - 6}" y="{y + 4:.1f}" class="yl">{int(round(v)):,}</text>')
    for v in _ticks(lo, hi):
        x = sx(v)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{mt + ph + 16}" class="xl">{_tick(v)}</text>')
    base = np.zeros(BINS)
    for g in groups:
        counts = hist.counts[g]
        for i in np.flatnonzero(counts):
            x0, x1 = sx(float(hist.edges[i])), sx(float(hist.edges[i + 1]))
            y0, y1 = sy(base[i] + counts[i]), sy(base[i])
            parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y0:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                         f'height="{max(0.5, y1 - y0):.1f}" fill="{COLORS.get(g, "#777")}">'
                         f'<title>{_e(g)}: {int(counts[i]):,} in [{_tick(float(hist.edges[i]))}, '
                         f'{_tick(float(hist.edges[i + 1]))})</title></rect>')
        base = base + counts
    if hist.threshold is not None and lo <= hist.threshold <= hi:
        x = sx(hist.threshold)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt - 4}" y2="{mt + ph}" class="thr"/>'
                     f'<text x="{x + 3:.1f}" y="{mt + 8}" class="thrl">{_e(hist.threshold_name)} = '
                     f'{_tick(hist.threshold)}</text>')
    lx = ml + pw  # legend: on the title row, right-aligned; only groups with rows
    for g in reversed([g for g in groups if hist.counts[g].sum() > 0]):
        label = f"{g} {int(hist.counts[g].sum()):,}"
        lx -= 18 + 6.2 * len(label)
        parts.append(f'<rect x="{lx:.1f}" y="8" width="10" height="10" fill="{COLORS.get(g, "#777")}"/>'
                     f'<text x="{lx + 13:.1f}" y="17" class="lg">{_e(label)}</text>')
    if hist.total == 0:
        parts.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" class="empty">no scored rows</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 4}" class="xt">{_e(hist.column)}</text></svg>')
    return "".join(parts)


def scatter_svg(points: pa.Table, total: int, x_range: tuple[float, float], y_range: tuple[float, float],
                min_serfiq: float, min_dbcnn: float | None, w: int = 620, h: int = 440) -> str:
    ml, mr, mt, mb = 56, 150, 28, 42
    pw, ph = w - ml - mr, h - mt - mb
    (xlo, xhi), (ylo, yhi) = x_range, y_range

    def sx(v):
        return ml + (v - xlo) / (xhi - xlo) * pw

    def sy(v):
        return mt + ph - (v - ylo) / (yhi - ylo) * ph

    title = "SER-FIQ vs DBCNN: the CAFI decision space"
    parts = [f'<svg class="chart" data-chart="scatter" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">',
             f'<text x="{ml}" y="16" class="t">{_e(title)}</text>',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plot"/>']
    ax0 = sx(min(max(min_serfiq, xlo), xhi))
    ay0 = sy(min(max(min_dbcnn, ylo), yhi)) if min_dbcnn is not None else mt + ph
    parts.append(f'<rect x="{ax0:.1f}" y="{mt}" width="{ml + pw - ax0:.1f}" height="{ay0 - mt:.1f}" '
                 f'class="accept-region"><title>accepted region (if the face mask is large enough)</title></rect>')
    for v in _ticks(xlo, xhi):
        x = sx(v)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph + 4}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{mt + ph + 16}" class="xl">{_tick(v)}</text>')
    for v in _ticks(ylo, yhi):
        y = sy(v)
        parts.append(f'<line x1="{ml - 4}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{ml - 6}" y="{y + 4:.1f}" class="yl">{_tick(v)}</text>')
    groups = sorted(set(points.column("group").to_pylist())) if points.num_rows else []
    groups.sort(key=lambda g: (g != "accepted", g))
    xs = points.column("serfiq").to_numpy(zero_copy_only=False).astype(float) if points.num_rows else []
    ys = points.column("dbcnn").to_numpy(zero_copy_only=False).astype(float) if points.num_rows else []
    gs = np.asarray(points.column("group").to_pylist(), dtype=object) if points.num_rows else []
    width = 6 if points.num_rows <= 500 else 4 if points.num_rows <= 2000 else 3
    for i, g in enumerate(groups):
        sel = gs == g
        d = "".join(f"M{sx(x):.1f} {sy(y):.1f}h0" for x, y in zip(xs[sel], ys[sel], strict=True))
        color = COLORS.get(g, "#777")
        parts.append(f'<path d="{d}" stroke="{color}" stroke-width="{width}" class="dots">'
                     f'<title>{_e(g)}: {int(sel.sum()):,} points</title></path>')
        ly = mt + 10 + i * 16
        parts.append(f'<circle cx="{ml + pw + 16}" cy="{ly - 4}" r="4" fill="{color}"/>'
                     f'<text x="{ml + pw + 26}" y="{ly}" class="lg">{_e(g)} {int(sel.sum()):,}</text>')
    x = sx(min_serfiq)
    if xlo <= min_serfiq <= xhi:
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" class="thr"/>'
                     f'<text x="{x + 3:.1f}" y="{mt + ph - 6}" class="thrl">min_serfiq = {_tick(min_serfiq)}</text>')
    if min_dbcnn is not None and ylo <= min_dbcnn <= yhi:
        y = sy(min_dbcnn)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="thr"/>'
                     f'<text x="{ml + 4}" y="{y - 4:.1f}" class="thrl">min_dbcnn = {_tick(min_dbcnn)}</text>')
    shown = points.num_rows
    note = f"{shown:,} of {total:,} scored rows" + (" (sample by URI hash)" if shown < total else "")
    parts.append(f'<text x="{ml + pw + 10}" y="{mt + ph}" class="lg">{_e(note)}</text>')
    if shown == 0:
        parts.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" class="empty">no scored rows</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 6}" class="xt">serfiq</text>'
                 f'<text x="14" y="{mt + ph / 2}" class="xt" transform="rotate(-90 14 {mt + ph / 2})">dbcnn</text>'
                 '</svg>')
    return "".join(parts)


def stages_svg(operators: list[dict], w: int = 620) -> str:
    ml, mr, row = 230, 140, 22
    ops = [o for o in operators if isinstance(o.get("wall_seconds"), (int, float))]
    h = 30 + row * max(1, len(ops))
    top = max([o["wall_seconds"] for o in ops] + [1e-9])
    pw = w - ml - mr
    parts = [f'<svg class="chart" data-chart="stages" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="wall time per stage">',
             '<text x="4" y="16" class="t">wall seconds per stage</text>']
    for i, o in enumerate(ops):
        y = 26 + i * row
        bw = max(1.0, o["wall_seconds"] / top * pw)
        rate = o.get("rows_per_second")
        label = f"{o['wall_seconds']:.2f} s" + (f" · {rate:,.1f} rows/s" if rate else "")
        parts.append(f'<text x="{ml - 6}" y="{y + 13}" class="yl">{_e(str(o.get("operator"))[:34])}</text>'
                     f'<rect x="{ml}" y="{y}" width="{bw:.1f}" height="{row - 6}" fill="#4a78b5"/>'
                     f'<text x="{ml + bw + 4:.1f}" y="{y + 13}" class="lg">{_e(label)}</text>')
    if not ops:
        parts.append('<text x="4" y="40" class="lg">no operator statistics in the run summary</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{color:#666} .warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px;margin:8px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #e4e4e4;font-size:11px}
svg .t{font-size:13px;font-weight:600} svg .plot{fill:#fafafa;stroke:#ccc}
svg .grid{stroke:#e6e6e6} svg .axis{stroke:#999}
svg .xl{text-anchor:middle;fill:#555} svg .yl{text-anchor:end;fill:#555} svg .xt{text-anchor:middle;fill:#333}
svg .lg{fill:#333} svg .empty{text-anchor:middle;fill:#999;font-size:14px}
svg .thr{stroke:#111;stroke-width:1.5;stroke-dasharray:5 3} svg .thrl{fill:#111;font-size:11px}
svg .dots{fill:none;stroke-linecap:round;stroke-opacity:.6}
svg .accept-region{fill:#2e9d5b;fill-opacity:.06}
.grid-thumbs{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:150px;border:1px solid #e4e4e4;padding:4px;background:#fafafa}
figure.thumb img{display:block;width:96px;height:96px;margin:0 auto;image-rendering:auto}
figure.thumb .noimg{width:96px;height:96px;margin:0 auto;background:#eee;color:#777;font-size:11px;
  display:flex;align-items:center;justify-content:center;text-align:center;overflow:hidden}
figcaption{font-size:11px;line-height:1.3;margin-top:3px}
figcaption .uri{color:#555;word-break:break-all;display:block}
figcaption .why{color:#a33;display:block;word-break:break-word}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:480px;font-size:12px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { broken++; }
  }
  var b = document.body;
  b.setAttribute('data-images-total', String(imgs.length));
  b.setAttribute('data-images-loaded', String(ok));
  b.setAttribute('data-broken-images', String(broken));
  b.setAttribute('data-charts', String(document.querySelectorAll('svg.chart').length));
  b.setAttribute('data-report-ready', '1');
});
"""


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "–"


def _count_table(title: str, counts: Counter, total: int, order: list[str] | None = None) -> str:
    keys = order if order is not None else sorted(counts, key=lambda k: (-counts[k], str(k)))
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{counts[k]:,}</td><td class="n">{_pct(counts[k], total)}'
                   f"</td></tr>" for k in keys)
    return (f"<table><tr><th>{_e(title)}</th><th class=\"n\">rows</th><th class=\"n\">share</th></tr>{rows}"
            f'<tr><td><b>total</b></td><td class="n"><b>{total:,}</b></td><td></td></tr></table>')


def _figure(row: dict, thumbs: dict[str, str | Exception]) -> str:
    uri = row["uri"]
    img = thumbs.get(uri)
    if isinstance(img, str):
        pic = f'<img class="thumb" src="{img}" width="{THUMB}" height="{THUMB}" alt="{_e(uri)}">'
    else:
        why = str(img).splitlines()[0] if img is not None else "not fetched"
        pic = f'<div class="noimg" title="{_e(why)}">no preview</div>'
    scores = (f"serfiq {_num(row.get('serfiq'))} · dbcnn {_num(row.get('dbcnn'))}"
              f"<br>cafi {_num(row.get('cafi'))} · mask {_num(row.get('mask_fraction'), 2)}")
    extra = ""
    if row.get("status") == "error" and row.get("error"):
        extra = f'<span class="why">{_e(row["error"])}</span>'
    elif row.get("reject_reason"):
        extra = f'<span class="why">{_e(row["reject_reason"])}</span>'
    return (f'<figure class="thumb">{pic}<figcaption>{scores}{extra}<span class="uri">{_e(uri)}</span>'
            f"</figcaption></figure>")


def _grid(title: str, table: pa.Table, thumbs: dict, note: str = "") -> str:
    rows = table.to_pylist()
    body = "".join(_figure(r, thumbs) for r in rows) or "<p>none</p>"
    return f"<h3>{_e(title)}</h3>{f'<p>{_e(note)}</p>' if note else ''}<div class=\"grid-thumbs\">{body}</div>"


def _stage_table(summary: dict) -> str:
    ops = (summary.get("stages") or {}).get("operators") or []
    head = ("<table><tr><th>operator</th><th class=\"n\">tasks</th><th class=\"n\">blocks</th>"
            "<th class=\"n\">wall s</th><th class=\"n\">rows</th><th class=\"n\">rows/s</th></tr>")
    rows = "".join(
        f"<tr><td>{_e(o.get('operator'))}</td><td class=\"n\">{_e(o.get('tasks', '–'))}</td>"
        f"<td class=\"n\">{_e(o.get('blocks', '–'))}</td><td class=\"n\">{_num(o.get('wall_seconds'), 2)}</td>"
        f"<td class=\"n\">{_e(o.get('rows', '–'))}</td><td class=\"n\">{_num(o.get('rows_per_second'), 1)}</td></tr>"
        for o in ops)
    return head + rows + "</table>" + stages_svg(ops)


def render(ref: RunRef, agg: Aggregates, thumbs: dict[str, str | Exception]) -> str:
    s = ref.summary
    dec = decision_config(s)
    version = s.get("model_version", "?")
    included = [r for r in run_ids(ref) if r != ref.run_id]
    meta = [
        ("run", ref.run_id), ("run URI", ref.uri), ("model version", version),
        ("synthetic weights", s.get("synthetic_weights")), ("inputs", s.get("inputs")),
        *([("scored by this run", s["scored_now"])] if "scored_now" in s else []),
        ("rows in this report", f"{agg.rows:,}" + (f" (written by this run and by {len(included)} earlier attempt(s) "
                                                    "of this model version it took over)" if included else "")),
        ("started", s.get("started_at")), ("finished", s.get("finished_at")),
        ("wall seconds", s.get("wall_seconds")), ("images / second", s.get("images_per_second")),
        ("thresholds", f"min_serfiq = {dec.min_serfiq}, min_mask_fraction = {dec.min_mask_fraction}, "
                       f"min_dbcnn = {dec.min_dbcnn}"),
    ]
    warn = ""
    if s.get("synthetic_weights"):
        warn += ('<div class="warn">Scored with <b>synthetic (random) weights</b>: the numbers show the '
                 "pipeline works, not the quality of these crops.</div>")
    head = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta)
    counts = (_count_table("decision", agg.decision, agg.rows)
              + _count_table("reject reason", agg.reason, sum(agg.reason.values()), _reason_order(agg.reason))
              + _count_table("status", agg.status, agg.rows))
    titles = {"serfiq": "SER-FIQ (face recognisability)", "dbcnn": "DBCNN (masked-face quality)",
              "cafi": "CAFI score (accepted rows)", "mask_fraction": "face mask fraction"}
    hists = "".join(histogram_svg(agg.hists[c], titles[c]) for c in ("serfiq", "dbcnn", "cafi", "mask_fraction")
                    if c in agg.hists)
    dh = agg.hists.get("dbcnn")
    y_range = (float(dh.edges[0]), float(dh.edges[-1])) if dh is not None else (0.0, 1.0)
    scatter = scatter_svg(agg.scatter if agg.scatter is not None else pa.table({"serfiq": [], "dbcnn": [],
                                                                                "group": []}),
                          agg.scored_points, (0.0, 1.0), y_range, dec.min_serfiq, dec.min_dbcnn)
    grids = [_grid(f"Best accepted (highest CAFI, top {TOP_K})", agg.best, thumbs),
             _grid(f"Worst accepted (lowest CAFI, bottom {TOP_K})", agg.worst, thumbs)]
    for reason, table in agg.samples.items():
        grids.append(_grid(f"Rejected: {reason}", table, thumbs,
                           f"{table.num_rows} of {agg.reason.get(reason, 0):,} rows (sample by URI hash)"))
    config = json.dumps(s.get("config", {}), indent=2, sort_keys=True, default=str)
    fingerprints = json.dumps(s.get("stage_fingerprints", {}), indent=2, sort_keys=True, default=str)
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cafi run {_e(ref.run_id)}</title><style>{CSS}</style></head>
<body data-run-id="{_e(ref.run_id)}">
<h1>cafi run report: {_e(ref.run_id)}</h1>
<p>model version <code>{_e(version)}</code> · generated {_e(generated)}</p>{warn}
<table class="meta">{head}</table>
<h2>Counts</h2><div class="charts">{counts}</div>
<h2>Score distributions</h2><p>Stacked by decision; dashed lines are the configured thresholds. Rows without a
score (no face, error) are counted above but have no bar here.</p><div class="charts">{hists}</div>
<h2>Decision space</h2><div class="charts">{scatter}</div>
<h2>Crops</h2>{"".join(grids)}
<h2>Stages</h2><p>{_e(s.get("inputs"))} inputs in {_num(s.get("wall_seconds"), 2)} s
({_num(s.get("images_per_second"), 2)} images/s).</p>{_stage_table(s)}
<h2>Configuration</h2><details><summary>config of this run</summary><pre>{_e(config)}</pre></details>
<details><summary>stage fingerprints</summary><pre>{_e(fingerprints)}</pre></details>
<script>{SCRIPT}</script>
</body></html>
"""


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
    uris = [u for t in shown for u in t.column("uri").to_pylist()]
    if image_storage is None:
        image_storage = _storage_from_summary(ref.summary)
    image = (ref.summary.get("config") or {}).get("image") or {}
    image_cfg = ImageConfig(**{k: image[k] for k in ("max_pixels", "max_bytes") if k in image})
    thumbs = thumbnails(uris, image_storage, image_cfg)
    return ref, render(ref, agg, thumbs)


def write_report(uri: str, out: str | None = None, storage: StorageConfig | None = None,
                 image_storage: StorageConfig | None = None) -> str:
    """Write the report; returns where. Default: `<run>/report.html`."""
    ref, page = build(uri, storage, image_storage)
    dest = out or join(ref.uri, REPORT)
    fs, path = filesystem(dest, storage if storage is not None else StorageConfig())
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(page.encode("utf-8"))
    return dest
