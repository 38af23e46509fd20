"""Image-quality (IQA) scorers: how good is the face as an image? On the masked face (the CAFI
method: background replaced by `models.parser.fill`) or the whole crop, per scorer."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage


def iqa_pixels(stage: ModelStage, batch: dict, rows: np.ndarray, masked: bool):
    """The pixels an IQA model scores: the crop, with its background filled if `masked`."""
    from cafi.models.face_parsing import apply_mask

    pixels = batch["image"][rows]
    if not masked:
        return pixels
    return apply_mask(pixels, batch["face_mask"][rows], list(stage.cfg.models.parser.fill), stage.device)


class DbcnnStage(ModelStage):
    name, config_key, outputs = "dbcnn", "dbcnn", ("dbcnn",)

    def load(self) -> None:
        from cafi.models.dbcnn import DbcnnScorer
        from cafi.models.registry import checkpoint

        self.model = DbcnnScorer(checkpoint("dbcnn", "dbcnn", self.cfg.models.dbcnn.weights), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        batch["dbcnn"][rows] = self.model(iqa_pixels(self, batch, rows, self.cfg.models.dbcnn.masked))


class TopiqFaceStage(ModelStage):
    """TOPIQ-face on the face aligned to the FFHQ 512 template from the detector's landmarks (as
    pyiqa aligns it), masked or not per `models.topiq_face.masked`."""

    name, config_key, outputs = "topiq_face", "topiq_face", ("topiq_face",)

    def load(self) -> None:
        from cafi.models.registry import SCORER_ARCHS, checkpoint
        from cafi.models.topiq import TopiqFaceScorer

        w = self.cfg.models.topiq_face.weights
        self.model = TopiqFaceScorer(checkpoint("topiq_face", SCORER_ARCHS["topiq_face"], w), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        import cv2

        from cafi.faces.align import align_ffhq
        from cafi.models.runtime import to_host

        pixels = to_host(iqa_pixels(self, batch, rows, self.cfg.models.topiq_face.masked))
        if self.cfg.models.detector.align == "none":  # crops are already aligned faces
            faces = np.stack([cv2.resize(p, (512, 512), interpolation=cv2.INTER_CUBIC) for p in pixels])
        else:
            faces = align_ffhq(pixels, batch["landmarks"][rows].reshape(-1, 5, 2))
        batch["topiq_face"][rows] = self.model(faces)
