"""What `cafi eval --out DIR` writes: the EDC points and pAUC table as files, and one self-contained
HTML page (the run report's style and charts, cafi/charts.py) with the curves and the rankings.

  eval.html   the page: EDC curves (every score, the ideal and the random order), pAUC table,
              the quality columns ranked against the labels, the decision against the human one
  edc.json    the document `--json` prints (labels and EDC; curves resampled to at most 2,000 points)
  edc.csv     every curve point: score, order (score | ideal | random), discard_fraction, fnmr
  pauc.csv    one row per curve: pAUC, relative pAUC, FNMR at the limit, the --target-fnmr threshold
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math

import numpy as np

from cafi import charts, edc
from cafi.charts import Line, Series, esc, num, table_html
from cafi.config import StorageConfig
from cafi.eval_identities import EdcSection
from cafi.eval_labels import LabelResult
from cafi.eval_result import Result
from cafi.eval_text import BETTER
from cafi.storage import filesystem, join

CHART_POINTS = 800            # per curve on the page: a 760-pixel chart shows no more


def _write(dest: str, text: str, storage: StorageConfig | None) -> None:
    fs, path = filesystem(dest, storage if storage is not None else StorageConfig())
    with fs.open(path, "wb") as fh:
        fh.write(text.encode("utf-8"))


def write_outputs(result: Result, out_dir: str, storage: StorageConfig | None = None) -> list[str]:
    """Write eval.html (always) and, when the EDC was computed, edc.json, edc.csv and pauc.csv.
    Returns the URIs written."""
    fs, path = filesystem(out_dir, storage if storage is not None else StorageConfig())
    fs.makedirs(path, exist_ok=True)
    files = {"eval.html": render(result)}
    if result.edc is not None:
        files["edc.json"] = result.to_json()
        files["edc.csv"] = curves_csv(result.edc)
        files["pauc.csv"] = pauc_csv(result.edc)
    written = []
    for name, text in files.items():
        dest = join(out_dir, name)
        _write(dest, text, storage)
        written.append(dest)
    return written


def _csv(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def curves_csv(e: EdcSection) -> str:
    return _csv(["score", "order", "discard_fraction", "fnmr"],
                ([c["score"], c["order"], repr(x), repr(y)] for c in e.curves()
                 for x, y in zip(c["discard"], c["fnmr"], strict=True)))


def pauc_csv(e: EdcSection) -> str:
    def cell(x):
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

    rows = []
    for r in e.pauc_rows():
        t = r["target"] or {}
        rows.append([r["score"], r["order"], cell(r["better"]), r["pauc"], cell(r["relative"]), r["fnmr_at_limit"],
                     r["unrated_pairs"], cell(t.get("fnmr")), cell(t.get("reached")), cell(t.get("discard")),
                     cell(t.get("threshold")), cell(t.get("rule"))])
    return _csv(["score", "order", "better", "pauc", "relative", "fnmr_at_limit", "unrated_pairs", "target_fnmr",
                 "target_reached", "target_discard", "target_threshold", "target_rule"], rows)


# ---------------------------------------------------------------- the page

# More curves than this: the face-quality and image-quality scores are drawn prominently, the other
# columns (components, detector confidence) faintly behind them.
HANDFUL = 6
FAINT = 0.3


def scorer_columns() -> set[str]:
    """The columns of the FIQA and IQA scorers (their scores and raw outputs) and cafi's own score."""
    from cafi.stages.specs import all_specs

    return {"cafi"} | {c for s in all_specs() if s.family in ("fiqa", "iqa") for c in (*s.outputs, s.score) if c}


def _series(e: EdcSection) -> list[Series]:
    r = e.result
    out = []
    many = len(r.scores) > HANDFUL
    scorers = scorer_columns()
    for i, s in enumerate(r.scores):
        color, dash = charts.series_style(i)
        x, y = edc.resample(s.curve, CHART_POINTS)
        strong = not many or s.name in scorers
        width, opacity = (2.0 if many else 1.6, 1.0) if strong else (1.0, FAINT)
        out.append(Series(f"{s.name}  {s.pauc:.4f}", x, y, color, dash, width=width, opacity=opacity))
    for s, color, dash in ((r.ideal, "#111", "5 3"), (r.random, "#999", "2 3")):
        x, y = edc.resample(s.curve, CHART_POINTS)
        out.append(Series(f"({s.order})  {s.pauc:.4f}", x, y, color, dash, width=2.0))
    return out


def window_range(series: list[Series], limit: float, log: bool) -> tuple[float, float]:
    """The FNMR range of the curves up to the pAUC limit (a step curve holds its value up to the next
    point, so each curve's last point at or before the limit counts): 0 to a little above their top, or
    on a log axis from the decade under their smallest positive value (FNMR 0 sits on that edge)."""
    values = np.concatenate([np.asarray(s.ys, float)[np.asarray(s.xs, float) <= limit] for s in series] or [[]])
    values = values[np.isfinite(values)]
    top = float(values.max()) if len(values) else 0.0
    if not log:
        return 0.0, max(top, 1e-6) * 1.05
    positive = values[values > 0]
    lo = 10.0 ** math.floor(math.log10(positive.min())) if len(positive) else 1e-4
    return lo, max(top, lo * 10) * 1.2


def edc_charts(e: EdcSection) -> str:
    o = e.result.options
    series = _series(e)
    top = max([float(max(s.ys[s.xs < 1.0], default=0.0)) for s in series] + [1e-6]) * 1.05
    limit = [Line(o.pauc_limit, f"pAUC limit {o.pauc_limit:g}")]
    x_label, y_label = "fraction of mated comparisons discarded (lowest pair quality first)", "FNMR"
    whole = charts.line_chart_svg("edc", "EDC: FNMR vs fraction discarded (legend: pAUC)", series, (0.0, 1.0),
                                  (0.0, top), x_label, y_label, limit)
    # The window's own FNMR scale: the whole curve's top (its last few pairs) would flatten it onto zero.
    title = f"EDC up to the pAUC limit ({o.pauc_limit:.0%})"
    zoom = charts.line_chart_svg("edc-zoom", title, series, (0.0, o.pauc_limit),
                                 window_range(series, o.pauc_limit, log=False), x_label, y_label)
    log = charts.line_chart_svg("edc-zoom-log", f"{title}, log FNMR", series, (0.0, o.pauc_limit),
                                window_range(series, o.pauc_limit, log=True), x_label, "FNMR (log)", log_y=True)
    return (whole + zoom + '<details class="log-axis"><summary>log FNMR axis (as the FIQA literature plots the '
            f"EDC)</summary>{log}</details>")


def edc_section(e: EdcSection) -> str:
    r, o = e.result, e.result.options
    d = e.as_dict()
    facts = [("identities file", e.file), ("URIs listed / in the manifest / with an embedding",
                                            f"{e.listed:,} / {e.found:,} / {e.embedded:,}"),
             ("embeddings (recognizer)", e.recognizer()),
             ("identities", f"{r.identities:,}"), ("mated pairs", f"{r.mated:,}")]
    if o.start_fnmr is None:
        facts.append(("non-mated pairs", f"{r.nonmated:,}: {d['nonmated_sampling']}"))
    if r.message:
        return (f"<h2>Error versus discard (EDC)</h2>{table_html(['', ''], facts, cls='meta')}"
                f'<p class="warn" data-edc="none">{esc(r.message[0].upper() + r.message[1:])}.</p>')
    how = (f"FMR {r.fmr:.2g} on the non-mated pairs (target {o.fmr:g})" if o.start_fnmr is None
           else f"starting FNMR target {o.start_fnmr:g}")
    facts += [("threshold", f"cosine similarity >= {r.threshold:.4f} ({how})"),
              ("starting FNMR", f"{r.start_fnmr:.4f}"), ("pAUC limit", f"{o.pauc_limit:g}")]
    facts += [(k.replace("_", " "), v) for k, v in d["conventions"].items()]
    target = o.target_fnmr is not None
    header = ["score", "better", "pAUC", "relative", f"FNMR at {o.pauc_limit:.0%}", "pairs without a value"]
    header += [f"threshold for FNMR <= {o.target_fnmr:g}", "discarded"] if target else []
    rows = []
    for p in e.pauc_rows():
        row = [p["score"] if p["order"] == "score" else f"({p['order']} order)", BETTER[p["better"]],
               f"{p['pauc']:.5f}", num(p["relative"]), f"{p['fnmr_at_limit']:.4f}",
               p["unrated_pairs"] if p["order"] == "score" else ""]
        if target:
            t = p["target"]
            row += (["", ""] if t is None else ["not reached", ""] if not t["reached"]
                    else [t["rule"] or "", f"{t['discard']:.1%}"])
        rows.append(row)
    return (f"<h2>Error versus discard (EDC)</h2>{table_html(['', ''], facts, cls='meta')}"
            f'<div class="charts">{edc_charts(e)}</div>'
            f"<h3>pAUC (lower is better; relative: 0 = ideal order, 1 = random order)</h3>"
            f"{table_html(header, rows, numeric=range(2, 6))}")


def labels_section(lr: LabelResult) -> str:
    by = {"srcc": "SRCC against the MOS", "f1": "F1 against the human decision"}.get(lr.sorted_by, "")
    header = ["column", "better", "n (MOS)", "SRCC", "PLCC", "n (accept)", "F1", "precision", "recall",
              "best single threshold"]
    rows = [[e["column"], BETTER[e["better"]], e.get("n_mos", ""), num(e.get("srcc")) if "srcc" in e else "",
             num(e.get("plcc")) if "plcc" in e else "", e.get("n_accept", ""), num(e.get("f1")) if "f1" in e else "",
             num(e.get("precision")) if "precision" in e else "", num(e.get("recall")) if "recall" in e else "",
             e.get("rule", "")] for e in lr.ranking]
    out = (f"<h2>Quality columns against the labels</h2><p>{lr.matched:,} of {lr.labels:,} labelled URIs found. "
           f"Oriented so that higher is better; best first by {esc(by)}. F1: the best single threshold on the "
           "column (rows without a value rejected).</p>" + table_html(header, rows, numeric=range(2, 9)))
    if lr.decision is not None:
        fi, iq = f"min_{lr.fiqa}", f"min_{lr.iqa}"
        dh = ["thresholds", fi, iq, "accepted", "TP", "FP", "FN", "precision", "recall", "F1"]

        def row(name, a, b, c):
            return [name, "none" if a is None else f"{a:g}", "none" if b is None else f"{b:g}", c["accepted"],
                    c["tp"], c["fp"], c["fn"], num(c["precision"]), num(c["recall"]), num(c["f1"])]

        drows = [row("this run", lr.thresholds.get(fi), lr.thresholds.get(iq), lr.decision)]
        s = lr.suggestion
        if s is not None:
            drows.append(row(f"suggested ({s.goal})", s.min_fiqa, s.min_iqa, s.confusion.as_dict()))
        out += (f"<h3>The decision against the human one ({lr.decision_rows:,} rows, {lr.human_accepts:,} human "
                f"accepts)</h3>" + table_html(dh, drows, numeric=range(1, 10)))
    return out


def render(result: Result) -> str:
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [f"<h1>cafi eval</h1><p>{esc(result.source)} · generated {esc(generated)}</p>"]
    if result.edc is not None:
        body.append(edc_section(result.edc))
    if result.labels is not None:
        body.append(labels_section(result.labels))
    return charts.page("cafi eval", "\n".join(body), {"data-eval": "1"})
