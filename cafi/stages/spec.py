"""A stage spec: the one declaration of a pipeline stage, and the only place that names it.

Each stage module (cafi/stages/<name>.py) declares `SPEC = StageSpec(...)` beside its class. Everything
that lists stages iterates over the specs (cafi/stages/specs.py): fingerprints and upstream links
(cafi/version.py), reuse (cafi/reuse.py), actor grouping and pool sizes (cafi/pipeline.py,
cafi/autoscale.py), preflight, the decide step, the report, `cafi weights synth` and the scorer-kind
checks. Adding a scorer is its architecture file, its stage file with its spec, its published
checkpoint record, its config section and its docs. A stage module imports this module, never the
registry (cafi/stages/specs.py), which imports the stage modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Families in pipeline order: detection, then the FIQA scorers (on the aligned original face), then
# parsing and the components (which read the mask), then the IQA scorers, then the decision.
FAMILIES = ("detect", "fiqa", "parse", "components", "iqa", "decide")
# What a stage reads besides the batch's own columns, and which stage makes it. `embedding`: the run's
# recognition embedding, made by the run's embedding source (cafi/stages/specs.py embedding_source; the
# model version adds that stage upstream of its readers: cafi/version.py).
READS = {"crop": None, "landmarks": "detect", "aligned": "detect", "mask": "parse", "embedding": None}


def _none(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class StageSpec:
    name: str  # the one identifier: fingerprints, reuse, grouping, report, summary; a scorer's kind and column
    family: str  # one of FAMILIES
    section: str  # models.<section> holds its settings and resources (a scorer's: its name)
    outputs: tuple[str, ...]  # manifest columns it fills (cafi/columns.py), besides `embedding`
    reads: Callable[[Any], tuple[str, ...]]  # cfg -> keys of READS
    # (cfg, the columns it fills in this run) -> what its results depend on besides its upstream (fingerprint)
    settings: Callable[[Any, tuple[str, ...]], dict]
    stage: type | None = None  # the ModelStage class (None: decide)
    score: str | None = None  # scorers: the column the decision and the report read (made at decide time)
    threshold: str | None = None  # scorers: decision.<key> of the family's rule
    derive: Callable[[Any, Any], Any] | None = None  # (raw column, cfg) -> score, at decide time
    decide_settings: Callable[[Any], dict] = _none  # settings of `derive` (in decide's fingerprint)
    embedding: int | None = None  # yields the recognition embedding in its own pass; lower = preferred source
    arch: Callable[[Any], str | None] | None = None  # cfg -> the published record it loads (None: no model)
    archs: tuple[str, ...] = ()  # every arch it can load (what `cafi weights synth` writes)
    synth: Callable[[str], Any] | None = None  # arch -> a random checkpoint object in the published layout
    joins: str | None = None  # runs in the actor of this stage (it reads what that one leaves in the actor)
    title: str = ""  # report: histogram title
    value_range: tuple[float, float] | None = None  # report: fixed histogram range (scores of a known scale)
    validate: Callable[[Any], None] | None = None  # cfg -> raises ConfigError: checks needing its model tables

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"stage {self.name}: family {self.family!r} is not one of {FAMILIES}")

    def upstream(self, cfg) -> tuple[str, ...]:
        """The stages whose results this stage's results depend on."""
        return tuple(dict.fromkeys(READS[r] for r in self.reads(cfg) if READS[r] is not None))

    def resources(self, cfg):
        """Its StageConfig: batch size, CPUs, GPUs, pool bounds, threads."""
        return getattr(cfg.models, self.section)

    def checkpoint(self, cfg):
        """The checkpoint it loads in this config (cafi.weights.Checkpoint), or None."""
        arch = self.arch(cfg) if self.arch is not None else None
        if arch is None:
            return None
        from cafi.models.registry import checkpoint

        return checkpoint(self.section, arch, self.resources(cfg).weights)
