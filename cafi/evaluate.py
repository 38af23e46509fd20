"""`cafi eval`: the scores and the CAFI decision of a run against human labels.

The labels are a CSV with a `uri` column and a human score (MOS, higher is better) and/or a
human accept/reject. Against the MOS: SRCC and PLCC of serfiq, dbcnn and cafi (each over the
rows where both are defined: cafi exists only for accepted rows). Against the human decision:
precision, recall and F1 of the CAFI decision ("accept" is the positive class), and the
SER-FIQ and DBCNN thresholds that maximise F1, or reach a requested precision with the best
recall, applying the decision rule of `cafi.stages.decide` with the run's mask-fraction
threshold left as it is.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import manifest
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.storage import filesystem

SCORES = ("serfiq", "dbcnn", "cafi")
TRUE_WORDS = {"1", "true", "t", "yes", "y", "accept", "accepted", "keep", "pass"}
FALSE_WORDS = {"0", "false", "f", "no", "n", "reject", "rejected", "drop", "fail"}
MANIFEST_COLUMNS = ["uri", "status", "serfiq", "dbcnn", "cafi", "mask_fraction", "accepted", "reject_reason"]
MAX_SERFIQ_CANDIDATES = 1024


# ---------------------------------------------------------------- statistics

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (as SRCC needs)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0       # ranks start+1 .. end, averaged
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def plcc(x, y) -> float:
    """Pearson's linear correlation; NaN where undefined (fewer than 2 rows, or a constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def srcc(x, y) -> float:
    """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    return plcc(_ranks(x), _ranks(y))


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

@dataclass
class Suggestion:
    min_serfiq: float
    min_dbcnn: float | None       # None: no DBCNN threshold is needed
    confusion: Confusion
    goal: str                      # "max F1" or "precision >= P"


def _between(lower: float | None, upper: float, floor: float | None = None) -> float:
    """A short decimal t with lower < t <= upper (in float32, as the decision compares), near the middle."""
    if lower is None:  # nothing below to exclude: the floor of the scale, else the value itself
        return float(floor) if floor is not None and floor <= upper else float(upper)
    hi32, lo32 = np.float32(upper), np.float32(lower)
    mid = (float(lower) + float(upper)) / 2.0
    for digits in range(1, 10):
        t = round(mid, digits)
        if lo32 < np.float32(t) <= hi32:
            return t
    return float(upper)


def accept_rule(serfiq, dbcnn, eligible, min_serfiq: float, min_dbcnn: float | None) -> np.ndarray:
    """The CAFI rule: eligible (scored, face mask large enough) and SER-FIQ and DBCNN at their minimums.
    Compares in float32, as `cafi.stages.decide` does on the float32 scores."""
    s = np.asarray(serfiq, np.float32)
    d = np.asarray(dbcnn, np.float32)
    with np.errstate(invalid="ignore"):
        ok = np.asarray(eligible, bool) & (s >= np.float32(min_serfiq))
        if min_dbcnn is not None:
            ok &= d >= np.float32(min_dbcnn)
    return ok


def suggest(serfiq, dbcnn, eligible, truth, precision: float | None = None) -> Suggestion | None:
    """The (min_serfiq, min_dbcnn) pair that maximises F1, or with `precision`, the pair with the best
    recall among those whose precision reaches it. None when no pair accepts a true positive (or
    reaches the precision). Exhaustive over DBCNN cut points, and over SER-FIQ cut points (or
    `MAX_SERFIQ_CANDIDATES` quantiles of them)."""
    serfiq = np.asarray(serfiq, np.float32)
    dbcnn = np.asarray(dbcnn, np.float32)
    truth = np.asarray(truth, bool)
    usable = np.asarray(eligible, bool) & np.isfinite(serfiq) & np.isfinite(dbcnn)
    positives = int(truth.sum())                         # every human accept: missed ones are FN
    negatives = int((~truth).sum())
    s, d, y = serfiq[usable], dbcnn[usable], truth[usable]
    if positives == 0 or len(s) == 0:
        return None
    order = np.argsort(-d, kind="mergesort")             # DBCNN high to low
    d_sorted, y_sorted = d[order], y[order]
    # The last index of each run of equal DBCNN values: accepting "dbcnn >= d_sorted[end]" keeps 0..end.
    ends = np.flatnonzero(np.r_[d_sorted[1:] != d_sorted[:-1], True])
    cuts = np.unique(s)[::-1]                            # SER-FIQ cut points, high to low
    if len(cuts) > MAX_SERFIQ_CANDIDATES:
        cuts = np.unique(np.quantile(s, np.linspace(0, 1, MAX_SERFIQ_CANDIDATES), method="lower"))[::-1]
    best, best_key = None, None
    for ts in cuts:
        keep = (s[order] >= ts)
        tp = np.cumsum(keep & y_sorted)[ends]
        fp = np.cumsum(keep & ~y_sorted)[ends]
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
        idx = np.flatnonzero(ok)
        # lexicographic max: first key, then the next ones (higher thresholds win exact ties)
        pick = idx[np.lexsort(tuple(k[idx] for k in reversed(key_cols)))[-1]]
        key = tuple(float(k[pick]) for k in key_cols)
        if best_key is None or key > best_key:
            best_key, best = key, (float(ts), int(pick))
    if best is None:
        return None
    ts, pick = best
    lowest_kept_d = float(d_sorted[ends[pick]])
    below = d_sorted[ends[pick] + 1:] if ends[pick] + 1 < len(d_sorted) else np.zeros(0, np.float32)
    # rows with dbcnn below the cut that would pass SER-FIQ: if none, no DBCNN threshold is needed
    passes_s = (s[order] >= ts)[ends[pick] + 1:]
    min_dbcnn = None if not passes_s.any() else _between(float(below[0]), lowest_kept_d)
    lower_s = s[s < ts]
    min_serfiq = _between(float(lower_s.max()) if len(lower_s) else None, ts, floor=0.0)
    pred = accept_rule(serfiq, dbcnn, usable, min_serfiq, min_dbcnn)
    conf = confusion(pred, truth)
    # The rounded thresholds accept exactly the rows the search counted.
    found_tp = int(np.cumsum((s[order] >= ts) & y_sorted)[ends[pick]])
    found_fp = int(np.cumsum((s[order] >= ts) & ~y_sorted)[ends[pick]])
    if (conf.tp, conf.fp, conf.tp + conf.fn, conf.fp + conf.tn) != (found_tp, found_fp, positives, negatives):
        raise CafiError(f"internal: thresholds ({min_serfiq}, {min_dbcnn}) do not reproduce the search "
                        f"({conf} vs tp={found_tp} fp={found_fp})")
    goal = "max F1" if precision is None else f"precision >= {precision:g}"
    return Suggestion(min_serfiq, min_dbcnn, conf, goal)


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


def read_labels(uri: str, storage: StorageConfig | None = None, mos_column: str = "mos",
                accept_column: str = "accept") -> pa.Table:
    """The labels CSV as a table: uri, mos (float64, may be null), accept (bool, may be null)."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise CafiError(f"labels: {uri} does not exist")
    with fs.open(path, "rb") as fh:
        text = fh.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    if "uri" not in cols:
        raise CafiError(f"labels: {uri} has no 'uri' column (columns: {cols})")
    has_mos, has_accept = mos_column in cols, accept_column in cols
    if not (has_mos or has_accept):
        raise CafiError(f"labels: {uri} needs a {mos_column!r} and/or an {accept_column!r} column "
                        f"(columns: {cols})")
    uris, mos, accept, seen = [], [], [], {}
    for line, row in enumerate(reader, start=2):
        where = f"labels {uri} line {line}"
        u = (row.get("uri") or "").strip()
        if not u:
            raise CafiError(f"{where}: empty uri")
        if u in seen:
            raise CafiError(f"{where}: uri {u} is labelled twice (first on line {seen[u]})")
        seen[u] = line
        uris.append(u)
        m = (row.get(mos_column) or "").strip() if has_mos else ""
        try:
            mos.append(float(m) if m else None)
        except ValueError:
            raise CafiError(f"{where}: {mos_column} {m!r} is not a number") from None
        if mos[-1] is not None and not math.isfinite(mos[-1]):
            raise CafiError(f"{where}: {mos_column} {m!r} is not a finite number")
        accept.append(_parse_accept(row.get(accept_column) or "", where) if has_accept else None)
    if not uris:
        raise CafiError(f"labels: {uri} has no rows")
    return pa.table({"uri": pa.array(uris, pa.string()), "mos": pa.array(mos, pa.float64()),
                     "accept": pa.array(accept, pa.bool_())})


@dataclass
class Scores:
    table: pa.Table            # MANIFEST_COLUMNS, one row per URI
    source: str                # what was read, for the printout
    summary: dict              # the run summary the decision config comes from ({} if none)


def read_scores(uri: str, storage: StorageConfig | None = None, uris: pa.Array | None = None) -> Scores:
    """A run's rows (`<output>/runs/<run_id>`) or an output root's latest committed version."""
    from cafi.report import resolve_run

    ref = resolve_run(uri, storage)
    if ref.uri.rstrip("/") != uri.rstrip("/"):  # an output root: every committed run of the latest version
        table = manifest.read(uri, storage=storage, columns=MANIFEST_COLUMNS)
        version = ref.summary.get("model_version")
        runs = [r["run_id"] for r in manifest.committed_runs(uri, storage) if r.get("model_version") == version]
        source = f"{uri}: model version {version}, {len(runs)} committed run(s)"
        return Scores(table, source, ref.summary)
    from cafi.report import run_ids

    flt = pc.field("run_id").isin(run_ids(ref))
    if ref.summary.get("model_version"):
        flt = flt & (pc.field("model_version") == ref.summary["model_version"])
    if uris is not None:
        flt = flt & pc.field("uri").isin(uris)
    table = manifest.dataset(ref.output, storage).to_table(columns=MANIFEST_COLUMNS, filter=flt)
    return Scores(table, f"run {ref.run_id} (model version {ref.summary.get('model_version')})", ref.summary)


# ---------------------------------------------------------------- evaluation

@dataclass
class Result:
    source: str
    labels: int
    matched: int
    unmatched_examples: list[str]
    correlations: dict[str, dict] = field(default_factory=dict)   # score -> n, srcc, plcc
    decision: dict | None = None                                   # confusion of the CAFI decision
    human_accepts: int = 0
    decision_rows: int = 0
    thresholds: dict = field(default_factory=dict)                 # the run's decision config
    suggestion: Suggestion | None = None
    precision_target: float | None = None

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("source", "labels", "matched", "unmatched_examples", "correlations",
                                             "decision", "human_accepts", "decision_rows", "thresholds",
                                             "precision_target")}
        s = self.suggestion
        out["suggestion"] = None if s is None else {"min_serfiq": s.min_serfiq, "min_dbcnn": s.min_dbcnn,
                                                    "goal": s.goal, **s.confusion.as_dict()}
        return out


def _floats(table: pa.Table, col: str) -> np.ndarray:
    return pc.fill_null(table[col], float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def evaluate(manifest_uri: str, labels_uri: str, storage: StorageConfig | None = None,
             precision: float | None = None, mos_column: str = "mos", accept_column: str = "accept") -> Result:
    if precision is not None and not 0.0 < precision <= 1.0:
        raise CafiError(f"--precision {precision} is not in (0, 1]")
    storage = storage if storage is not None else StorageConfig()  # endpoint and region from the environment
    labels = read_labels(labels_uri, storage, mos_column, accept_column)
    scores = read_scores(manifest_uri, storage, labels["uri"])
    joined = labels.join(scores.table, keys="uri", join_type="inner")
    matched_uris = set(joined["uri"].to_pylist())
    unmatched = [u for u in labels["uri"].to_pylist() if u not in matched_uris]
    if joined.num_rows == 0:
        raise CafiError(f"none of the {labels.num_rows} labelled URIs is in {scores.source} "
                        f"(first label: {labels['uri'][0].as_py()})")
    from cafi.report import decision_config

    dec = decision_config(scores.summary)
    result = Result(scores.source, labels.num_rows, joined.num_rows, unmatched[:5],
                    thresholds={"min_serfiq": dec.min_serfiq, "min_mask_fraction": dec.min_mask_fraction,
                                "min_dbcnn": dec.min_dbcnn}, precision_target=precision)
    mos = _floats(joined, "mos")
    if np.isfinite(mos).any():
        for col in SCORES:
            v = _floats(joined, col)
            ok = np.isfinite(v) & np.isfinite(mos)
            result.correlations[col] = {"n": int(ok.sum()), "srcc": srcc(v[ok], mos[ok]),
                                        "plcc": plcc(v[ok], mos[ok])}
    has = pc.is_valid(joined["accept"]).to_numpy(zero_copy_only=False)
    if has.any():
        truth = joined["accept"].to_numpy(zero_copy_only=False)[has].astype(bool)
        sub = joined.filter(pa.array(has))
        pred = pc.fill_null(sub["accepted"], False).to_numpy(zero_copy_only=False).astype(bool)
        result.decision = confusion(pred, truth).as_dict()
        result.human_accepts, result.decision_rows = int(truth.sum()), int(len(truth))
        status = sub["status"].to_numpy(zero_copy_only=False).astype(object)
        frac = _floats(sub, "mask_fraction")
        with np.errstate(invalid="ignore"):
            eligible = (status == "scored") & (frac.astype(np.float32) >= np.float32(dec.min_mask_fraction))
        result.suggestion = suggest(_floats(sub, "serfiq"), _floats(sub, "dbcnn"), eligible, truth, precision)
    return result


# ---------------------------------------------------------------- printing

def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _thr(x: float | None) -> str:
    return "none" if x is None else f"{x:g}"


def format_result(r: Result) -> str:
    lines = [f"cafi eval: {r.matched} of {r.labels} labelled URIs found in {r.source}"]
    if r.unmatched_examples:
        lines.append(f"  {r.labels - r.matched} labelled URIs are not in the manifest, e.g. "
                     + ", ".join(r.unmatched_examples[:3]))
    if r.correlations:
        lines += ["", "Scores against the MOS (rows where both are defined; PLCC without a logistic mapping):",
                  f"  {'score':<8}{'n':>8}{'SRCC':>9}{'PLCC':>9}"]
        for col, c in r.correlations.items():
            lines.append(f"  {col:<8}{c['n']:>8}{_f(c['srcc']):>9}{_f(c['plcc']):>9}")
    else:
        lines += ["", "No MOS in the labels: no correlations."]
    if r.decision is None:
        lines += ["", "No human accept/reject in the labels: no decision metrics, no threshold suggestion."]
        return "\n".join(lines)
    t = r.thresholds
    lines += ["", f"CAFI decision against the human decision ({r.decision_rows} rows, {r.human_accepts} human "
                  f"accepts; accept is the positive class):",
              f"  {'thresholds':<34}{'min_serfiq':>11}{'min_dbcnn':>10}{'accepted':>9}{'TP':>6}{'FP':>6}{'FN':>6}"
              f"{'precision':>10}{'recall':>8}{'F1':>7}"]

    def row(name: str, ms: float, md: float | None, c: dict) -> str:
        return (f"  {name:<34}{_thr(ms):>11}{_thr(md):>10}{c['accepted']:>9}{c['tp']:>6}{c['fp']:>6}{c['fn']:>6}"
                f"{_f(c['precision']):>10}{_f(c['recall']):>8}{_f(c['f1']):>7}")

    lines.append(row("this run (its accepted column)", t["min_serfiq"], t["min_dbcnn"], r.decision))
    s = r.suggestion
    if s is None:
        if r.precision_target is not None:
            lines.append(f"  no SER-FIQ/DBCNN threshold pair reaches precision {r.precision_target:g} on these "
                         "labels")
        else:
            lines.append("  no threshold pair accepts any human-accepted crop: nothing to suggest")
        return "\n".join(lines)
    lines.append(row(f"suggested ({s.goal})"[:33], s.min_serfiq, s.min_dbcnn, s.confusion.as_dict()))
    if r.precision_target is not None:
        lines.append(f"  (the best recall among the threshold pairs reaching precision {r.precision_target:g})")
    lines += ["", f"Suggested config (decision.min_mask_fraction stays {t['min_mask_fraction']:g}):",
              "decision:", f"  min_serfiq: {s.min_serfiq:g}",
              f"  min_dbcnn: {'null' if s.min_dbcnn is None else f'{s.min_dbcnn:g}'}"]
    return "\n".join(lines)
