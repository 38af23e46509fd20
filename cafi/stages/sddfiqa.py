"""SDD-FIQA (TFace's IR-50 quality regressor, or the seed team's variant with MANIQA in its place:
`models.sddfiqa.arch`) on the aligned 112x112 face: `sddfiqa`, its raw output (trained on 0..100
pseudo-labels). It yields no embedding: with output.embeddings another FIQA scorer
of the run must give it (cafi/stages/specs.py validate)."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class SddFiqaStage(ModelStage):
    def load(self) -> None:
        if self.section.arch == "sddfiqa_ir50":
            from cafi.models.sddfiqa import SddFiqaScorer

            self.model = SddFiqaScorer(self._checkpoint(), **self._common())
        else:  # the MANIQA-backbone variant (cafi train sddfiqa --backbone maniqa)
            from cafi.models.maniqa import FaceRegressorScorer

            self.model = FaceRegressorScorer(self._checkpoint(), **self._common(), arch=self.section.arch)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        batch["sddfiqa"][rows] = self.model(aligned_faces(batch, rows, self.cfg.models.detector.align))


def _synth(arch: str) -> dict:
    from cafi.models import sddfiqa
    from cafi.synth import calibrated

    if arch != "sddfiqa_ir50":  # what training writes for the MANIQA backbone: MANIQA's bare state dict
        from cafi.models import maniqa

        return maniqa.build_regressor(arch).state_dict()

    state = calibrated(sddfiqa.build(), (2, 3, 112, 112)).state_dict()
    return {f"module.{k}": v for k, v in state.items()}  # trained under DataParallel: saved with its prefix


SPEC = StageSpec(
    name="sddfiqa", family="fiqa", section="sddfiqa", stage=SddFiqaStage,
    outputs=("sddfiqa",), score="sddfiqa", threshold="min_sddfiqa",
    reads=lambda cfg: ("aligned",),
    settings=lambda cfg, columns: {"sha256": SPEC.checkpoint(cfg).sha256},
    arch=lambda cfg: cfg.models.sddfiqa.arch, archs=("sddfiqa_ir50", "sddfiqa_maniqa", "sddfiqa_maniqa_tiny"),
    synth=_synth,
    title="SDD-FIQA (face recognisability)",
)
