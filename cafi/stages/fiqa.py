"""Face-image quality (FIQA) scorers on the aligned 112x112 face: is the face recognisable?

SER-FIQ and MagFace. With output.embeddings, the recognition embedding comes from the first of
them the run has (SER-FIQ's plain ArcFace embedding from its trunk pass, else MagFace's unit
embedding): no second pass. The face is aligned from the original pixels and the detector's
landmarks (stored landmarks when detection is reused), so switching the FIQA scorer re-runs
neither detection nor parsing.
"""

from __future__ import annotations

import numpy as np

from cafi.models.runtime import to_host
from cafi.stages.base import ModelStage


def aligned_faces(batch: dict, rows: np.ndarray, align: str) -> np.ndarray:
    """uint8 (len(rows),112,112,3) faces aligned to the ArcFace template."""
    from cafi.faces.align import align_faces, resize_aligned

    images = to_host(batch["image"][rows])
    if align == "none":
        return resize_aligned(images)
    return align_faces(images, batch["landmarks"][rows].reshape(-1, 5, 2), np.ones(len(rows), bool))


def writes_embedding(cfg, name: str) -> bool:
    """Whether this FIQA stage is the one that fills the `embedding` column."""
    from cafi.stages.registry import fiqa_kinds

    kinds = fiqa_kinds(cfg)
    return bool(cfg.output.embeddings) and ("serfiq" if "serfiq" in kinds else kinds[0]) == name


class SerFiqStage(ModelStage):
    name, config_key = "serfiq", "serfiq"

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("serfiq_raw", "embedding") if writes_embedding(self.cfg, self.name) else ("serfiq_raw",)

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.serfiq import SerFiq

        s = self.cfg.models.serfiq
        self.model = SerFiq(checkpoint("serfiq", "arcface_ir_se50", s.weights), samples=s.samples,
                            dropout=s.dropout, alpha=s.alpha, r=s.r, seed=s.seed, **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        faces = aligned_faces(batch, rows, self.cfg.models.detector.align)
        raw, _, emb = self.model(faces, embeddings=writes_embedding(self.cfg, self.name))
        batch["serfiq_raw"][rows] = raw
        if emb is not None:
            batch["embedding"][rows] = emb.astype(np.float16)


class MagFaceStage(ModelStage):
    """MagFace: quality = the norm of the unnormalised embedding (`magface_raw`); the score the
    decision reads (`magface`, the norm or OFIQ's mapping of it) is made at decision time."""

    name, config_key = "magface", "magface"

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("magface_raw", "embedding") if writes_embedding(self.cfg, self.name) else ("magface_raw",)

    def load(self) -> None:
        from cafi.models.magface import MagFaceScorer
        from cafi.models.registry import SCORER_ARCHS, checkpoint

        m = self.cfg.models.magface
        self.model = MagFaceScorer(checkpoint("magface", SCORER_ARCHS["magface"], m.weights), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        norm, _, unit = self.model(aligned_faces(batch, rows, self.cfg.models.detector.align))
        batch["magface_raw"][rows] = norm
        if "embedding" in self.outputs:
            batch["embedding"][rows] = unit.astype(np.float16)
