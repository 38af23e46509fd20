"""SER-FIQ (Terhorst et al., CVPR 2020) on the aligned 112x112 face: is the face recognisable?

The ArcFace IR-SE50 trunk runs once, its dropout head T times (cafi/models/serfiq.py). The raw quality
is stored (`serfiq_raw`); the rescaled score the decision reads (`serfiq`) is made at decision time, so
changing alpha or r runs no model. With output.embeddings it also gives the plain ArcFace embedding
from the same trunk pass.
"""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class SerFiqStage(ModelStage):
    def load(self) -> None:
        from cafi.models.serfiq import SerFiq

        s = self.section
        self.model = SerFiq(self._checkpoint(), samples=s.samples, dropout=s.dropout, alpha=s.alpha, r=s.r,
                            seed=s.seed, arch=s.arch, **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        faces = aligned_faces(batch, rows, self.cfg.models.detector.align)
        raw, _, emb = self.model(faces, embeddings="embedding" in self.outputs)
        batch["serfiq_raw"][rows] = raw
        if emb is not None:
            batch["embedding"][rows] = emb.astype(np.float16)


def _settings(cfg, columns) -> dict:
    s = cfg.models.serfiq
    return {"sha256": SPEC.checkpoint(cfg).sha256, "embeddings": "embedding" in columns,
            "samples": s.samples, "dropout": s.dropout, "seed": s.seed}


def _derive(batch: dict, cfg):
    from cafi.decision import rescale_serfiq

    return rescale_serfiq(batch["serfiq_raw"], cfg.models.serfiq.alpha, cfg.models.serfiq.r)


def _synth(arch: str):
    from cafi.models import arcface
    from cafi.synth import as_published

    return as_published(arch, arcface.build(arch=arch).state_dict())


SPEC = StageSpec(
    name="serfiq", family="fiqa", section="serfiq", stage=SerFiqStage,
    outputs=("serfiq_raw",), score="serfiq", threshold="min_serfiq", embedding=0,
    reads=lambda cfg: ("aligned",),
    settings=_settings,
    derive=_derive,
    decide_settings=lambda cfg: {"serfiq_alpha": cfg.models.serfiq.alpha, "serfiq_r": cfg.models.serfiq.r},
    arch=lambda cfg: cfg.models.serfiq.arch, archs=("arcface_ir_se50", "arcface_ir_se50_tiny"), synth=_synth,
    title="SER-FIQ (face recognisability)", value_range=(0.0, 1.0),
)
