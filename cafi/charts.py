"""Inline-SVG charts and the HTML page frame shared by the run report and the eval page.

Everything here returns markup strings: no plotting library, no script or font from elsewhere,
so a page viewed offline shows everything. Charts carry `class="chart"` and a `data-chart` id,
which the page script counts and the browser tests look for.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Colour-blind-friendly series colours (Okabe-Ito, then Tableau), cycled with dash patterns.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#8c564b", "#7f7f7f", "#bcbd22",
           "#17becf", "#1f3a93", "#a0522d")
DASHES = ("", "6 3", "2 2", "8 3 2 3")
DEFAULT_COLOR = "#777"


# ---------------------------------------------------------------- text and numbers

def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def num(x: float | None, digits: int = 3) -> str:
    """A number for a table cell; an en dash where there is none."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def tick(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks inside [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def series_style(i: int) -> tuple[str, str]:
    """(colour, dash pattern) of the i-th series: colours first, then dashes, so neighbours differ."""
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]


# ---------------------------------------------------------------- chart pieces

@dataclass(frozen=True)
class Line:
    """A dashed reference line (a threshold) at `value` on one axis; `label` may be empty."""

    value: float
    label: str = ""


class _Frame:
    """A plot area with linear axes: the shared part of every x/y chart."""

    def __init__(self, w: int, h: int, margins: tuple[int, int, int, int], x_range: tuple[float, float],
                 y_range: tuple[float, float]):
        self.w, self.h = w, h
        self.ml, self.mr, self.mt, self.mb = margins
        self.pw, self.ph = w - self.ml - self.mr, h - self.mt - self.mb
        (self.xlo, self.xhi), (self.ylo, self.yhi) = _nonempty(*x_range), _nonempty(*y_range)

    def sx(self, v: float) -> float:
        return self.ml + (v - self.xlo) / (self.xhi - self.xlo) * self.pw

    def sy(self, v: float) -> float:
        return self.mt + self.ph - (v - self.ylo) / (self.yhi - self.ylo) * self.ph

    def open(self, chart_id: str, title: str) -> list[str]:
        return [f'<svg class="chart" data-chart="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
                f'width="{self.w}" height="{self.h}" viewBox="0 0 {self.w} {self.h}" role="img" '
                f'aria-label="{esc(title)}">',
                f'<text x="8" y="17" class="t">{esc(title)}</text>',
                f'<rect x="{self.ml}" y="{self.mt}" width="{self.pw}" height="{self.ph}" class="plot"/>']

    def grid(self, x_grid: bool = True, y_format=tick, y_integers: bool = False,
             y_ticks: Sequence[float] | None = None) -> list[str]:
        parts = []
        for v in ticks(self.xlo, self.xhi):
            x = self.sx(v)
            y1 = self.mt if x_grid else self.mt + self.ph
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{self.mt + self.ph + 4}" '
                         f'class="{"grid" if x_grid else "axis"}"/>'
                         f'<text x="{x:.1f}" y="{self.mt + self.ph + 16}" class="xl">{tick(v)}</text>')
        for v in (y_ticks if y_ticks is not None else ticks(self.ylo, self.yhi, 4 if y_integers else 5)):
            if y_integers and v != int(v):
                continue
            y = self.sy(v)
            parts.append(f'<line x1="{self.ml - 4}" x2="{self.ml + self.pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                         f'<text x="{self.ml - 6}" y="{y + 4:.1f}" class="yl">{y_format(v)}</text>')
        return parts

    def vlines(self, lines: Iterable[Line]) -> list[str]:
        parts = []
        for ln in lines:
            if self.xlo <= ln.value <= self.xhi:
                x = self.sx(ln.value)
                parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.mt - 4}" y2="{self.mt + self.ph}" '
                             f'class="thr"/>')
                if ln.label:  # right of the line, or left of it near the right edge (so it is not cut off)
                    right = x - self.ml < 0.6 * self.pw
                    anchor = "" if right else ' text-anchor="end"'
                    parts.append(f'<text x="{x + 3 if right else x - 3:.1f}" y="{self.mt + 8}" class="thrl"{anchor}>'
                                 f"{esc(ln.label)}</text>")
        return parts

    def hlines(self, lines: Iterable[Line]) -> list[str]:
        parts = []
        for ln in lines:
            if self.ylo <= ln.value <= self.yhi:
                y = self.sy(ln.value)
                parts.append(f'<line x1="{self.ml}" x2="{self.ml + self.pw}" y1="{y:.1f}" y2="{y:.1f}" class="thr"/>')
                if ln.label:
                    parts.append(f'<text x="{self.ml + 4}" y="{y - 4:.1f}" class="thrl">{esc(ln.label)}</text>')
        return parts

    def labels(self, x_label: str, y_label: str = "") -> list[str]:
        cy = self.mt + self.ph / 2
        parts = [f'<text x="{self.ml + self.pw / 2}" y="{self.h - 4}" class="xt">{esc(x_label)}</text>']
        if y_label:
            parts.append(f'<text x="14" y="{cy}" class="xt" transform="rotate(-90 14 {cy})">{esc(y_label)}</text>')
        return parts

    def empty(self, text: str) -> str:
        return f'<text x="{self.ml + self.pw / 2}" y="{self.mt + self.ph / 2}" class="empty">{esc(text)}</text>'


def _nonempty(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    if hi - lo < 1e-12:
        return lo - 0.5, hi + 0.5
    return lo, hi


# ---------------------------------------------------------------- charts

def histogram_svg(chart_id: str, title: str, edges: np.ndarray, counts: dict[str, np.ndarray],
                  colors: dict[str, str], thresholds: Sequence[Line] = (), x_label: str = "",
                  empty_text: str = "no scored rows", w: int = 520, h: int = 250) -> str:
    """Bars over fixed bins, stacked by group (in the order of `counts`), with dashed threshold lines."""
    groups = list(counts)
    bins = len(edges) - 1
    stacked = np.sum([counts[g] for g in groups], axis=0) if groups else np.zeros(bins)
    top = max(1, int(stacked.max()) if len(stacked) else 1)
    f = _Frame(w, h, (52, 12, 30, 38), (float(edges[0]), float(edges[-1])), (0, top))
    parts = f.open(chart_id, title) + f.grid(x_grid=False, y_format=lambda v: f"{int(round(v)):,}", y_integers=True)
    base = np.zeros(bins)
    for g in groups:
        c = counts[g]
        for i in np.flatnonzero(c):
            x0, x1 = f.sx(float(edges[i])), f.sx(float(edges[i + 1]))
            y0, y1 = f.sy(base[i] + c[i]), f.sy(base[i])
            parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y0:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                         f'height="{max(0.5, y1 - y0):.1f}" fill="{colors.get(g, DEFAULT_COLOR)}">'
                         f'<title>{esc(g)}: {int(c[i]):,} in [{tick(float(edges[i]))}, '
                         f'{tick(float(edges[i + 1]))})</title></rect>')
        base = base + c
    parts += f.vlines(thresholds)
    lx = f.ml + f.pw  # legend: on the title row, right-aligned; only groups with rows
    for g in reversed([g for g in groups if counts[g].sum() > 0]):
        label = f"{g} {int(counts[g].sum()):,}"
        lx -= 18 + 6.2 * len(label)
        parts.append(f'<rect x="{lx:.1f}" y="8" width="10" height="10" fill="{colors.get(g, DEFAULT_COLOR)}"/>'
                     f'<text x="{lx + 13:.1f}" y="17" class="lg">{esc(label)}</text>')
    if int(stacked.sum()) == 0:
        parts.append(f.empty(empty_text))
    parts += f.labels(x_label)
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Region:
    """A shaded box (the accepted region of a decision); None sides run to the plot's edge."""

    x_lo: float | None = None
    x_hi: float | None = None
    y_lo: float | None = None
    y_hi: float | None = None
    title: str = ""


def scatter_svg(chart_id: str, title: str, xs: np.ndarray, ys: np.ndarray, groups: np.ndarray,
                colors: dict[str, str], x_range: tuple[float, float], y_range: tuple[float, float], x_label: str,
                y_label: str, note: str = "", vlines: Sequence[Line] = (), hlines: Sequence[Line] = (),
                region: Region | None = None, empty_text: str = "no scored rows", w: int = 620,
                h: int = 440) -> str:
    """Points coloured by group (one SVG path per group: zero-length segments with round caps)."""
    f = _Frame(w, h, (56, 150, 28, 42), x_range, y_range)
    parts = f.open(chart_id, title)
    if region is not None:
        def clip(v, lo, hi, default):
            return default if v is None else min(max(v, lo), hi)

        x0, x1 = f.sx(clip(region.x_lo, f.xlo, f.xhi, f.xlo)), f.sx(clip(region.x_hi, f.xlo, f.xhi, f.xhi))
        y1, y0 = f.sy(clip(region.y_lo, f.ylo, f.yhi, f.ylo)), f.sy(clip(region.y_hi, f.ylo, f.yhi, f.yhi))
        parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{max(0.0, x1 - x0):.1f}" '
                     f'height="{max(0.0, y1 - y0):.1f}" class="accept-region">'
                     f"<title>{esc(region.title)}</title></rect>")
    parts += f.grid()
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    gs = np.asarray(groups, dtype=object)
    names = sorted(set(gs.tolist()), key=lambda g: (g != "accepted", g))
    width = 6 if len(xs) <= 500 else 4 if len(xs) <= 2000 else 3
    for i, g in enumerate(names):
        sel = gs == g
        d = "".join(f"M{f.sx(x):.1f} {f.sy(y):.1f}h0" for x, y in zip(xs[sel], ys[sel], strict=True))
        color = colors.get(g, DEFAULT_COLOR)
        parts.append(f'<path d="{d}" stroke="{color}" stroke-width="{width}" class="dots">'
                     f'<title>{esc(g)}: {int(sel.sum()):,} points</title></path>')
        ly = f.mt + 10 + i * 16
        parts.append(f'<circle cx="{f.ml + f.pw + 16}" cy="{ly - 4}" r="4" fill="{color}"/>'
                     f'<text x="{f.ml + f.pw + 26}" y="{ly}" class="lg">{esc(g)} {int(sel.sum()):,}</text>')
    parts += f.vlines(vlines) + f.hlines(hlines)
    if note:
        parts.append(f'<text x="{f.ml + f.pw + 10}" y="{f.mt + f.ph}" class="lg">{esc(note)}</text>')
    if len(xs) == 0:
        parts.append(f.empty(empty_text))
    parts += f.labels(x_label, y_label)
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class Series:
    """One curve. `step`: drawn as a step function that holds each y until the next x (EDC style)."""

    name: str
    xs: np.ndarray
    ys: np.ndarray
    color: str = DEFAULT_COLOR
    dash: str = ""
    step: bool = True
    width: float = 1.6
    opacity: float = 1.0  # below 1: drawn faintly (a context curve beside the ones compared)


def _path(f: _Frame, s: Series) -> str:
    xs, ys = np.asarray(s.xs, float), np.asarray(s.ys, float)
    ok = np.isfinite(xs) & np.isfinite(ys) & (xs <= f.xhi)  # points right of the plot are not drawn
    xs, ys = np.clip(xs[ok], f.xlo, f.xhi), np.clip(ys[ok], f.ylo, f.yhi)
    if len(xs) == 0:
        return ""
    d = [f"M{f.sx(xs[0]):.1f} {f.sy(ys[0]):.1f}"]
    for x, y in zip(xs[1:], ys[1:], strict=True):
        d.append(f"H{f.sx(x):.1f}V{f.sy(y):.1f}" if s.step else f"L{f.sx(x):.1f} {f.sy(y):.1f}")
    if s.step and xs[-1] < f.xhi:  # the last value holds to the edge of the plot
        d.append(f"H{f.sx(f.xhi):.1f}")
    return "".join(d)


def log_ticks(lo: float, hi: float) -> list[float]:
    """log10 of the ticks of a log axis over [lo, hi] (> 0): every decade, and 2 and 5 times it when the
    range spans fewer than three decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if b - a < 3 else (1,)
    vals = [m * 10.0 ** k for k in range(a, b + 1) for m in steps]
    return [math.log10(v) for v in vals if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]


def line_chart_svg(chart_id: str, title: str, series: Sequence[Series], x_range: tuple[float, float],
                   y_range: tuple[float, float], x_label: str, y_label: str, vlines: Sequence[Line] = (),
                   empty_text: str = "no data", w: int = 760, h: int = 460, log_y: bool = False) -> str:
    """Several curves over shared axes with a legend on the right. `log_y`: a log10 y axis over y_range
    (> 0); values below its bottom (a FNMR of 0) are drawn on the bottom edge."""
    y_ticks, y_format = None, tick
    if log_y:
        lo, hi = y_range
        series = [Series(s.name, s.xs, np.log10(np.maximum(np.asarray(s.ys, float), lo)), s.color, s.dash, s.step,
                         s.width, s.opacity) for s in series]
        y_range, y_ticks = (math.log10(lo), math.log10(hi)), log_ticks(lo, hi)
        y_format = lambda v: tick(10.0 ** v)  # noqa: E731 - the axis labels in the data's units
    f = _Frame(w, h, (56, 210, 28, 42), x_range, y_range)
    parts = f.open(chart_id, title) + f.grid(y_format=y_format, y_ticks=y_ticks)
    for i, s in enumerate(series):
        d = _path(f, s)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        faint = f' stroke-opacity="{s.opacity:g}"' if s.opacity < 1 else ""
        if d:
            parts.append(f'<path d="{d}" stroke="{s.color}" stroke-width="{s.width}"{dash}{faint} class="curve">'
                         f'<title>{esc(s.name)}</title></path>')
        ly = f.mt + 10 + i * 15
        lx = f.ml + f.pw + 10
        text_faint = f' fill-opacity="{max(s.opacity, 0.5):g}"' if s.opacity < 1 else ""
        parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s.color}" '
                     f'stroke-width="{s.width + 0.4}"{dash}{faint}/>'
                     f'<text x="{lx + 28}" y="{ly}" class="lg"{text_faint}>{esc(s.name)}</text>')
    parts += f.vlines(vlines)
    if not series:
        parts.append(f.empty(empty_text))
    parts += f.labels(x_label, y_label)
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(chart_id: str, title: str, rows: Sequence[tuple[str, float, str]], empty_text: str = "no data",
             w: int = 620, color: str = "#4a78b5") -> str:
    """Horizontal bars: (label, value >= 0, text shown after the bar) per row."""
    ml, mr, row = 230, 140, 22
    h = 30 + row * max(1, len(rows))
    top = max([v for _, v, _ in rows if math.isfinite(v)] + [1e-9])
    pw = w - ml - mr
    parts = [f'<svg class="chart" data-chart="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}">',
             f'<text x="4" y="16" class="t">{esc(title)}</text>']
    for i, (label, value, text) in enumerate(rows):
        y = 26 + i * row
        bw = max(1.0, value / top * pw) if math.isfinite(value) else 0.0
        parts.append(f'<text x="{ml - 6}" y="{y + 13}" class="yl">{esc(label[:34])}</text>'
                     f'<rect x="{ml}" y="{y}" width="{bw:.1f}" height="{row - 6}" fill="{color}"/>'
                     f'<text x="{ml + bw + 4:.1f}" y="{y + 13}" class="lg">{esc(text)}</text>')
    if not rows:
        parts.append(f'<text x="4" y="40" class="lg">{esc(empty_text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- tables and the page

def table_html(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = (),
               cls: str = "") -> str:
    """A plain table; cells are escaped; columns in `numeric` are right-aligned."""
    right = set(numeric)

    def cell(tag: str, i: int, v: object) -> str:
        align = ' class="n"' if i in right else ""
        return f"<{tag}{align}>{esc(v)}</{tag}>"

    head = "".join(cell("th", i, v) for i, v in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><tr>{head}</tr>{body}</table>"


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{color:#666} .warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px;margin:8px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
svg.chart{background:#fff;border:1px solid #e4e4e4;font-size:11px}
svg .t{font-size:13px;font-weight:600} svg .plot{fill:#fafafa;stroke:#ccc}
svg .grid{stroke:#e6e6e6} svg .axis{stroke:#999}
svg .xl{text-anchor:middle;fill:#555} svg .yl{text-anchor:end;fill:#555} svg .xt{text-anchor:middle;fill:#333}
svg .lg{fill:#333} svg .empty{text-anchor:middle;fill:#999;font-size:14px}
svg .thr{stroke:#111;stroke-width:1.5;stroke-dasharray:5 3} svg .thrl{fill:#111;font-size:11px}
svg .dots{fill:none;stroke-linecap:round;stroke-opacity:.6}
svg .curve{fill:none;stroke-linejoin:round}
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

# Marks the body when the page has loaded, so a headless browser can check images and charts.
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


def page(title: str, body: str, body_attrs: dict[str, str] | None = None) -> str:
    """A complete, self-contained HTML document: inline CSS, inline SVG, one inline script."""
    attrs = "".join(f' {k}="{esc(v)}"' for k, v in (body_attrs or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body{attrs}>
{body}
<script>{SCRIPT}</script>
</body></html>
"""
