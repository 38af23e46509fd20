"""Model version: a fingerprint of every checkpoint hash and every setting that changes a score.

Each stage also has its own fingerprint (its weights, its settings, and the stages it
reads from), so a later version can tell which earlier results are still valid.
"""

from __future__ import annotations

import hashlib
import json

from cafi.config import JobConfig
from cafi.models.registry import checkpoint

STAGES = ("detect", "parse", "serfiq", "dbcnn", "decide")


def stage_settings(cfg: JobConfig) -> dict[str, dict]:
    m = cfg.models
    det = checkpoint("detector", m.detector.arch, m.detector.weights)
    par = checkpoint("parser", m.parser.arch, m.parser.weights)
    rec = checkpoint("serfiq", "arcface_ir_se50", m.serfiq.weights)
    iqa = checkpoint("dbcnn", "dbcnn", m.dbcnn.weights)
    # Image limits decide which inputs are error rows; crop size and precision change every score.
    common = {"crop_size": cfg.image.crop_size, "precision": m.precision, "min_side": cfg.image.min_side,
              "max_pixels": cfg.image.max_pixels, "max_bytes": cfg.image.max_bytes}
    detect = {**common, "align": m.detector.align}
    if m.detector.align != "none":
        detect.update(arch=m.detector.arch, sha256=det.sha256, conf_threshold=m.detector.conf_threshold)
    return {
        "detect": detect,
        "parse": {**common, "arch": m.parser.arch, "sha256": par.sha256, "labels": list(m.parser.face_labels),
                  "fill": list(m.parser.fill), "input_size": m.parser.input_size},
        "serfiq": {"sha256": rec.sha256, "samples": m.serfiq.samples, "dropout": m.serfiq.dropout,
                   "seed": m.serfiq.seed},
        "dbcnn": {"sha256": iqa.sha256},
        # The SER-FIQ rescaling is applied at decision time: changing alpha or r runs no model.
        "decide": {"min_serfiq": cfg.decision.min_serfiq, "min_mask_fraction": cfg.decision.min_mask_fraction,
                   "min_dbcnn": cfg.decision.min_dbcnn, "alpha": m.serfiq.alpha, "r": m.serfiq.r},
    }


# What each stage's result depends on, besides its own settings.
UPSTREAM = {"detect": (), "parse": (), "serfiq": ("detect",), "dbcnn": ("parse",),
            "decide": ("detect", "parse", "serfiq", "dbcnn")}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    settings = stage_settings(cfg)
    out: dict[str, str] = {}
    for stage in STAGES:
        out[stage] = _digest({"stage": stage, "settings": settings[stage],
                              "upstream": {u: out[u] for u in UPSTREAM[stage]}})
    return out


def is_synthetic(cfg: JobConfig) -> bool:
    m = cfg.models
    return any(w is not None and w.synthetic for w in (m.detector.weights, m.parser.weights,
                                                        m.serfiq.weights, m.dbcnn.weights))


def model_version(cfg: JobConfig) -> str:
    """`v-<12 hex>`, or `synthetic-<12 hex>` when any checkpoint came from `cafi weights synth`."""
    prefix = "synthetic" if is_synthetic(cfg) else "v"
    return f"{prefix}-{stage_fingerprints(cfg)['decide']}"
