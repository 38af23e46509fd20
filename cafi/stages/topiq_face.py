"""TOPIQ-face (pyiqa topiq_nr-face, CFANet on ResNet-50) on the face aligned to the FFHQ 512 template from
the detector's landmarks (as pyiqa aligns it), masked or not per `models.topiq_face.masked`."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.dbcnn import masked_settings
from cafi.stages.faces import scored_pixels
from cafi.stages.spec import StageSpec


class TopiqFaceStage(ModelStage):
    def load(self) -> None:
        from cafi.models.topiq import TopiqFaceScorer

        self.model = TopiqFaceScorer(self._checkpoint(), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        import cv2

        from cafi.faces.align import align_ffhq
        from cafi.models.runtime import to_host

        pixels = scored_pixels(batch, rows, self.section.masked, self.cfg.models.parser.fill, self.device)
        pixels = to_host(pixels)
        if self.cfg.models.detector.align == "none":  # crops are already aligned faces
            faces = np.stack([cv2.resize(p, (512, 512), interpolation=cv2.INTER_CUBIC) for p in pixels])
        else:
            faces = align_ffhq(pixels, batch["landmarks"][rows].reshape(-1, 5, 2))
        batch["topiq_face"][rows] = self.model(faces)


def _synth(arch: str):
    from cafi.models import topiq
    from cafi.synth import as_published

    return as_published(arch, topiq.build().state_dict())


SPEC = StageSpec(
    name="topiq_face", family="iqa", section="topiq_face", stage=TopiqFaceStage,
    outputs=("topiq_face",), score="topiq_face", threshold="min_topiq_face",
    reads=lambda cfg: ("landmarks", "crop", "mask") if cfg.models.topiq_face.masked else ("landmarks", "crop"),
    settings=lambda cfg, columns: masked_settings(cfg, SPEC),
    arch=lambda cfg: "topiq_nr_face", archs=("topiq_nr_face",), synth=_synth,
    title="TOPIQ-face (face quality)", value_range=(0.0, 1.0),
)
