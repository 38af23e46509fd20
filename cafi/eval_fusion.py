"""`cafi eval LABELS.csv --fit-fusion`: non-negative weights for the fused score (cafi/fusion.py) fitted
to the labels over the run's quality columns, printed as the config block that applies them.

The columns: every one a fusion can read (cafi.fusion.FUSABLE) that has a range (documented, or named
in the run's decision.fusion.ranges), a value on at least `COVERAGE` of the labelled rows and more
than one distinct value; the rows: those with every such column. Each column is mapped onto [0, 1]
as the decide step maps it.

The fit: non-negative least squares (scipy.optimize.nnls) of the centred target on the centred mapped
columns, so the intercept a weighted mean cannot carry is absorbed; the target is the MOS when the
labels have one (the fused score's rank agreement with it: SRCC), else the human accept (1/0; then the
F1 of the fused score's best single threshold, which becomes decision.min_fused). With both, the
weights come from the MOS and the threshold from the accepts. Weights are printed normalised to sum 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from scipy.optimize import nnls

from cafi import fusion
from cafi.columns import BY_NAME
from cafi.eval_rows import floats
from cafi.eval_stats import srcc
from cafi.eval_thresholds import best_filter

COVERAGE = 0.9  # a column missing on more labelled rows than this leaves is not fitted (it would drop rows)
MIN_ROWS = 10
MIN_WEIGHT = 1e-3  # of the normalised weights


@dataclass
class FusionFit:
    columns: list[str]                 # the columns the fit could use
    rows: int                          # labelled rows with every one of them
    target: str                        # "mos" or "accept"
    weights: dict[str, float]          # non-zero weights, normalised to sum 1, largest first
    min_fused: float | None            # the best-F1 threshold of the fused score (accept labels)
    srcc: float | None                 # fused score against the MOS
    f1: float | None                   # fused score's best threshold against the accepts
    best_single: dict                  # the best single column on the same rows: {column, srcc | f1}
    ranges: dict[str, list[float]]     # ranges from the run's config the fit used (kept in the block)

    def as_dict(self) -> dict:
        return asdict(self)

    def config_block(self) -> str:
        """The YAML that applies the fit (`--config` it, or merge it into the job's config)."""
        lines = ["decision:"]
        if self.min_fused is not None:
            lines.append(f"  min_fused: {self.min_fused:.4g}")
        lines += ["  fusion:", "    weights:"] + [f"      {c}: {w:.4g}" for c, w in self.weights.items()]
        if self.ranges:
            lines += ["    ranges:"] + [f"      {c}: [{lo:g}, {hi:g}]" for c, (lo, hi) in self.ranges.items()]
        return "\n".join(lines)


def candidates(table: pa.Table, ranges: dict, labelled: np.ndarray) -> dict[str, np.ndarray]:
    """Column -> values mapped onto [0, 1], for the columns the fit may use (module docstring)."""
    out = {}
    for name in fusion.FUSABLE:
        span = fusion.span_of(name, ranges)
        if name not in table.column_names or span is None:
            continue
        mapped = BY_NAME[name].unit_interval(floats(table, name), span)[labelled]
        ok = np.isfinite(mapped)
        if ok.mean() >= COVERAGE and len(np.unique(mapped[ok])) > 1:
            out[name] = mapped
    return out


def _nnls_weights(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc, yc = x - x.mean(axis=0), y - y.mean()
    scale = xc.std(axis=0)
    w, _ = nnls(xc / scale, yc)  # on standardised columns: the solver's conditioning; undone below
    return w / scale


def fit(table: pa.Table, mos: np.ndarray, truth: np.ndarray | None, ranges: dict) -> FusionFit | None:
    """Fit over the joined labelled rows (`mos`: NaN where absent; `truth`: 1/0, -1 where absent).
    None when fewer than MIN_ROWS rows or fewer than two columns can be used."""
    has_mos = np.isfinite(mos)
    has_acc = truth >= 0 if truth is not None else np.zeros(len(mos), bool)
    target = "mos" if has_mos.sum() >= MIN_ROWS else "accept" if has_acc.sum() >= MIN_ROWS else None
    if target is None:
        return None
    labelled = has_mos | has_acc
    cols = candidates(table, ranges, labelled)
    if len(cols) < 2:
        return None
    x = np.column_stack(list(cols.values()))
    complete = np.isfinite(x).all(axis=1)
    m, a = mos[labelled][complete], (truth[labelled][complete] if truth is not None else None)
    x = x[complete]
    use = np.isfinite(m) if target == "mos" else a >= 0
    if use.sum() < MIN_ROWS:
        return None
    y = m[use] if target == "mos" else a[use].astype(np.float64)
    w = _nnls_weights(x[use], y)
    if not w.sum() > 0:
        return None
    w = w / w.sum()
    w = np.where(w >= MIN_WEIGHT, w, 0.0)  # solver dust: a weight that changes no rank is not printed
    w = w / w.sum()
    names = list(cols)
    weights = {names[i]: float(w[i]) for i in np.argsort(-w) if w[i] > 0}
    score = x @ w
    res = FusionFit(columns=names, rows=int(len(x)), target=target, weights=weights, min_fused=None, srcc=None,
                    f1=None, best_single={}, ranges={k: list(ranges[k]) for k in weights if k in ranges})
    if target == "mos":
        res.srcc = srcc(score[use], m[use])
        best = max(names, key=lambda c: srcc(cols[c][complete][use], m[use]))
        res.best_single = {"column": best, "srcc": srcc(cols[best][complete][use], m[use])}
    acc = a >= 0 if a is not None else None
    if acc is not None and acc.sum() >= MIN_ROWS and a[acc].any():
        truth_b = a[acc].astype(bool)
        f = best_filter(score[acc], truth_b)
        res.min_fused, res.f1 = float(np.clip(f.threshold, 0.0, 1.0)), f.confusion.f1
        if target == "accept":
            singles = {c: best_filter(cols[c][complete][acc], truth_b) for c in names}
            best = max(names, key=lambda c: singles[c].confusion.f1)
            res.best_single = {"column": best, "f1": singles[best].confusion.f1}
    return res
