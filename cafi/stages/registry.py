"""Which model stages a config runs, in pipeline order, and what each one needs live.

Order: Detect, then the FIQA scorers (on the aligned original face), then Mask and Components
(the face mask, then the measures that read it), then the IQA scorers (on the masked face, or
the crop, per scorer).
"""

from __future__ import annotations

from cafi.config import JobConfig
from cafi.stages.base import ModelStage
from cafi.stages.detect import Detect
from cafi.stages.fiqa import MagFaceStage, SerFiqStage
from cafi.stages.iqa import DbcnnStage, TopiqFaceStage
from cafi.stages.mask import Components, Mask

FIQA_STAGES: dict[str, type[ModelStage]] = {"serfiq": SerFiqStage, "magface": MagFaceStage}
IQA_STAGES: dict[str, type[ModelStage]] = {"dbcnn": DbcnnStage, "topiq_face": TopiqFaceStage}


def fiqa_kinds(cfg: JobConfig) -> list[str]:
    """The FIQA scorers of a run: the one the decision uses first, then any extra ones."""
    return [cfg.models.fiqa.kind, *cfg.models.fiqa.also]


def iqa_kinds(cfg: JobConfig) -> list[str]:
    return [cfg.models.iqa.kind, *cfg.models.iqa.also]


def stage_classes(cfg: JobConfig) -> list[type[ModelStage]]:
    return [Detect, *(FIQA_STAGES[k] for k in fiqa_kinds(cfg)), Mask, Components,
            *(IQA_STAGES[k] for k in iqa_kinds(cfg))]


def live_mask_users(cfg: JobConfig) -> list[str]:
    """Stages (version.py names) that read the live face mask: where one of them runs, Mask runs."""
    return ["components", *(k for k in iqa_kinds(cfg) if getattr(cfg.models, k).masked)]


def grouped(cfg: JobConfig, names: list[str]) -> list[list[str]]:
    """Stages (class names) that share one actor when the models are not fused: Components
    reads the mask Mask leaves in the actor, so the two always share one."""
    groups: list[list[str]] = []
    for name in names:
        if name == "Components" and groups and groups[-1][-1] == "Mask":
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups
