"""The CAFI decision: keep, or reject with a reason (as a datatrove filter would), from scores only.

No model and no torch here: a threshold-only re-score runs just this.
"""

from __future__ import annotations

import numpy as np

from cafi.config import DecisionConfig

OK, SCORED, NO_FACE, ERROR = "ok", "scored", "no_face", "error"


def rescale_serfiq(raw: np.ndarray, alpha: float, r: float) -> np.ndarray:
    """The SER-FIQ reference code's spread of the raw quality: 1/(1+exp(-alpha*(q-r)))."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-alpha * (np.asarray(raw, dtype=np.float64) - r)))).astype(np.float32)


def reject_reasons(status: np.ndarray, serfiq: np.ndarray, mask_fraction: np.ndarray, dbcnn: np.ndarray,
                   cfg: DecisionConfig) -> np.ndarray:
    """Per row: None (accepted) or the first reason to reject, in order of precedence."""
    reason = np.full(len(status), None, dtype=object)
    reason[status == ERROR] = "error"
    reason[status == NO_FACE] = "no_face"
    # "not >=" so that a NaN score (a degenerate model output) is rejected, never accepted.
    with np.errstate(invalid="ignore"):
        checks = [(~(serfiq >= cfg.min_serfiq), "unrecognisable"),
                  (~(mask_fraction >= cfg.min_mask_fraction), "face_too_small"),
                  (~(dbcnn >= cfg.min_dbcnn) if cfg.min_dbcnn is not None else ~np.isfinite(dbcnn), "low_quality")]
    live = status == OK
    for failed, why in checks:
        reason[live & failed & (reason == None)] = why  # noqa: E711 - elementwise on an object array
    return reason
