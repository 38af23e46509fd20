"""Mask: face parsing -> which pixels are face (`face_mask`, kept in flight for the stages that
need it) and the face-area fraction. Components: the per-face quality measures, from the
landmarks, the source size, the face mask and the pixels (no network of its own)."""

from __future__ import annotations

import numpy as np

from cafi.models.runtime import to_host
from cafi.stages.base import ModelStage

COMPONENT_COLUMNS = ("yaw", "pitch", "roll", "inter_eye_px", "face_fraction", "sharpness", "luma_mean", "luma_std",
                     "under_exposed", "over_exposed", "dynamic_range")


def _blank_mask(batch: dict) -> object:
    image = batch["image"]
    if isinstance(image, np.ndarray):
        return np.zeros(image.shape[:3], dtype=bool)
    import torch

    return torch.zeros(image.shape[:3], dtype=torch.bool, device=image.device)


class Mask(ModelStage):
    name, config_key, outputs = "parse", "parser", ("mask_fraction",)

    def load(self) -> None:
        from cafi.models.face_parsing import FaceMasker
        from cafi.models.registry import checkpoint

        p = self.cfg.models.parser
        self.masker = FaceMasker(p.arch, checkpoint("parser", p.arch, p.weights), face_labels=list(p.face_labels),
                                 fill=list(p.fill), input_size=p.input_size, **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        super().init_columns(batch, n)
        if self.loaded and "image" in batch:  # in every batch: blocks without it would not combine
            batch["face_mask"] = _blank_mask(batch)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        mask, fraction = self.masker(batch["image"][rows])
        target = batch["face_mask"]
        target[rows] = mask if not isinstance(target, np.ndarray) else to_host(mask)
        batch["mask_fraction"][rows] = fraction


class Components(ModelStage):
    """Runs in the actor that runs Mask (it reads the live face mask); cheap CPU measures."""

    name, config_key, outputs = "components", "parser", COMPONENT_COLUMNS

    def load(self) -> None:
        from cafi import components

        self.compute = components.compute

    def process(self, batch: dict, rows: np.ndarray) -> None:
        values = self.compute(to_host(batch["image"][rows]), to_host(batch["face_mask"][rows]).astype(bool),
                              batch["landmarks"][rows], batch["width"][rows], batch["height"][rows],
                              self.cfg.image.crop_size)
        for col in self.outputs:
            batch[col][rows] = values[col]
