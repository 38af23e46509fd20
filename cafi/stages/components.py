"""Components: the per-face quality measures (pose, resolution, sharpness, exposure; cafi/components.py),
from the landmarks, the source size, the live face mask and the pixels. No network of its own: it runs
in the actor that runs the parsing, and takes that stage's resources."""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.spec import StageSpec

COMPONENT_COLUMNS = ("yaw", "pitch", "roll", "inter_eye_px", "face_fraction", "sharpness", "luma_mean", "luma_std",
                     "under_exposed", "over_exposed", "dynamic_range")


class Components(ModelStage):
    def load(self) -> None:
        from cafi import components

        self.compute = components.compute

    def process(self, batch: dict, rows: np.ndarray) -> None:
        from cafi.models.runtime import to_host

        values = self.compute(to_host(batch["image"][rows]), to_host(batch["face_mask"][rows]).astype(bool),
                              batch["landmarks"][rows], batch["width"][rows], batch["height"][rows],
                              self.cfg.image.crop_size)
        for col in self.outputs:
            batch[col][rows] = values[col]


def _settings(cfg, columns) -> dict:
    from cafi.components import DEFINITION_VERSION

    return {"definitions": DEFINITION_VERSION}


SPEC = StageSpec(
    name="components", family="components", section="parser", stage=Components, joins="parse",
    outputs=COMPONENT_COLUMNS,
    reads=lambda cfg: ("landmarks", "mask"),
    settings=_settings,
)
