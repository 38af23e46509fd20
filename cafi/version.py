"""Model version: a fingerprint of every checkpoint hash and every setting that changes a score.

Each stage also has its own fingerprint (its weights, its settings, and those of the stages whose
results it reads), so a later version can tell which earlier results are still valid: a new IQA
scorer re-runs that scorer only, new thresholds re-run nothing.
"""

from __future__ import annotations

import hashlib
import json

from cafi.config import JobConfig
from cafi.models.registry import SCORER_ARCHS, checkpoint
from cafi.stages.registry import fiqa_kinds, iqa_kinds


def _components_version() -> str:
    from cafi.components import DEFINITION_VERSION

    return DEFINITION_VERSION


def stage_settings(cfg: JobConfig) -> dict[str, dict]:
    """Per stage, everything its results depend on besides its upstream stages; in dependency order,
    with `decide` last."""
    m = cfg.models
    # Image limits decide which inputs are error rows; crop size and precision change every score.
    common = {"crop_size": cfg.image.crop_size, "precision": m.precision, "min_side": cfg.image.min_side,
              "max_pixels": cfg.image.max_pixels, "max_bytes": cfg.image.max_bytes}
    detect = {**common, "align": m.detector.align}
    if m.detector.align != "none":
        det = checkpoint("detector", m.detector.arch, m.detector.weights)
        detect.update(arch=m.detector.arch, sha256=det.sha256, conf_threshold=m.detector.conf_threshold)
    par = checkpoint("parser", m.parser.arch, m.parser.weights)
    out = {
        "detect": detect,
        "parse": {**common, "arch": m.parser.arch, "sha256": par.sha256, "labels": list(m.parser.face_labels),
                  "input_size": m.parser.input_size},
        "components": {"definitions": _components_version()},
    }
    for kind in fiqa_kinds(cfg):
        out[kind] = fiqa_settings(cfg, kind)
    for kind in iqa_kinds(cfg):
        out[kind] = iqa_settings(cfg, kind)
    # Score mappings (SER-FIQ's alpha and r) and thresholds apply at decision time: they run no model.
    out["decide"] = {"decision": {k: v for k, v in vars(cfg.decision).items()}, "fiqa": m.fiqa.kind,
                     "iqa": m.iqa.kind, "serfiq_alpha": m.serfiq.alpha, "serfiq_r": m.serfiq.r,
                     "magface_ofiq_mapping": m.magface.ofiq_mapping}
    return out


def fiqa_settings(cfg: JobConfig, kind: str) -> dict:
    m = cfg.models
    from cafi.stages.fiqa import writes_embedding

    sha = checkpoint(kind, SCORER_ARCHS[kind], getattr(m, kind).weights).sha256
    out = {"sha256": sha, "embeddings": writes_embedding(cfg, kind)}
    if kind == "serfiq":
        out.update(samples=m.serfiq.samples, dropout=m.serfiq.dropout, seed=m.serfiq.seed)
    return out


def iqa_settings(cfg: JobConfig, kind: str) -> dict:
    m = cfg.models
    st = getattr(m, kind)
    return {"sha256": checkpoint(kind, SCORER_ARCHS[kind], st.weights).sha256, "masked": st.masked,
            "fill": list(m.parser.fill) if st.masked else None}


def upstream(cfg: JobConfig) -> dict[str, tuple[str, ...]]:
    """Whose results each stage's results depend on."""
    out: dict[str, tuple[str, ...]] = {"detect": (), "parse": (), "components": ("detect", "parse")}
    for kind in fiqa_kinds(cfg):
        out[kind] = ("detect",)
    for kind in iqa_kinds(cfg):
        aligned = ("detect",) if kind == "topiq_face" else ()  # TOPIQ-face aligns from the landmarks
        out[kind] = (*aligned, *(("parse",) if getattr(cfg.models, kind).masked else ()))
    out["decide"] = tuple(out)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    settings, ups = stage_settings(cfg), upstream(cfg)
    out: dict[str, str] = {}
    for stage, own in settings.items():
        out[stage] = _digest({"stage": stage, "settings": own, "upstream": {u: out[u] for u in ups[stage]}})
    return out


def is_synthetic(cfg: JobConfig) -> bool:
    """Whether any checkpoint the run loads came from `cafi weights synth`."""
    m = cfg.models
    used = [m.detector, m.parser, *(getattr(m, k) for k in [*fiqa_kinds(cfg), *iqa_kinds(cfg)])]
    return any(st.weights is not None and st.weights.synthetic for st in used)


def model_version(cfg: JobConfig) -> str:
    """`v-<12 hex>`, or `synthetic-<12 hex>` when any checkpoint came from `cafi weights synth`."""
    prefix = "synthetic" if is_synthetic(cfg) else "v"
    return f"{prefix}-{stage_fingerprints(cfg)['decide']}"
