"""Face parsing (BiSeNet or ParseNet): which pixels are face (`face_mask`, kept in flight for the stages
that read it) and the face-area fraction."""

from __future__ import annotations

import numpy as np

from cafi.errors import ConfigError
from cafi.stages.base import ModelStage, image_settings
from cafi.stages.spec import StageSpec


def _blank_mask(batch: dict) -> object:
    image = batch["image"]
    if isinstance(image, np.ndarray):
        return np.zeros(image.shape[:3], dtype=bool)
    import torch

    return torch.zeros(image.shape[:3], dtype=torch.bool, device=image.device)


class Mask(ModelStage):
    def load(self) -> None:
        from cafi.models.face_parsing import FaceMasker

        p = self.section
        self.masker = FaceMasker(p.arch, self._checkpoint(), face_labels=list(p.face_labels), fill=list(p.fill),
                                 input_size=p.input_size, **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        super().init_columns(batch, n)
        if self.loaded and "image" in batch:  # in every batch: blocks without it would not combine
            batch["face_mask"] = _blank_mask(batch)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        from cafi.models.runtime import to_host

        mask, fraction = self.masker(batch["image"][rows])
        target = batch["face_mask"]
        target[rows] = mask if not isinstance(target, np.ndarray) else to_host(mask)
        batch["mask_fraction"][rows] = fraction


def labels_of(arch: str) -> tuple[str, ...]:
    from cafi.models import bisenet, parsenet  # label tables only: no torch

    return {"bisenet": bisenet, "parsenet": parsenet}[arch].LABELS


def _validate(cfg) -> None:
    p = cfg.models.parser
    names = labels_of(p.arch)
    for label in p.face_labels:
        if label not in names:
            raise ConfigError(f"models.parser.face_labels: {label!r} is not allowed; expected labels of "
                              f"{p.arch}: {names}")


def _settings(cfg, columns) -> dict:
    p = cfg.models.parser
    return {**image_settings(cfg), "arch": p.arch, "sha256": SPEC.checkpoint(cfg).sha256,
            "labels": list(p.face_labels), "input_size": p.input_size}


def _synth(arch: str):
    from cafi.models import face_parsing
    from cafi.synth import as_published

    return as_published(arch, face_parsing.build(arch).state_dict())


SPEC = StageSpec(
    name="parse", family="parse", section="parser", stage=Mask,
    outputs=("mask_fraction",),
    reads=lambda cfg: ("crop",),
    settings=_settings,
    arch=lambda cfg: cfg.models.parser.arch, archs=("bisenet", "parsenet"), synth=_synth,
    validate=_validate,
)
