"""MANIQA (pyiqa `maniqa`, ViT-B/8 + transposed attention + Swin, KonIQ-10k weights) on the masked face
(background replaced by `models.parser.fill`, as DBCNN), or on the whole crop with
`models.maniqa.masked: false`; `models.maniqa.crops` 224-pixel crops per face."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.dbcnn import masked_settings
from cafi.stages.faces import scored_pixels
from cafi.stages.spec import StageSpec


class ManiqaStage(ModelStage):
    def load(self) -> None:
        from cafi.models.maniqa import ManiqaScorer

        self.model = ManiqaScorer(self._checkpoint(), **self._common(), arch=self.section.arch,
                                  crops=self.section.crops)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        pixels = scored_pixels(batch, rows, self.section.masked, self.cfg.models.parser.fill, self.device)
        batch["maniqa"][rows] = self.model(pixels)


def _synth(arch: str):
    from cafi.models import maniqa
    from cafi.synth import as_published

    return as_published(arch, maniqa.build(arch).state_dict())


SPEC = StageSpec(
    name="maniqa", family="iqa", section="maniqa", stage=ManiqaStage,
    outputs=("maniqa",), score="maniqa", threshold="min_maniqa",
    reads=lambda cfg: ("crop", "mask") if cfg.models.maniqa.masked else ("crop",),
    settings=lambda cfg, columns: {**masked_settings(cfg, SPEC), "crops": cfg.models.maniqa.crops},
    arch=lambda cfg: cfg.models.maniqa.arch, archs=("maniqa_koniq", "maniqa_tiny"), synth=_synth,
    title="MANIQA (masked-face quality)", value_range=(0.0, 1.0),
)
