"""Detect: RetinaFace's best face per crop and its 5 landmarks. No face -> status no_face."""

from __future__ import annotations

import numpy as np

from cafi.decision import NO_FACE
from cafi.stages.base import ModelStage


class Detect(ModelStage):
    name, config_key, outputs = "detect", "detector", ("det_score", "landmarks")

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.retinaface import FaceDetector

        d = self.cfg.models.detector
        self.detector = None
        if d.align != "none":
            self.detector = FaceDetector(d.arch, checkpoint("detector", d.arch, d.weights), **self._common())

    def take_over(self, batch: dict, rows: np.ndarray) -> None:
        super().take_over(batch, rows)
        gone = rows[batch["prev_status"][rows] == NO_FACE]
        batch["status"][gone] = NO_FACE

    def process(self, batch: dict, rows: np.ndarray) -> None:
        if self.detector is None:  # align: none -- crops are already aligned faces
            return
        det = self.detector(batch["image"][rows])
        found = det.score >= self.cfg.models.detector.conf_threshold
        batch["det_score"][rows] = det.score
        batch["landmarks"][rows] = det.landmarks.reshape(len(rows), 10)
        batch["status"][rows[~found]] = NO_FACE
