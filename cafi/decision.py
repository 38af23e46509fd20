"""The CAFI decision: keep, or reject with a reason (as a datatrove filter would), from scores only.

No model and no torch here: a threshold-only re-score runs just this. Rules are checked in the
order of `REASONS`; a row gets the first reason whose rule fails. Every rule but the FIQA one
(`unrecognisable`) and the mask one (`face_too_small`) is off until its threshold is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cafi.config import DecisionConfig

OK, SCORED, NO_FACE, ERROR = "ok", "scored", "no_face", "error"

# Precedence, first to last: what a row could not be, then the causes a curator can act on
# (pose, source resolution) before the symptoms they produce (unrecognisable, blur, low quality).
# The fused score (cafi/fusion.py) sums those symptoms, so its rule comes last.
REASONS = ("error", "no_face", "pose", "low_resolution", "unrecognisable", "face_too_small", "blur", "exposure",
           "low_quality", "low_fused")


def rescale_serfiq(raw: np.ndarray, alpha: float, r: float) -> np.ndarray:
    """The SER-FIQ reference code's spread of the raw quality: 1/(1+exp(-alpha*(q-r)))."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-alpha * (np.asarray(raw, dtype=np.float64) - r)))).astype(np.float32)


# OFIQ's Unified Quality Score sigmoid (BSI-OFIQ/OFIQ-Project data/ofiq_config.jaxn
# "UnifiedQualityScore": h 100, x0 23.0, w 2.6, rounded), applied to a MagFace norm.
OFIQ_H, OFIQ_X0, OFIQ_W = 100.0, 23.0, 2.6


def ofiq_unified_quality(norm: np.ndarray, round_to_int: bool = True) -> np.ndarray:
    """OFIQ's Unified Quality Score from a MagFace norm: h / (1 + exp((x0 - norm) / w)), rounded half
    away from zero (C++ std::round; the score is never negative) and clamped to [0, 100]."""
    with np.errstate(over="ignore"):
        q = OFIQ_H / (1.0 + np.exp((OFIQ_X0 - np.asarray(norm, dtype=np.float64)) / OFIQ_W))
    if round_to_int:
        q = np.floor(q + 0.5)
    return np.clip(q, 0.0, 100.0)


@dataclass(frozen=True)
class ScoreRule:
    """The FIQA or IQA rule of a run: the score column the decision reads and its minimum (None: off).
    cafi.stages.specs.score_rules makes them from the run's scorer kinds."""

    column: str
    minimum: float | None


def _below(values: np.ndarray, minimum: float | None) -> np.ndarray | None:
    """Rows failing `value >= minimum` ("not >=": a NaN fails, it is never accepted); None: rule off."""
    if minimum is None:
        return None
    with np.errstate(invalid="ignore"):
        return ~(np.asarray(values, dtype=np.float64) >= minimum)


def _above(values: np.ndarray, maximum: float | None) -> np.ndarray | None:
    if maximum is None:
        return None
    with np.errstate(invalid="ignore"):
        return ~(np.asarray(values, dtype=np.float64) <= maximum)


def _any(*failed: np.ndarray | None) -> np.ndarray | None:
    on = [f for f in failed if f is not None]
    return np.logical_or.reduce(on) if on else None


def rule_failures(cols: dict[str, np.ndarray], cfg: DecisionConfig, fiqa: ScoreRule,
                  iqa: ScoreRule) -> dict[str, np.ndarray | None]:
    """reason -> rows that fail its rule (None where the rule is off). `fiqa` and `iqa` are the score
    rules of the scorers the decision uses (models.fiqa.kind, models.iqa.kind); `fused` is among `cols`
    where decision.min_fused is set (cafi/fusion.py)."""
    nan = np.full(len(cols["status"]), np.nan)
    col = lambda name: cols.get(name, nan)  # noqa: E731 - a column this run did not compute is NaN
    with np.errstate(invalid="ignore"):
        return {
            "pose": _any(_above(np.abs(col("yaw")), cfg.max_yaw), _above(np.abs(col("pitch")), cfg.max_pitch)),
            "low_resolution": _below(col("inter_eye_px"), cfg.min_inter_eye_px),
            "unrecognisable": _below(col(fiqa.column), fiqa.minimum),
            "face_too_small": _below(col("mask_fraction"), cfg.min_mask_fraction),
            "blur": _below(col("sharpness"), cfg.min_sharpness),
            "exposure": _any(_below(col("luma_mean"), cfg.min_luma_mean), _above(col("luma_mean"), cfg.max_luma_mean),
                             _above(col("under_exposed"), cfg.max_under_exposed),
                             _above(col("over_exposed"), cfg.max_over_exposed)),
            # Without a threshold a scored row still needs a finite IQA score (a NaN is a model fault).
            "low_quality": _below(col(iqa.column), iqa.minimum) if iqa.minimum is not None
            else ~np.isfinite(col(iqa.column)),
            "low_fused": _below(col("fused"), cfg.min_fused),
        }


def reject_reasons(cols: dict[str, np.ndarray], cfg: DecisionConfig, fiqa: ScoreRule,
                   iqa: ScoreRule) -> np.ndarray:
    """Per row: None (accepted) or the first reason to reject, in the order of REASONS.
    `cols` holds `status` and the score and component columns by manifest name."""
    status = np.asarray(cols["status"], dtype=object)
    reason = np.full(len(status), None, dtype=object)
    reason[status == ERROR] = "error"
    reason[status == NO_FACE] = "no_face"
    live = status == OK
    for why, failed in rule_failures(cols, cfg, fiqa, iqa).items():
        if failed is not None:
            reason[live & failed & (reason == None)] = why  # noqa: E711 - elementwise on an object array
    return reason
