"""The statistics `cafi eval` reports: correlations against a MOS and the confusion counts of a
keep/drop decision against the human one ("accept" is the positive class)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats


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

