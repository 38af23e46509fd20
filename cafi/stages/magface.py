"""MagFace (iResNet100) on the aligned 112x112 face: quality = the norm of the unnormalised embedding.

The norm is stored (`magface_raw`); the score the decision reads (`magface`: the norm, or OFIQ's 0..100
mapping of it) is made at decision time. With output.embeddings (and no SER-FIQ in the run) it gives
the unit embedding from the same pass.
"""

from __future__ import annotations

import numpy as np

from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class MagFaceStage(ModelStage):
    def load(self) -> None:
        from cafi.models.magface import MagFaceScorer

        self.model = MagFaceScorer(self._checkpoint(), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        norm, _, unit = self.model(aligned_faces(batch, rows, self.cfg.models.detector.align))
        batch["magface_raw"][rows] = norm
        if "embedding" in self.outputs:
            batch["embedding"][rows] = unit.astype(np.float16)


def _derive(batch: dict, cfg):
    from cafi.decision import ofiq_unified_quality

    norm = np.asarray(batch["magface_raw"], dtype=np.float32)
    return ofiq_unified_quality(norm).astype(np.float32) if cfg.models.magface.ofiq_mapping else norm


# MagFace's iResNet100 file is a training checkpoint (run/trainer_dist.py): epoch, arch, optimizer
# and `state_dict` = the DDP-wrapped backbone (`features.module.<k>`) plus rank 0's shard of the
# split margin head, `parallel_fc.weight` (85744 MS1MV2 classes / 8 GPUs; the 283,040,192-byte
# size of the published file fits exactly this). The loader drops the head (the record's
# drop_prefixes); it is written so that the drop is exercised.
MAGFACE_HEAD_SHARD = (85744 // 8, 512)


def _synth(arch: str) -> dict:
    import torch

    from cafi.models import iresnet
    from cafi.synth import calibrated

    state = calibrated(iresnet.build(100), (8, 3, 112, 112)).state_dict()
    wrapped = {f"features.module.{k}": v for k, v in state.items()}
    wrapped["parallel_fc.weight"] = torch.randn(MAGFACE_HEAD_SHARD)
    sgd = {"lr": 0.0001, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0005, "nesterov": False,
           "params": list(range(len(wrapped)))}
    return {"epoch": 25, "arch": "iresnet100", "state_dict": wrapped, "optimizer": {"state": {}, "param_groups": [sgd]}}


SPEC = StageSpec(
    name="magface", family="fiqa", section="magface", stage=MagFaceStage,
    outputs=("magface_raw",), score="magface", threshold="min_magface", embedding=1,
    reads=lambda cfg: ("aligned",),
    settings=lambda cfg, columns: {"sha256": SPEC.checkpoint(cfg).sha256, "embeddings": "embedding" in columns},
    derive=_derive,
    decide_settings=lambda cfg: {"magface_ofiq_mapping": cfg.models.magface.ofiq_mapping},
    arch=lambda cfg: "magface_iresnet100", archs=("magface_iresnet100",), synth=_synth,
    title="MagFace (face recognisability)",
)
