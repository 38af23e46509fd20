"""DBCNN (Zhang et al., TCSVT 2018): no-reference image quality of the masked face (the CAFI method:
background replaced by `models.parser.fill`), or of the whole crop with `models.dbcnn.masked: false`."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import scored_pixels
from cafi.stages.spec import StageSpec


class DbcnnStage(ModelStage):
    def load(self) -> None:
        from cafi.models.dbcnn import DbcnnScorer

        self.model = DbcnnScorer(self._checkpoint(), **self._common(), arch=self.section.arch)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        pixels = scored_pixels(batch, rows, self.section.masked, self.cfg.models.parser.fill, self.device)
        batch["dbcnn"][rows] = self.model(pixels)


def _synth(arch: str):
    from cafi.models import dbcnn
    from cafi.synth import as_published

    return as_published(arch, dbcnn.build(arch).state_dict())


def masked_settings(cfg, spec: StageSpec) -> dict:
    """An IQA scorer's fingerprint settings: its weights, and the mask and fill when it scores the masked face."""
    st = spec.resources(cfg)
    return {"sha256": spec.checkpoint(cfg).sha256, "masked": st.masked,
            "fill": list(cfg.models.parser.fill) if st.masked else None}


SPEC = StageSpec(
    name="dbcnn", family="iqa", section="dbcnn", stage=DbcnnStage,
    outputs=("dbcnn",), score="dbcnn", threshold="min_dbcnn",
    reads=lambda cfg: ("crop", "mask") if cfg.models.dbcnn.masked else ("crop",),
    settings=lambda cfg, columns: masked_settings(cfg, SPEC),
    arch=lambda cfg: cfg.models.dbcnn.arch, archs=("dbcnn", "dbcnn_tiny"), synth=_synth,
    title="DBCNN (masked-face quality)",
)
