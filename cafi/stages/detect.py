"""Detect: RetinaFace's best face per crop and its 5 landmarks. No face -> status no_face."""

from __future__ import annotations

import numpy as np

from cafi.decision import NO_FACE
from cafi.stages.base import ModelStage, image_settings
from cafi.stages.spec import StageSpec


class Detect(ModelStage):
    def load(self) -> None:
        from cafi.models.retinaface import FaceDetector

        d = self.section
        self.detector = None
        if d.align != "none":
            self.detector = FaceDetector(d.arch, self._checkpoint(), **self._common())

    def take_over(self, batch: dict, rows: np.ndarray) -> None:
        super().take_over(batch, rows)
        gone = rows[batch["prev_status"][rows] == NO_FACE]
        batch["status"][gone] = NO_FACE

    def process(self, batch: dict, rows: np.ndarray) -> None:
        if self.detector is None:  # align: none -- crops are already aligned faces
            return
        det = self.detector(batch["image"][rows])
        found = det.score >= self.section.conf_threshold
        batch["det_score"][rows] = det.score
        batch["landmarks"][rows] = det.landmarks.reshape(len(rows), 10)
        batch["status"][rows[~found]] = NO_FACE


def _settings(cfg, columns) -> dict:
    d = cfg.models.detector
    out = {**image_settings(cfg), "align": d.align}
    if d.align != "none":
        out.update(arch=d.arch, sha256=SPEC.checkpoint(cfg).sha256, conf_threshold=d.conf_threshold)
    return out


def _synth(arch: str):
    from cafi.models import retinaface
    from cafi.synth import as_published

    state = retinaface.build(arch, "cpu").state_dict()
    return as_published(arch, {f"module.{k}": v for k, v in state.items()})  # DataParallel's prefix, as published


SPEC = StageSpec(
    name="detect", family="detect", section="detector", stage=Detect,
    outputs=("det_score", "landmarks"),
    reads=lambda cfg: ("crop",),
    settings=_settings,
    arch=lambda cfg: cfg.models.detector.arch if cfg.models.detector.align != "none" else None,
    archs=("retinaface_resnet50", "retinaface_mobile0.25"), synth=_synth,
)
