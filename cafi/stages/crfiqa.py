"""CR-FIQA (iResNet100 or iResNet50 with its quality head) on the aligned 112x112 face.

One forward pass gives the quality (`crfiqa`, the head's raw output: the decision reads it as is) and,
when this stage is the run's embedding source (output.embeddings, cafi/stages/specs.py
embedding_source), the unit embedding from the same pass.
"""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class CrFiqaStage(ModelStage):
    def load(self) -> None:
        from cafi.models.crfiqa import CrFiqaScorer

        self.model = CrFiqaScorer(self.section.arch, self._checkpoint(), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        quality, unit = self.model(aligned_faces(batch, rows, self.cfg.models.detector.align))
        batch["crfiqa"][rows] = quality
        if "embedding" in self.outputs:
            batch["embedding"][rows] = unit.astype(np.float16)


def _synth(arch: str) -> dict:
    from cafi.models import crfiqa
    from cafi.synth import calibrated

    # The published file is the backbone's plain state dict (no wrapper, no prefix, `qs` included).
    return calibrated(crfiqa.build(arch), (2, 3, 112, 112)).state_dict()


SPEC = StageSpec(
    name="crfiqa", family="fiqa", section="crfiqa", stage=CrFiqaStage,
    outputs=("crfiqa",), score="crfiqa", threshold="min_crfiqa", embedding=2,
    reads=lambda cfg: ("aligned",),
    settings=lambda cfg, columns: {"arch": cfg.models.crfiqa.arch, "sha256": SPEC.checkpoint(cfg).sha256,
                                   "embeddings": "embedding" in columns},
    arch=lambda cfg: cfg.models.crfiqa.arch, archs=("crfiqa_iresnet100", "crfiqa_iresnet50"), synth=_synth,
    title="CR-FIQA (face recognisability)",
)
