"""The labels section of `cafi eval`: every quality column with values, oriented so that higher is
better, ranked by its SRCC and PLCC against the MOS and by the F1 of its best single-threshold filter
against the human decision ("accept" is the positive class; a row without a value is never kept);
the run's CAFI decision against the human one; and the thresholds of the run's FIQA and IQA scorers
that maximise F1 (or reach a precision with the best recall), every other rule of the run's decision
left as it is."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import columns, decision, eval_fusion, runs
from cafi.errors import CafiError
from cafi.eval_fusion import FusionFit
from cafi.eval_rows import ROW_COLUMNS, floats, present_quality
from cafi.eval_stats import confusion, plcc, srcc
from cafi.eval_thresholds import Suggestion, best_filter, own_units, suggest
from cafi.stages import specs


def _join(side: pa.Table, rows: pa.Table) -> pa.Table:
    """The rows whose URI is in `side`, with side's other columns added: an inner join on `uri` that,
    unlike Table.join, carries list columns (the embeddings)."""
    pos = pc.index_in(rows["uri"], value_set=side["uri"])
    found = pc.is_valid(pos)
    rows, pos = rows.filter(found), pos.filter(found)
    for name in side.column_names:
        if name != "uri":
            rows = rows.append_column(name, side[name].take(pos))
    return rows


def rank_columns(table: pa.Table, mos: np.ndarray, truth: np.ndarray | None) -> list[dict]:
    """Per quality column: SRCC/PLCC of its oriented values against the MOS (rows where both exist), and
    the best single-threshold filter against the human decision (`truth`: bool, NaN rows excluded
    beforehand by the caller's mask). Sorted by SRCC when there is a MOS, else by F1; best first."""
    has_mos = np.isfinite(mos)
    out = []
    for col in present_quality(table):
        v = col.oriented(floats(table, col.name))
        entry: dict = {"column": col.name, "better": col.better, "unit": col.unit}
        if has_mos.any():
            ok = np.isfinite(v) & has_mos
            entry.update(n_mos=int(ok.sum()), srcc=srcc(v[ok], mos[ok]), plcc=plcc(v[ok], mos[ok]))
        if truth is not None:
            labelled = truth >= 0
            f = best_filter(v[labelled], truth[labelled].astype(bool))
            entry["n_accept"] = int((labelled & np.isfinite(v)).sum())
            if f is not None:
                value, rule = own_units(col, f.threshold)
                entry.update(threshold=value, rule=rule, **{k: f.confusion.as_dict()[k] for k in
                                                            ("precision", "recall", "f1", "accepted")})
        out.append(entry)

    def key(e: dict) -> tuple:
        first = e.get("srcc") if has_mos.any() else e.get("f1")
        second = e.get("f1") if has_mos.any() else None
        return tuple(-x if x is not None and math.isfinite(x) else math.inf for x in (first, second)) + (e["column"],)

    return sorted(out, key=key)


@dataclass
class LabelResult:
    file: str
    labels: int
    matched: int
    unmatched_examples: list[str]
    ranking: list[dict] = field(default_factory=list)
    sorted_by: str = ""
    decision: dict | None = None          # confusion of the run's decision
    human_accepts: int = 0
    decision_rows: int = 0
    thresholds: dict = field(default_factory=dict)   # the run's decision config
    fiqa: str = runs.DEFAULT_FIQA
    iqa: str = runs.DEFAULT_IQA
    suggestion: Suggestion | None = None
    precision_target: float | None = None
    fit_fusion: bool = False              # --fit-fusion asked
    fusion: FusionFit | None = None       # its result (None: too few rows or columns)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("suggestion", "fusion")}
        out["suggestion"] = None if self.suggestion is None else self.suggestion.as_dict()
        out["fusion"] = None if self.fusion is None else self.fusion.as_dict()
        return out


def evaluate_labels(rows: runs.Rows, labels: pa.Table, labels_uri: str, precision: float | None,
                    fit_fusion: bool = False) -> LabelResult:
    joined = _join(labels, rows.table.select(ROW_COLUMNS))  # not the embeddings: no copy of them
    matched = set(joined["uri"].to_pylist())
    unmatched = [u for u in labels["uri"].to_pylist() if u not in matched]
    if joined.num_rows == 0:
        raise CafiError(f"none of the {labels.num_rows} labelled URIs is in {rows.source} "
                        f"(first label: {labels['uri'][0].as_py()})")
    dec = runs.decision_config(rows.summary)
    fiqa, iqa = runs.scorers(rows.summary)
    res = LabelResult(labels_uri, labels.num_rows, joined.num_rows, unmatched[:5], fiqa=fiqa, iqa=iqa,
                      thresholds={f.name: getattr(dec, f.name) for f in fields(dec) if f.name != "fusion"},
                      precision_target=precision, fit_fusion=fit_fusion)
    mos = floats(joined, "mos")
    has = pc.is_valid(joined["accept"]).to_numpy(zero_copy_only=False)
    truth = np.where(has, pc.fill_null(joined["accept"], False).to_numpy(zero_copy_only=False), -1).astype(np.int8)
    res.ranking = rank_columns(joined, mos, truth if has.any() else None)
    res.sorted_by = "srcc" if np.isfinite(mos).any() else "f1" if has.any() else ""
    if fit_fusion:
        res.fusion = eval_fusion.fit(joined, mos, truth if has.any() else None, dec.fusion.ranges)
    if has.any():
        sub = joined.filter(pa.array(has))
        human = truth[has].astype(bool)
        pred = pc.fill_null(sub["accepted"], False).to_numpy(zero_copy_only=False).astype(bool)
        res.decision = confusion(pred, human).as_dict()
        res.human_accepts, res.decision_rows = int(human.sum()), int(len(human))
        # Eligible: scored, and passing every rule but the two scorers' (those are what is searched).
        status = sub["status"].to_numpy(zero_copy_only=False).astype(object)
        values = {c.name: floats(sub, c.name) for c in columns.QUALITY}
        failed = decision.rule_failures({"status": status, **values}, dec, *specs.score_rules(dec, fiqa, iqa))
        others = [f for why, f in failed.items() if why not in ("unrecognisable", "low_quality") and f is not None]
        eligible = (status == decision.SCORED) & ~np.logical_or.reduce(others or [np.zeros(len(status), bool)])
        res.suggestion = suggest(values[fiqa], values[iqa], eligible, human, precision, (fiqa, iqa))
    return res
