"""identities.html: one self-contained page in the run report's style (cafi/charts.py, cafi/report.py):
the distribution of centroid cosines with the outlier threshold, the counts per reason, thumbnails of
outliers, duplicates (beside the copy kept) and conflicts (beside the other label's sample), and the
top merge candidates. Thumbnails are the report's (small JPEGs inlined as data URIs, bounded decoding);
charts are inline SVG; nothing is fetched when the page is viewed."""

from __future__ import annotations

import datetime as _dt
import json

import numpy as np
import pyarrow as pa

from cafi import runs
from cafi.charts import Line, esc, histogram_svg, num, page, table_html
from cafi.config import StorageConfig
from cafi.report import THUMB, thumbnails
from cafi.storage import filesystem

COLORS = {"kept": "#2e9d5b", "outlier": "#c0392b", "other": "#999999"}
SHOWN = 12
MERGES_SHOWN = 25


def _pic(uri: str | None, thumbs: dict) -> str:
    img = thumbs.get(uri) if uri else None
    if isinstance(img, str):
        return f'<img class="thumb" src="{img}" width="{THUMB}" height="{THUMB}" alt="{esc(uri)}">'
    why = str(img).splitlines()[0] if img is not None else "not fetched"
    return f'<div class="noimg" title="{esc(why)}">no preview</div>'


def _figure(uri: str | None, caption: str, thumbs: dict, why: str = "") -> str:
    extra = f'<span class="why">{esc(why)}</span>' if why else ""
    return (f'<figure class="thumb">{_pic(uri, thumbs)}<figcaption>{caption}{extra}<span class="uri">{esc(uri)}'
            f"</span></figcaption></figure>")


def _grid(title: str, note: str, figures: list[str]) -> str:
    body = "".join(figures) or "<p>none</p>"
    return f"<h3>{esc(title)}</h3><p>{esc(note)}</p><div class=\"grid-thumbs\">{body}</div>"


def _trimmed(edges: np.ndarray, hist: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The bins from the first to the last non-empty one (at least up to the threshold's range)."""
    total = np.sum(list(hist.values()), axis=0)
    nz = np.flatnonzero(total)
    if len(nz) == 0:
        return edges, hist
    lo, hi = max(0, nz[0] - 1), min(len(total), nz[-1] + 2)
    return edges[lo:hi + 1], {k: v[lo:hi] for k, v in hist.items()}


def render(summary: dict, edges: np.ndarray, hist: dict, examples: dict, merge_pairs: pa.Table, thumbs: dict) -> str:
    o = summary["options"]
    e, h = _trimmed(edges, hist)
    lines = [Line(o["min_centroid_cos"], f"min {o['min_centroid_cos']}")] if o["min_centroid_cos"] > -1 else []
    chart = histogram_svg("hist-centroid-cos", "Cosine to the centroid of the other samples of the identity", e, h,
                          COLORS, lines, x_label="centroid_cos", empty_text="no sample with another of its identity")
    n = summary["samples"]
    reason_rows = [(r, f"{summary['removed'][r]:,}", f"{100 * summary['removed'][r] / n:.1f}%" if n else "–")
                   for r in summary["reasons_order"]]
    kept = ("kept", f"{summary['kept']:,}", f"{100 * summary['kept'] / n:.1f}%" if n else "–")
    counts = table_html(["reason (first that applies, in this order)", "samples", "share"], [*reason_rows, kept],
                        numeric=(1, 2))
    meta = [("run", summary["run_id"]), ("model version", summary["model_version"]),
            ("identities from", summary["identities_file"] or f"column {summary['identity_column']}"),
            ("quality (ranks, duplicates, caps)", summary["quality"]), ("samples", f"{n:,}"),
            ("with an embedding", f"{summary['embedded']:,}"), ("identities", f"{summary['identities']:,}"),
            ("identities keeping a sample", f"{summary['identities_kept']:,}"),
            ("conflict pairs", f"{summary['conflict_pairs']:,}"),
            ("merge candidate pairs", f"{summary['merge_candidate_pairs']:,}")]
    head = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in meta)
    grids = [
        _grid("Outliers", f"lowest centroid cosine first ({summary['flagged']['outlier']:,} flagged)",
              [_figure(x["uri"], f"{esc(x['identity'])} · cos {num(x['centroid_cos'])}", thumbs, x["reason"] or "")
               for x in examples["outlier"][:SHOWN]]),
        _grid("Near-duplicates", f"each beside the copy kept ({summary['flagged']['duplicate']:,} flagged)",
              [_figure(x["uri"], f"{esc(x['identity'])} · duplicate", thumbs, x["reason"] or "")
               + _figure(x["duplicate_of"], f"{esc(x['identity'])} · kept copy", thumbs)
               for x in examples["duplicate"][:SHOWN // 2]]),
        _grid("Identity conflicts", f"each beside its most similar sample of another identity "
              f"({summary['flagged']['conflict']:,} samples flagged)",
              [_figure(x["uri"], f"{esc(x['identity'])}", thumbs, x["reason"] or "kept")
               + _figure(x["conflict_with"], "the other label's sample", thumbs)
               for x in examples["conflict"][:SHOWN // 2]]),
    ]
    top = merge_pairs.slice(0, MERGES_SHOWN).to_pylist()
    merges_html = table_html(["identity", "identity", "centroid cosine"],
                             [(m["identity_a"], m["identity_b"], num(m["cos"])) for m in top], numeric=(2,)) \
        if top else "<p>none</p>"
    options = json.dumps(o, indent=2, sort_keys=True)
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = f"""<h1>cafi identities: {esc(summary['run_id'])}</h1>
<p>generated {esc(generated)}</p><table class="meta">{head}</table>
<h2>Counts</h2><div class="charts">{counts}</div>
<h2>Centroid cosines</h2><p>Each sample against the centroid of the other samples of its identity; the dashed
line is the outlier threshold. Samples alone in their identity have no bar.</p><div class="charts">{chart}</div>
<h2>Examples</h2>{"".join(grids)}
<h2>Merge candidates</h2><p>Identity pairs whose centroids are at cosine &gt;= {esc(o['merge_cos'])}, most similar
first (top {MERGES_SHOWN}); listed for review, nothing is removed.</p>{merges_html}
<h2>Options</h2><details><summary>options of this curation</summary><pre>{esc(options)}</pre></details>"""
    return page(f"cafi identities {summary['run_id']}", body, {"data-run-id": summary["run_id"]})


def write_page(dest: str, summary: dict, edges: np.ndarray, hist: dict, examples: dict, merge_pairs: pa.Table,
               ref: runs.RunRef, storage: StorageConfig, image_storage: StorageConfig | None) -> None:
    shown = {u for k, lst in examples.items() for x in lst[:SHOWN]
             for u in (x["uri"], x.get("duplicate_of"), x.get("conflict_with")) if u}
    thumbs: dict = {}
    if shown:
        rows = runs.read_rows(ref.uri, storage, ["uri", "shard_offset", "shard_size"], pa.array(sorted(shown)))
        img_storage = image_storage if image_storage is not None else runs.storage_config(ref.summary)
        image_column = runs.config_section(ref.summary, "input").get("image_column", "jpg")
        thumbs = thumbnails(rows.table.to_pylist(), img_storage, runs.image_config(ref.summary),
                            image_column=image_column)
    html = render(summary, edges, hist, examples, merge_pairs, thumbs)
    fs, path = filesystem(dest, storage)
    with fs.open(path, "wb") as fh:
        fh.write(html.encode("utf-8"))



