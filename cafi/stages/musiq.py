"""MUSIQ (pyiqa `musiq`, multi-scale patch transformer, KonIQ-10k weights) on the masked face
(background replaced by `models.parser.fill`, as DBCNN), or on the whole crop with
`models.musiq.masked: false`."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.dbcnn import masked_settings
from cafi.stages.faces import scored_pixels
from cafi.stages.spec import StageSpec


class MusiqStage(ModelStage):
    def load(self) -> None:
        from cafi.models.musiq import MusiqScorer

        self.model = MusiqScorer(self._checkpoint(), **self._common(), arch=self.section.arch)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        pixels = scored_pixels(batch, rows, self.section.masked, self.cfg.models.parser.fill, self.device)
        batch["musiq"][rows] = self.model(pixels)


def _synth(arch: str):
    from cafi.models import musiq
    from cafi.synth import as_published

    return as_published(arch, musiq.build(arch).state_dict())


SPEC = StageSpec(
    name="musiq", family="iqa", section="musiq", stage=MusiqStage,
    outputs=("musiq",), score="musiq", threshold="min_musiq",
    reads=lambda cfg: ("crop", "mask") if cfg.models.musiq.masked else ("crop",),
    settings=lambda cfg, columns: masked_settings(cfg, SPEC),
    arch=lambda cfg: cfg.models.musiq.arch, archs=("musiq_koniq", "musiq_tiny"), synth=_synth,
    title="MUSIQ (masked-face quality)",
)
