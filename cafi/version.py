"""Model version: a fingerprint of every checkpoint hash and every setting that changes a score.

Each stage also has its own fingerprint (its spec's settings, and the fingerprints of the stages whose
results it reads), so a later version can tell which earlier results are still valid: a new IQA
scorer re-runs that scorer only, new thresholds re-run nothing. The decision's fingerprint covers every
stage of the run; the model version is made from it.
"""

from __future__ import annotations

import hashlib
import json

from cafi.config import JobConfig
from cafi.stages.specs import DECIDE, embedding_source, specs_for, stage_columns


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def upstream(cfg: JobConfig) -> dict[str, tuple[str, ...]]:
    """Whose results each stage's results depend on: what it reads; the decision reads every stage."""
    model = specs_for(cfg)
    source = embedding_source(cfg)
    out = {s.name: s.upstream(cfg) + ((source,) if "embedding" in s.reads(cfg) and source else ()) for s in model}
    out["decide"] = tuple(out)
    return out


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    """Per stage of the run, in pipeline order (each after its upstream), with `decide` last."""
    ups = upstream(cfg)
    out: dict[str, str] = {}
    for s in [*specs_for(cfg), DECIDE]:
        settings = s.settings(cfg, stage_columns(s, cfg))
        own = {"stage": s.name, "settings": settings, "upstream": {u: out[u] for u in ups[s.name]}}
        out[s.name] = _digest(own)
    return out


def is_synthetic(cfg: JobConfig) -> bool:
    """Whether any checkpoint the run loads came from `cafi weights synth`."""
    sections = [s.resources(cfg) for s in specs_for(cfg)]
    return any(getattr(st, "weights", None) is not None and st.weights.synthetic for st in sections)


def model_version(cfg: JobConfig) -> str:
    """`v-<12 hex>`, or `synthetic-<12 hex>` when any checkpoint came from `cafi weights synth`."""
    prefix = "synthetic" if is_synthetic(cfg) else "v"
    return f"{prefix}-{stage_fingerprints(cfg)['decide']}"
