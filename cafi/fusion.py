"""The fused score: one number from several quality columns, as the seed blog planned (a general IQA
score plus a face-quality score that also falls with head angle, summed).

    fused = sum_c w_c * unit_c(value_c) / sum_c w_c

over `decision.fusion.weights` (column -> weight >= 0). Each column is first mapped onto [0, 1], 1 =
best, by its range (cafi.columns.Column.unit_interval): the documented `span` of cafi/columns.py, or
the one `decision.fusion.ranges` names (required for columns without a documented range). Weights are
relative (divided by their sum), so a single weight gives that column's mapped value. A row missing
any weighted column has no fused score (null), which `decision.min_fused` never accepts.

Computed in the decide step from stored columns: new weights or ranges are a threshold-only re-score.
No torch and no config import here (cafi/config.py calls `check`).
"""

from __future__ import annotations

import math

import numpy as np

from cafi.columns import BY_NAME, QUALITY, Column
from cafi.errors import ConfigError

# Columns the decision itself writes: a fusion cannot read them (they do not exist before it runs).
DECISION_COLUMNS = ("cafi", "fused")
FUSABLE: tuple[str, ...] = tuple(c.name for c in QUALITY if c.name not in DECISION_COLUMNS)


def span_of(name: str, ranges: dict) -> tuple[float, float] | None:
    """The range a column is mapped by: decision.fusion.ranges first, else the documented span."""
    if name in ranges:
        lo, hi = ranges[name]
        return float(lo), float(hi)
    return BY_NAME[name].span


def fused(cols: dict, weights: dict, ranges: dict, n: int) -> np.ndarray:
    """Per row, the weighted mean of the mapped columns (NaN where any weighted column is missing).
    All NaN when no weights are set."""
    total = sum(float(w) for w in weights.values())
    if not weights or total <= 0:
        return np.full(n, np.nan)
    out = np.zeros(n)
    for name, w in weights.items():
        col: Column = BY_NAME[name]
        values = cols.get(name)
        values = np.full(n, np.nan) if values is None else np.asarray(values, dtype=np.float64)
        out += float(w) * col.unit_interval(values, span_of(name, ranges))
    return out / total


def check(decision) -> None:
    """decision.fusion and decision.min_fused: known columns, weights >= 0 summing above 0, a range for
    each weighted column, ranges low < high. `decision` is a cafi.config.DecisionConfig."""
    weights, ranges = decision.fusion.weights, decision.fusion.ranges
    for name, w in weights.items():
        key = f"decision.fusion.weights.{name}"
        if name not in FUSABLE:
            raise ConfigError(f"{key}: {name!r} is not a quality column a fusion can read; expected one of "
                              f"{', '.join(FUSABLE)}")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"{key}: {w!r} is not allowed; expected a finite weight >= 0")
        if span_of(name, ranges) is None:
            raise ConfigError(f"{key}: {name} has no documented range (cafi/columns.py: {BY_NAME[name].unit}); "
                              f"name one as decision.fusion.ranges.{name}: [low, high]")
    if weights and not sum(weights.values()) > 0:
        raise ConfigError("decision.fusion.weights: every weight is 0; expected at least one above 0")
    for name, pair in ranges.items():
        key = f"decision.fusion.ranges.{name}"
        if name not in FUSABLE:
            raise ConfigError(f"{key}: {name!r} is not a quality column a fusion can read")
        ok = len(pair) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
        if not ok or not pair[0] < pair[1] or (BY_NAME[name].better == "abs_lower" and pair[1] <= 0):
            raise ConfigError(f"{key}: {list(pair)!r} is not allowed; expected [low, high] with low < high")
    if decision.min_fused is not None:
        if not weights:
            raise ConfigError("decision.min_fused: set, but decision.fusion.weights is empty (nothing to fuse)")
        if not 0.0 <= decision.min_fused <= 1.0:
            raise ConfigError(f"decision.min_fused: {decision.min_fused!r} is not allowed; expected a number in "
                              "[0, 1]")


def settings(decision) -> dict:
    """What the fused score depends on, for the decision's fingerprint; empty when no fusion is set, so
    every model version made before fusion existed keeps its name."""
    f = decision.fusion
    if not f.weights:
        return {}
    return {"fusion": {"weights": dict(f.weights), "ranges": {k: list(v) for k, v in f.ranges.items()}}}
