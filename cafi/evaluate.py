"""`cafi eval`: a run's quality columns against human labels, and against recognition (EDC).

Labels (a CSV with `uri` and a MOS, higher is better, and/or a human accept/reject):
- every quality column of the manifest that has values (cafi.columns.QUALITY: the scores, CAFI and
  the quality components), oriented so that higher is better, is ranked by its SRCC and PLCC
  against the MOS, and by the F1 of the best single-threshold filter against the human decision
  ("accept" is the positive class; a row without a value is never kept);
- the CAFI decision's precision, recall and F1, and the thresholds of the run's FIQA and IQA
  scorers that maximise F1 (or reach a precision with the best recall), every other rule of the
  run's decision left as it is.

Identities (a CSV with `uri` and an identity): with the stored embeddings, the error-versus-discard
characteristic of every quality column (cafi/edc.py, ISO/IEC 29794-1:2024).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.stats

from cafi import columns, decision, edc, runs
from cafi.columns import Column
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.storage import filesystem

TRUE_WORDS = {"1", "true", "t", "yes", "y", "accept", "accepted", "keep", "pass"}
FALSE_WORDS = {"0", "false", "f", "no", "n", "reject", "rejected", "drop", "fail"}
ROW_COLUMNS = ["uri", "status", "accepted", "reject_reason", *(c.name for c in columns.QUALITY)]
MAX_FIQA_CANDIDATES = 1024


# ---------------------------------------------------------------- statistics

def _correlation(fn, x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: scipy warns and returns NaN
        return float(fn(x, y)[0])


def plcc(x, y) -> float:
    """Pearson's linear correlation (scipy.stats.pearsonr); NaN where undefined (n < 2, a constant)."""
    return _correlation(scipy.stats.pearsonr, x, y)


def srcc(x, y) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr, ties share their mean rank)."""
    return _correlation(scipy.stats.spearmanr, x, y)


@dataclass
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else math.nan

    @property
    def accepted(self) -> int:
        return self.tp + self.fp

    def as_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1, "accepted": self.accepted}


def confusion(pred, truth) -> Confusion:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return Confusion(int(np.sum(pred & truth)), int(np.sum(pred & ~truth)), int(np.sum(~pred & truth)),
                     int(np.sum(~pred & ~truth)))


# ---------------------------------------------------------------- thresholds

def _between(lower: float | None, upper: float, floor: float | None = None) -> float:
    """A short decimal t with lower < t <= upper, near the middle; also in float32, so a comparison of
    float32 scores gives the same answer either way."""
    if lower is None:  # nothing below to exclude: the floor of the scale, else the value itself
        return float(floor) if floor is not None and floor <= upper else float(upper)
    mid = (float(lower) + float(upper)) / 2.0
    for digits in range(1, 10):
        t = round(mid, digits)
        if lower < t <= upper and np.float32(lower) < np.float32(t) <= np.float32(upper):
            return t
    return float(upper)


def own_units(column: Column, oriented_threshold: float) -> tuple[float, str]:
    """An oriented threshold ("keep rows with oriented value >= t") in the column's own units and
    direction: the value and the rule, e.g. (23.5, "|yaw| <= 23.5")."""
    t = float(oriented_threshold)
    v = t if column.better == "higher" else -t
    rule = {"higher": f"{column.name} >= {v:g}", "lower": f"{column.name} <= {v:g}",
            "abs_lower": f"|{column.name}| <= {v:g}", "near_half": f"|{column.name} - 0.5| <= {v:g}"}[column.better]
    return v, rule


@dataclass
class Filter:
    """The best single-threshold filter on one column: keep rows with oriented value >= threshold."""

    threshold: float            # oriented
    confusion: Confusion


def best_filter(oriented: np.ndarray, truth: np.ndarray) -> Filter | None:
    """The threshold with the best F1 against the human decision (equal F1: the higher threshold).
    Rows without a value are never kept. None when nothing is human-accepted or no row has a value."""
    oriented, truth = np.asarray(oriented, np.float64), np.asarray(truth, bool)
    positives = int(truth.sum())
    ok = np.isfinite(oriented)
    if positives == 0 or not ok.any():
        return None
    order = np.argsort(-oriented[ok], kind="mergesort")       # best first
    v, y = oriented[ok][order], truth[ok][order]
    ends = np.flatnonzero(np.r_[v[1:] != v[:-1], True])        # keeping rows 0..end keeps a whole run of ties
    tp = np.cumsum(y)[ends]
    f1 = 2 * tp / (ends + 1 + positives)                        # 2tp / (tp + fp + P), tp + fp = end + 1
    pick = int(np.argmax(f1))                                   # first maximum: the highest threshold
    below = float(v[ends[pick] + 1]) if ends[pick] + 1 < len(v) else None
    t = _between(below, float(v[ends[pick]]))
    with np.errstate(invalid="ignore"):
        return Filter(t, confusion(oriented >= t, truth))


@dataclass
class Suggestion:
    fiqa: str                      # the scorer columns the thresholds are for
    iqa: str
    min_fiqa: float
    min_iqa: float | None          # None: no IQA threshold is needed
    confusion: Confusion
    goal: str                      # "max F1" or "precision >= P"

    def as_dict(self) -> dict:
        return {f"min_{self.fiqa}": self.min_fiqa, f"min_{self.iqa}": self.min_iqa, "goal": self.goal,
                **self.confusion.as_dict()}


def accept_rule(fiqa, iqa, eligible, min_fiqa: float, min_iqa: float | None) -> np.ndarray:
    """The CAFI rule on its two scores: eligible (scored, every other rule passed) and both at their
    minimums ("not >=" fails, so a NaN is never accepted), as cafi.decision compares."""
    f, q = np.asarray(fiqa, np.float32).astype(np.float64), np.asarray(iqa, np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.asarray(eligible, bool) & (f >= min_fiqa)
        if min_iqa is not None:
            ok &= q >= min_iqa
    return ok


def suggest(fiqa, iqa, eligible, truth, precision: float | None = None, names: tuple[str, str] = ("serfiq", "dbcnn")
            ) -> Suggestion | None:
    """The (min FIQA, min IQA) pair that maximises F1, or with `precision`, the pair with the best
    recall among those whose precision reaches it. None when no pair accepts a true positive (or
    reaches the precision). Exhaustive over IQA cut points, and over FIQA cut points (or
    `MAX_FIQA_CANDIDATES` quantiles of them)."""
    fiqa = np.asarray(fiqa, np.float32)
    iqa = np.asarray(iqa, np.float32)
    truth = np.asarray(truth, bool)
    usable = np.asarray(eligible, bool) & np.isfinite(fiqa) & np.isfinite(iqa)
    positives = int(truth.sum())                         # every human accept: missed ones are FN
    negatives = int((~truth).sum())
    s, d, y = fiqa[usable], iqa[usable], truth[usable]
    if positives == 0 or len(s) == 0:
        return None
    order = np.argsort(-d, kind="mergesort")             # IQA high to low
    d_sorted, y_sorted = d[order], y[order]
    # The last index of each run of equal IQA values: accepting "iqa >= d_sorted[end]" keeps 0..end.
    ends = np.flatnonzero(np.r_[d_sorted[1:] != d_sorted[:-1], True])
    s_sorted = s[order]
    cuts = np.unique(s)[::-1]                            # FIQA cut points, high to low
    if len(cuts) > MAX_FIQA_CANDIDATES:
        cuts = np.unique(np.quantile(s, np.linspace(0, 1, MAX_FIQA_CANDIDATES), method="lower"))[::-1]
    best, best_key = None, None
    for ts in cuts:
        keep = s_sorted >= ts
        tp = np.cumsum(keep & y_sorted)[ends]
        fp = np.cumsum(keep)[ends] - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
            f1 = 2 * tp / (tp + fp + positives)
        rec = tp / positives
        if precision is None:
            key_cols = (f1, prec, np.full(len(tp), ts), d_sorted[ends])
            ok = tp > 0
        else:
            key_cols = (rec, prec, np.full(len(tp), ts), d_sorted[ends])
            ok = (tp > 0) & (prec >= precision - 1e-12)
        if not ok.any():
            continue
        # lexicographic max: first key, then the next ones (higher thresholds win exact ties)
        idx = np.flatnonzero(ok)
        for k in key_cols:
            vals = k[idx]
            idx = idx[vals == vals.max()]
        pick = idx[-1]
        key = tuple(float(k[pick]) for k in key_cols)
        if best_key is None or key > best_key:
            best_key, best = key, (float(ts), int(pick))
    if best is None:
        return None
    ts, pick = best
    lowest_kept_d = float(d_sorted[ends[pick]])
    below = d_sorted[ends[pick] + 1:] if ends[pick] + 1 < len(d_sorted) else np.zeros(0, np.float32)
    # rows with IQA below the cut that would pass FIQA: if none, no IQA threshold is needed
    passes_s = (s_sorted >= ts)[ends[pick] + 1:]
    min_iqa = None if not passes_s.any() else _between(float(below[0]), lowest_kept_d)
    lower_s = s[s < ts]
    min_fiqa = _between(float(lower_s.max()) if len(lower_s) else None, float(ts), floor=0.0)
    conf = confusion(accept_rule(fiqa, iqa, usable, min_fiqa, min_iqa), truth)
    # The rounded thresholds accept exactly the rows the search counted.
    found_tp = int(np.cumsum((s_sorted >= ts) & y_sorted)[ends[pick]])
    found_fp = int(np.cumsum((s_sorted >= ts) & ~y_sorted)[ends[pick]])
    if (conf.tp, conf.fp, conf.tp + conf.fn, conf.fp + conf.tn) != (found_tp, found_fp, positives, negatives):
        raise CafiError(f"internal: thresholds ({min_fiqa}, {min_iqa}) do not reproduce the search "
                        f"({conf} vs tp={found_tp} fp={found_fp})")
    goal = "max F1" if precision is None else f"precision >= {precision:g}"
    return Suggestion(*names, min_fiqa, min_iqa, conf, goal)


# ---------------------------------------------------------------- inputs

def _parse_accept(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if v == "":
        return None
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise CafiError(f"{where}: accept value {value!r} is not one of 1/0, true/false, yes/no, accept/reject")


def _read_csv(uri: str, storage: StorageConfig | None, what: str, needs: list[str], wanted: str
              ) -> tuple[list[str], list[tuple[int, str, dict]]]:
    """A CSV with a unique, non-empty `uri` per row: (columns, [(line, uri, row)]). At least one of the
    columns `needs` must be there (`wanted` says which in words)."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise CafiError(f"{what}: {uri} does not exist")
    with fs.open(path, "rb") as fh:
        text = fh.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    if "uri" not in cols:
        raise CafiError(f"{what}: {uri} has no 'uri' column (columns: {cols})")
    if not any(c in cols for c in needs):
        raise CafiError(f"{what}: {uri} needs {wanted} (columns: {cols})")
    rows, seen = [], {}
    for line, row in enumerate(reader, start=2):
        u = (row.get("uri") or "").strip()
        if not u:
            raise CafiError(f"{what} {uri} line {line}: empty uri")
        if u in seen:
            raise CafiError(f"{what} {uri} line {line}: uri {u} is {'labelled' if what == 'labels' else 'listed'} "
                            f"twice (first on line {seen[u]})")
        seen[u] = line
        rows.append((line, u, row))
    if not rows:
        raise CafiError(f"{what}: {uri} has no rows")
    return cols, rows


def read_labels(uri: str, storage: StorageConfig | None = None, mos_column: str = "mos",
                accept_column: str = "accept") -> pa.Table:
    """The labels CSV as a table: uri, mos (float64, may be null), accept (bool, may be null)."""
    cols, rows = _read_csv(uri, storage, "labels", [mos_column, accept_column],
                           f"a {mos_column!r} and/or an {accept_column!r} column")
    has_mos, has_accept = mos_column in cols, accept_column in cols
    mos, accept = [], []
    for line, _, row in rows:
        where = f"labels {uri} line {line}"
        m = (row.get(mos_column) or "").strip() if has_mos else ""
        try:
            mos.append(float(m) if m else None)
        except ValueError:
            raise CafiError(f"{where}: {mos_column} {m!r} is not a number") from None
        if mos[-1] is not None and not math.isfinite(mos[-1]):
            raise CafiError(f"{where}: {mos_column} {m!r} is not a finite number")
        accept.append(_parse_accept(row.get(accept_column) or "", where) if has_accept else None)
    return pa.table({"uri": pa.array([u for _, u, _ in rows], pa.string()), "mos": pa.array(mos, pa.float64()),
                     "accept": pa.array(accept, pa.bool_())})


def read_identities(uri: str, storage: StorageConfig | None = None, column: str = "identity") -> pa.Table:
    """The identities CSV as a table: uri, identity (string; every row needs one)."""
    _, rows = _read_csv(uri, storage, "identities", [column], f"an {column!r} column (--identity-column)")
    ids = []
    for line, _, row in rows:
        v = (row.get(column) or "").strip()
        if not v:
            raise CafiError(f"identities {uri} line {line}: empty {column}")
        ids.append(v)
    return pa.table({"uri": pa.array([u for _, u, _ in rows], pa.string()), "identity": pa.array(ids, pa.string())})


# ---------------------------------------------------------------- label metrics

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


def _floats(table: pa.Table, col: str) -> np.ndarray:
    return pc.fill_null(table[col], float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def present_quality(table: pa.Table) -> list[Column]:
    """The quality columns of the manifest with at least one value among these rows."""
    return [c for c in columns.QUALITY if c.name in table.column_names and np.isfinite(_floats(table, c.name)).any()]


def rank_columns(table: pa.Table, mos: np.ndarray, truth: np.ndarray | None) -> list[dict]:
    """Per quality column: SRCC/PLCC of its oriented values against the MOS (rows where both exist), and
    the best single-threshold filter against the human decision (`truth`: bool, NaN rows excluded
    beforehand by the caller's mask). Sorted by SRCC when there is a MOS, else by F1; best first."""
    has_mos = np.isfinite(mos)
    out = []
    for col in present_quality(table):
        v = col.oriented(_floats(table, col.name))
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

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "suggestion"}
        out["suggestion"] = None if self.suggestion is None else self.suggestion.as_dict()
        return out


def evaluate_labels(rows: runs.Rows, labels: pa.Table, labels_uri: str, precision: float | None) -> LabelResult:
    joined = _join(labels, rows.table.select(ROW_COLUMNS))  # not the embeddings: no copy of them
    matched = set(joined["uri"].to_pylist())
    unmatched = [u for u in labels["uri"].to_pylist() if u not in matched]
    if joined.num_rows == 0:
        raise CafiError(f"none of the {labels.num_rows} labelled URIs is in {rows.source} "
                        f"(first label: {labels['uri'][0].as_py()})")
    dec = runs.decision_config(rows.summary)
    fiqa, iqa = runs.scorers(rows.summary)
    res = LabelResult(labels_uri, labels.num_rows, joined.num_rows, unmatched[:5], fiqa=fiqa, iqa=iqa,
                      thresholds={f.name: getattr(dec, f.name) for f in fields(dec)}, precision_target=precision)
    mos = _floats(joined, "mos")
    has = pc.is_valid(joined["accept"]).to_numpy(zero_copy_only=False)
    truth = np.where(has, pc.fill_null(joined["accept"], False).to_numpy(zero_copy_only=False), -1).astype(np.int8)
    res.ranking = rank_columns(joined, mos, truth if has.any() else None)
    res.sorted_by = "srcc" if np.isfinite(mos).any() else "f1" if has.any() else ""
    if has.any():
        sub = joined.filter(pa.array(has))
        human = truth[has].astype(bool)
        pred = pc.fill_null(sub["accepted"], False).to_numpy(zero_copy_only=False).astype(bool)
        res.decision = confusion(pred, human).as_dict()
        res.human_accepts, res.decision_rows = int(human.sum()), int(len(human))
        # Eligible: scored, and passing every rule but the two scorers' (those are what is searched).
        status = sub["status"].to_numpy(zero_copy_only=False).astype(object)
        values = {c.name: _floats(sub, c.name) for c in columns.QUALITY}
        failed = decision.rule_failures({"status": status, **values}, dec, fiqa, iqa)
        others = [f for why, f in failed.items() if why not in ("unrecognisable", "low_quality") and f is not None]
        eligible = (status == decision.SCORED) & ~np.logical_or.reduce(others or [np.zeros(len(status), bool)])
        res.suggestion = suggest(values[fiqa], values[iqa], eligible, human, precision, (fiqa, iqa))
    return res


# ---------------------------------------------------------------- EDC against identities

@dataclass
class EdcSection:
    file: str
    identity_column: str
    listed: int                   # rows of the identities file
    found: int                    # ... whose URI is in the manifest
    embedded: int                 # ... with an embedding: the samples compared
    result: edc.Result

    def target_of(self, s: edc.ScoreResult) -> dict | None:
        t = s.target
        if t is None:
            return None
        out = {"fnmr": t.fnmr, "reached": t.reached, "discard": t.discard, "threshold": None, "rule": None}
        if t.reached and t.quality is not None and s.order == "score":
            below = t.below if t.below is not None and math.isfinite(t.below) else None
            out["threshold"], out["rule"] = own_units(columns.BY_NAME[s.name], _between(below, t.quality))
        elif t.reached and s.order == "score":
            out["rule"] = "none needed (reached without discarding)"
        return out

    def pauc_rows(self) -> list[dict]:
        """ideal, every score (best first), random."""
        r = self.result
        if r.ideal is None:
            return []
        rows = []
        for s in (r.ideal, *r.scores, r.random):
            col = columns.BY_NAME.get(s.name) if s.order == "score" else None
            rows.append({"score": s.name, "order": s.order, "better": col.better if col else None,
                         "pauc": s.pauc, "relative": s.relative, "fnmr_at_limit": s.fnmr_at_limit,
                         "unrated_pairs": s.unrated_pairs, "target": self.target_of(s)})
        return rows

    def curves(self, points: int = edc.MAX_POINTS) -> list[dict]:
        r = self.result
        out = []
        for s in ([r.ideal, *r.scores, r.random] if r.ideal is not None else []):
            x, y = edc.resample(s.curve, points)
            out.append({"score": s.name, "order": s.order, "discard": x.tolist(), "fnmr": y.tolist()})
        return out

    def as_dict(self) -> dict:
        r, o = self.result, self.result.options
        sampling = ("every non-mated pair" if not r.nonmated_sampled else
                    f"a seeded sample of {r.nonmated:,} non-mated pairs, uniform with replacement (seed {o.seed})")
        return {
            "identities_file": self.file, "identity_column": self.identity_column, "listed": self.listed,
            "found": self.found, "samples": r.samples, "identities": r.identities, "mated_pairs": r.mated,
            "nonmated_pairs": r.nonmated, "nonmated_sampling": sampling if o.start_fnmr is None else None,
            "threshold": {"similarity": r.threshold, "set_by": "fmr" if o.start_fnmr is None else "start_fnmr",
                          "fmr_target": o.fmr if o.start_fnmr is None else None, "fmr": r.fmr,
                          "start_fnmr_target": o.start_fnmr, "start_fnmr": r.start_fnmr},
            "pauc_limit": o.pauc_limit, "target_fnmr": o.target_fnmr, "min_mated": o.min_mated,
            "conventions": {"match": "cosine similarity >= threshold", "pair_quality": "min of the two samples",
                            "missing_quality": "lowest: those pairs are discarded first, together",
                            "ideal": "ascending similarity (false non-matches first)",
                            "random": "expected curve of a random order: flat at the starting FNMR",
                            "pauc": "step-function integral from 0 to pauc_limit, not normalised; relative = "
                                    "(pauc - ideal) / (random - ideal)"},
            "message": r.message, "pauc": self.pauc_rows(), "curves": self.curves(),
        }


def _vectors(embeddings: pa.ChunkedArray) -> np.ndarray:
    """(n, 512) float16 numpy from the manifest's fixed-size-list column (no nulls), one copy."""
    return np.concatenate([c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), -1)
                           for c in embeddings.chunks if len(c)] or [np.zeros((0, columns.EMBEDDING_DIM))])


def evaluate_identities(rows: runs.Rows, ids: pa.Table, ids_uri: str, column: str,
                        options: edc.Options) -> EdcSection:
    pos = pc.index_in(rows.table["uri"], value_set=ids["uri"])
    listed = pc.is_valid(pos)
    found = int(pc.sum(listed).as_py() or 0)
    if found == 0:
        raise CafiError(f"none of the {ids.num_rows} URIs of the identities file is in {rows.source} "
                        f"(first: {ids['uri'][0].as_py()})")
    # The samples compared: listed, with an embedding. Only their embeddings are copied, once.
    keep = pc.and_(listed, pc.is_valid(rows.table["embedding"]))
    sample = rows.table.select([c.name for c in columns.QUALITY]).filter(keep)
    if sample.num_rows == 0:
        raise CafiError(f"{rows.source} has no embeddings for these {found} samples: re-score with "
                        "output.embeddings=true to store them")
    vectors = _vectors(rows.table["embedding"].filter(keep))
    identities = ids["identity"].take(pos.filter(keep)).to_numpy(zero_copy_only=False)
    qualities = {c.name: c.oriented(_floats(sample, c.name)) for c in present_quality(sample)}
    try:
        result = edc.evaluate(vectors, identities, qualities, options)
    except ValueError as exc:  # too many mated pairs to hold
        raise CafiError(str(exc)) from None
    return EdcSection(ids_uri, column, ids.num_rows, found, sample.num_rows, result)


# ---------------------------------------------------------------- both

@dataclass
class Result:
    source: str
    labels: LabelResult | None = None
    edc: EdcSection | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "labels": self.labels.as_dict() if self.labels else None,
                "edc": self.edc.as_dict() if self.edc else None}

    def to_json(self) -> str:
        """The document as strict JSON: an undefined number (a correlation of a constant) is null."""
        return json.dumps(_finite(self.as_dict()), indent=2, default=str, allow_nan=False)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def check_options(options: edc.Options) -> None:
    o = options
    checks = [(0 < o.fmr < 1, f"--fmr {o.fmr} is not in (0, 1)"),
              (o.start_fnmr is None or 0 < o.start_fnmr < 1, f"--start-fnmr {o.start_fnmr} is not in (0, 1)"),
              (0 < o.pauc_limit <= 1, f"--pauc-limit {o.pauc_limit} is not in (0, 1]"),
              (o.nonmated >= 1, f"--nonmated {o.nonmated} is not a positive count"),
              (o.min_mated >= 1, f"--min-mated {o.min_mated} is not a positive count"),
              (o.target_fnmr is None or 0 <= o.target_fnmr < 1, f"--target-fnmr {o.target_fnmr} is not in [0, 1)")]
    for ok, msg in checks:
        if not ok:
            raise CafiError(msg)


def evaluate(manifest_uri: str, labels_uri: str | None = None, storage: StorageConfig | None = None,
             precision: float | None = None, mos_column: str = "mos", accept_column: str = "accept",
             identities_uri: str | None = None, identity_column: str = "identity",
             options: edc.Options | None = None) -> Result:
    """Read what is needed once (the labelled and identified rows only) and evaluate against both."""
    if labels_uri is None and identities_uri is None:
        raise CafiError("nothing to evaluate against: give LABELS.csv and/or --identities IDS.csv")
    if precision is not None and not 0.0 < precision <= 1.0:
        raise CafiError(f"--precision {precision} is not in (0, 1]")
    options = options or edc.Options()
    check_options(options)
    storage = storage if storage is not None else StorageConfig()  # endpoint and region from the environment
    labels = read_labels(labels_uri, storage, mos_column, accept_column) if labels_uri else None
    ids = read_identities(identities_uri, storage, identity_column) if identities_uri else None
    wanted = pa.concat_arrays([t["uri"].combine_chunks() for t in (labels, ids) if t is not None])
    cols = ROW_COLUMNS + (["embedding"] if ids is not None else [])
    rows = runs.read_rows(manifest_uri, storage, cols, pc.unique(wanted))
    result = Result(rows.source)
    if labels is not None:
        result.labels = evaluate_labels(rows, labels, labels_uri, precision)
    if ids is not None:
        result.edc = evaluate_identities(rows, ids, identities_uri, identity_column, options)
    return result


# ---------------------------------------------------------------- printing

def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _thr(x: float | None) -> str:
    return "none" if x is None else f"{x:g}"


BETTER = {"higher": "higher", "lower": "lower", "abs_lower": "|x| lower", "near_half": "near 0.5", None: ""}


def format_labels(r: LabelResult, source: str) -> list[str]:
    lines = [f"cafi eval: {r.matched} of {r.labels} labelled URIs found in {source}"]
    if r.unmatched_examples:
        lines.append(f"  {r.labels - r.matched} labelled URIs are not in the manifest, e.g. "
                     + ", ".join(r.unmatched_examples[:3]))
    if r.sorted_by:
        by = "SRCC against the MOS" if r.sorted_by == "srcc" else "F1 against the human decision"
        lines += ["", f"Quality columns against the labels (oriented so higher is better; best first by {by}; "
                      "PLCC without a logistic mapping;", "F1: the best single threshold, rows without a value "
                      "rejected):",
                  f"  {'column':<15}{'better':<11}{'n':>6}{'SRCC':>8}{'PLCC':>8}{'n':>6}{'F1':>7}{'prec':>7}"
                  f"{'recall':>8}  best single threshold"]
        for e in r.ranking:
            lines.append(f"  {e['column']:<15}{BETTER[e['better']]:<11}{e.get('n_mos', ''):>6}"
                         f"{_f(e.get('srcc')) if 'srcc' in e else '':>8}{_f(e.get('plcc')) if 'plcc' in e else '':>8}"
                         f"{e.get('n_accept', ''):>6}{_f(e.get('f1')) if 'f1' in e else '':>7}"
                         f"{_f(e.get('precision')) if 'precision' in e else '':>7}"
                         f"{_f(e.get('recall')) if 'recall' in e else '':>8}  {e.get('rule', '')}")
    if not any("srcc" in e for e in r.ranking):
        lines += ["", "No MOS in the labels: no correlations."]
    if r.decision is None:
        lines += ["", "No human accept/reject in the labels: no decision metrics, no threshold suggestion."]
        return lines
    t, fi, iq = r.thresholds, f"min_{r.fiqa}", f"min_{r.iqa}"
    lines += ["", f"CAFI decision against the human decision ({r.decision_rows} rows, {r.human_accepts} human "
                  f"accepts; accept is the positive class):",
              f"  {'thresholds':<34}{fi:>15}{iq:>15}{'accepted':>9}{'TP':>6}{'FP':>6}{'FN':>6}"
              f"{'precision':>10}{'recall':>8}{'F1':>7}"]

    def row(name: str, ms: float | None, md: float | None, c: dict) -> str:
        return (f"  {name:<34}{_thr(ms):>15}{_thr(md):>15}{c['accepted']:>9}{c['tp']:>6}{c['fp']:>6}{c['fn']:>6}"
                f"{_f(c['precision']):>10}{_f(c['recall']):>8}{_f(c['f1']):>7}")

    lines.append(row("this run (its accepted column)", t.get(fi), t.get(iq), r.decision))
    s = r.suggestion
    if s is None:
        if r.precision_target is not None:
            lines.append(f"  no {r.fiqa}/{r.iqa} threshold pair reaches precision {r.precision_target:g} on these "
                         "labels")
        else:
            lines.append("  no threshold pair accepts any human-accepted crop: nothing to suggest")
        return lines
    lines.append(row(f"suggested ({s.goal})"[:33], s.min_fiqa, s.min_iqa, s.confusion.as_dict()))
    if r.precision_target is not None:
        lines.append(f"  (the best recall among the threshold pairs reaching precision {r.precision_target:g})")
    lines += ["", "Suggested config (every other decision threshold stays as it is):",
              "decision:", f"  {fi}: {s.min_fiqa:g}", f"  {iq}: {'null' if s.min_iqa is None else f'{s.min_iqa:g}'}"]
    return lines


def format_edc(e: EdcSection) -> list[str]:
    r, o = e.result, e.result.options
    lines = [f"EDC (ISO/IEC 29794-1:2024): {e.listed:,} URIs in {e.file}, {e.found:,} in the manifest, "
             f"{e.embedded:,} with an embedding; {r.identities:,} identities, {r.mated:,} mated pairs"
             + (f", {r.nonmated:,} non-mated pairs" + (f" (seeded sample, seed {o.seed})" if r.nonmated_sampled
                                                       else " (all)") if o.start_fnmr is None else "")]
    if r.message:
        return lines + [f"  {r.message[0].upper()}{r.message[1:]}."]
    if o.start_fnmr is None:
        lines.append(f"  threshold: cosine similarity >= {r.threshold:.4f} (FMR {r.fmr:.2g} on the non-mated pairs, "
                     f"target {o.fmr:g}) -> starting FNMR {r.start_fnmr:.4f}")
        if r.nonmated * o.fmr < 10:
            lines.append(f"  note: {r.nonmated:,} non-mated pairs resolve an FMR of {o.fmr:g} with fewer than 10 "
                         "false matches; raise --nonmated for a steadier threshold")
    else:
        lines.append(f"  threshold: cosine similarity >= {r.threshold:.4f} (starting FNMR {r.start_fnmr:.4f}, "
                     f"target {o.start_fnmr:g})")
    if r.start_fnmr == 0:
        lines.append("  the starting FNMR is 0: there is no error to discard (every curve is flat at 0); "
                     "use --start-fnmr or a smaller --fmr")
    tgt = f"  threshold for FNMR <= {o.target_fnmr:g} (discarded)" if o.target_fnmr is not None else ""
    lines += [f"  pAUC up to {o.pauc_limit:.0%} discarded (lower is better; relative: 0 = ideal order, 1 = random "
              "order; pairs without a quality value go first):",
              f"  {'order':<15}{'better':<11}{'pAUC':>9}{'relative':>10}{'FNMR@' + f'{o.pauc_limit:.0%}':>10}"
              f"{'unrated':>9}{tgt}"]
    for row in e.pauc_rows():
        name = row["score"] if row["order"] == "score" else f"({row['order']})"
        target = ""
        if row["target"] is not None:
            t = row["target"]
            target = ("  not reached" if not t["reached"] else
                      f"  {t['rule'] + ' ' if t['rule'] else ''}({t['discard']:.1%} discarded)")
        lines.append(f"  {name:<15}{BETTER[row['better']]:<11}{row['pauc']:>9.5f}{_f(row['relative']):>10}"
                     f"{row['fnmr_at_limit']:>10.4f}{row['unrated_pairs'] if row['order'] == 'score' else '':>9}"
                     f"{target}")
    return lines


def format_result(r: Result) -> str:
    lines: list[str] = []
    if r.labels is not None:
        lines += format_labels(r.labels, r.source)
    if r.edc is not None:
        if lines:
            lines.append("")
        elif r.labels is None:
            lines.append(f"cafi eval: {r.source}")
        lines += format_edc(r.edc)
    return "\n".join(lines)
