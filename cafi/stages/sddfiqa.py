"""SDD-FIQA (TFace's IR-50 quality regressor) on the aligned 112x112 face: `sddfiqa`, its raw output
(trained on 0..100 pseudo-labels). It yields no embedding: with output.embeddings another FIQA scorer
of the run must give it (cafi/stages/specs.py validate)."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class SddFiqaStage(ModelStage):
    def load(self) -> None:
        from cafi.models.sddfiqa import SddFiqaScorer

        self.model = SddFiqaScorer(self._checkpoint(), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        batch["sddfiqa"][rows] = self.model(aligned_faces(batch, rows, self.cfg.models.detector.align))


def _synth(arch: str) -> dict:
    from cafi.models import sddfiqa
    from cafi.synth import calibrated

    state = calibrated(sddfiqa.build(), (2, 3, 112, 112)).state_dict()
    return {f"module.{k}": v for k, v in state.items()}  # trained under DataParallel: saved with its prefix


SPEC = StageSpec(
    name="sddfiqa", family="fiqa", section="sddfiqa", stage=SddFiqaStage,
    outputs=("sddfiqa",), score="sddfiqa", threshold="min_sddfiqa",
    reads=lambda cfg: ("aligned",),
    settings=lambda cfg, columns: {"sha256": SPEC.checkpoint(cfg).sha256},
    arch=lambda cfg: "sddfiqa_ir50", archs=("sddfiqa_ir50",), synth=_synth,
    title="SDD-FIQA (face recognisability)",
)
