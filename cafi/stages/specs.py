"""Every stage spec (cafi/stages/spec.py), found by importing the stage modules, and what a config runs.

A stage module is any module of this package with a module-level `SPEC`; nothing here names a model
stage. The decision's spec is this module's own (`DECIDE`): it is the sink every stage feeds.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from cafi import fusion
from cafi.config import JobConfig
from cafi.errors import ConfigError
from cafi.stages.spec import FAMILIES, StageSpec

# Thresholds added after model versions were first recorded enter the decision's fingerprint only when
# set: null turns a rule off, as an absent key does, so every version made before them keeps its name.
_LATER_THRESHOLDS = ("min_crfiqa", "min_sddfiqa", "min_fused", "min_classic")


def _decide_settings(cfg: JobConfig, columns: tuple[str, ...]) -> dict:
    """Thresholds, the scorers the decision uses, the fusion, and every scorer's decide-time mapping
    settings."""
    thresholds = {k: v for k, v in vars(cfg.decision).items()
                  if k != "fusion" and (v is not None or k not in _LATER_THRESHOLDS)}
    out = {"decision": thresholds, "fiqa": cfg.models.fiqa.kind, "iqa": cfg.models.iqa.kind,
           **fusion.settings(cfg.decision)}
    for s in all_specs():
        out.update(s.decide_settings(cfg))
    return out


# The decision (cafi/stages/decide.py, CPU tasks): no model; it reads every stage of the run.
DECIDE = StageSpec(name="decide", family="decide", section="", reads=lambda cfg: (), settings=_decide_settings,
                   outputs=("cafi", "accepted", "decision", "reject_reason"))


@cache
def all_specs() -> tuple[StageSpec, ...]:
    """Every stage's spec, in family order (then by name); the decision's last."""
    import cafi.stages as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, StageSpec):
            found.append(spec)
    found.append(DECIDE)
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two stage specs share a name: {sorted(names)}")
    return tuple(sorted(found, key=lambda s: (FAMILIES.index(s.family), s.name)))


def spec(name: str) -> StageSpec:
    for s in all_specs():
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in all_specs()]}")


def of_family(family: str) -> tuple[StageSpec, ...]:
    return tuple(s for s in all_specs() if s.family == family)


def kinds(cfg: JobConfig, family: str) -> list[str]:
    """The scorers of a family a run computes: the one the decision uses first, then any extra ones."""
    choice = getattr(cfg.models, family)
    return [choice.kind, *choice.also]


def chosen(cfg: JobConfig, family: str) -> StageSpec:
    """The scorer of a family (fiqa, iqa) the decision uses."""
    return spec(getattr(cfg.models, family).kind)


def specs_for(cfg: JobConfig) -> list[StageSpec]:
    """The model stages a config runs, in pipeline order (decide is not one: it runs in its own tasks).
    A FIQA scorer that reads the run's `embedding` (the classic classifier) runs after the other FIQA
    scorers, one of which makes it."""
    out: list[StageSpec] = []
    for family in FAMILIES[:-1]:
        if family in ("fiqa", "iqa"):
            chosen_ = [spec(k) for k in kinds(cfg, family)]
            if family == "fiqa":  # the family whose scorers make the embedding
                chosen_.sort(key=lambda s: "embedding" in s.reads(cfg))
            out += chosen_
        else:
            out += list(of_family(family))
    return out


def stage_columns(s: StageSpec, cfg: JobConfig) -> tuple[str, ...]:
    """Manifest columns a stage fills in this run (`embedding` when it is the run's embedding source)."""
    return (*s.outputs, "embedding") if embedding_source(cfg) == s.name else s.outputs


def embedding_source(cfg: JobConfig) -> str | None:
    """The stage that fills `embedding` (output.embeddings): of the run's FIQA scorers that yield one in
    their own pass, the one first by the spec's preference (SER-FIQ's plain ArcFace embedding, then
    MagFace's, then CR-FIQA's), so no second recognition pass runs. The preference, not the order of
    kind and also, decides: the same set of scorers always embeds with the same model."""
    if not cfg.output.embeddings:
        return None
    able = [s for s in specs_for(cfg) if s.family == "fiqa" and s.embedding is not None]
    return min(able, key=lambda s: s.embedding).name if able else None


def embedding_model(cfg: JobConfig) -> dict | None:
    """Which recognizer the run's `embedding` column comes from: its stage, the checkpoint's arch and
    sha256 (None without output.embeddings). The summary and the column's Parquet metadata carry it, so
    `cafi eval --identities` can tell embeddings of different recognizers apart."""
    name = embedding_source(cfg)
    if name is None:
        return None
    s = spec(name)
    return {"stage": name, "arch": s.arch(cfg), "sha256": s.checkpoint(cfg).sha256}


def grouped(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """Stages that share one actor when the models are not fused: a stage that `joins` another (it reads
    what that one leaves in the actor, like the components the live face mask) runs in its actor."""
    groups: list[list[StageSpec]] = []
    for s in specs:
        if s.joins and groups and groups[-1][-1].name == s.joins:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def actor_groups(cfg: JobConfig) -> list[list[StageSpec]]:
    """The model actors of a run: one fused actor for every stage the config runs (ray.fuse_models),
    else one per group of stages (`grouped`)."""
    run = specs_for(cfg)
    return [run] if cfg.ray.fuse_models else grouped(run)


def live_mask_users(cfg: JobConfig) -> list[str]:
    """Stages that read the live face mask: where one of them runs, parsing runs."""
    return [s.name for s in specs_for(cfg) if "mask" in s.reads(cfg)]


def validate(cfg: JobConfig, pinned: bool = True) -> None:
    """The checks that need the model tables (cafi/config.py checks the rest without them): each stage's
    own (`validate`), and (`pinned`) that every checkpoint a run loads has a digest to verify -- not for
    `cafi weights fetch`, which is how a checkpoint without a published digest gets one."""
    for s in specs_for(cfg):
        arch = s.arch(cfg) if s.arch is not None else None
        if arch is not None and arch not in s.archs:
            raise ConfigError(f"models.{s.section}.arch: {arch!r} is not allowed; expected one of {s.archs}")
        if s.validate is not None:
            s.validate(cfg)
        try:
            if pinned:
                s.checkpoint(cfg)
        except KeyError as exc:
            raise ConfigError(f"models.{s.section}: {exc.args[0]}") from None
    made = {c for s in specs_for(cfg) for c in (*s.outputs, *((s.score,) if s.score else ()))}
    for name in cfg.decision.fusion.weights:
        if name not in made:
            raise ConfigError(f"decision.fusion.weights.{name}: this run does not compute {name} (its scorers: "
                              f"{', '.join(kinds(cfg, 'fiqa') + kinds(cfg, 'iqa'))}); add its scorer to "
                              "models.<family>.also or drop the weight")
    if cfg.output.embeddings and embedding_source(cfg) is None:
        able = [s.name for s in of_family("fiqa") if s.embedding is not None]
        raise ConfigError(f"output.embeddings: none of this run's FIQA scorers ({', '.join(kinds(cfg, 'fiqa'))}) "
                          f"yields an embedding; add one that does to models.fiqa.also ({', '.join(able)})")


def checkpoints(cfg: JobConfig) -> list:
    """The checkpoints a run loads: only those of the stages it runs."""
    return [c for c in (s.checkpoint(cfg) for s in specs_for(cfg)) if c is not None]


def score_rules(decision, fiqa: str, iqa: str):
    """The FIQA and IQA rules (cafi.decision.ScoreRule) of a decision config and the two scorer kinds it
    decides with: each scorer's score column and its threshold key."""
    from cafi.decision import ScoreRule

    return tuple(ScoreRule(spec(kind).score, getattr(decision, spec(kind).threshold)) for kind in (fiqa, iqa))


def sections() -> tuple[str, ...]:
    """Every models.<section> a model stage takes its settings and resources from."""
    return tuple(dict.fromkeys(s.section for s in all_specs() if s.stage is not None))
