"""Thresholds for `cafi eval`: the best single-threshold filter on one quality column, the search for
the run's (min FIQA, min IQA) pair, and how a threshold is written (a short decimal, in the column's
own units and direction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cafi.columns import Column
from cafi.errors import CafiError
from cafi.eval_stats import Confusion, confusion

MAX_FIQA_CANDIDATES = 1024


def between(lower: float | None, upper: float, floor: float | None = None) -> float:
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
    t = between(below, float(v[ends[pick]]))
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
    min_iqa = None if not passes_s.any() else between(float(below[0]), lowest_kept_d)
    lower_s = s[s < ts]
    min_fiqa = between(float(lower_s.max()) if len(lower_s) else None, float(ts), floor=0.0)
    conf = confusion(accept_rule(fiqa, iqa, usable, min_fiqa, min_iqa), truth)
    # The rounded thresholds accept exactly the rows the search counted.
    found_tp = int(np.cumsum((s_sorted >= ts) & y_sorted)[ends[pick]])
    found_fp = int(np.cumsum((s_sorted >= ts) & ~y_sorted)[ends[pick]])
    if (conf.tp, conf.fp, conf.tp + conf.fn, conf.fp + conf.tn) != (found_tp, found_fp, positives, negatives):
        raise CafiError(f"internal: thresholds ({min_fiqa}, {min_iqa}) do not reproduce the search "
                        f"({conf} vs tp={found_tp} fp={found_fp})")
    goal = "max F1" if precision is None else f"precision >= {precision:g}"
    return Suggestion(*names, min_fiqa, min_iqa, conf, goal)
