"""MagFace (Meng et al., CVPR 2021): face quality is the norm of the recognition embedding.

MagFace trains the embedding's magnitude to grow with recognisability (clamped to [10, 110] in
training), so one plain forward pass of its iResNet gives both the identity (the direction) and
the quality (the norm, unnormalised). Input as MagFace's inference: the ArcFace-aligned 112x112
face, BGR, /255, no mean subtraction (inference/gen_feat.py).

`ofiq_mapping` maps the norm to 0..100 the way OFIQ's Unified Quality Score does (ISO/IEC 29794-5
reference implementation, BSI-OFIQ/OFIQ-Project: data/ofiq_config.jaxn "UnifiedQualityScore"
Sigmoid {h: 100, x0: 23.0, w: 2.6, round: true}; OFIQlib Measure.h): 100 / (1 + exp((23 - norm)
/ 2.6)), rounded and clamped to [0, 100], as OFIQ reports it, so values compare with OFIQ's
(the norm column keeps the unrounded information). OFIQ computes the norm with its own iResNet50
MagFace model (ONNX); on the iResNet100 norms used here the mapping has OFIQ's shape but is not
OFIQ's number.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cafi.decision import ofiq_unified_quality
from cafi.models import iresnet
from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint


class MagFaceScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False, ofiq_mapping: bool = False):
        super().__init__("magface_iresnet100", lambda: iresnet.build(100), ckpt, cache_dir, device, precision, storage,
                         compile)
        self.ofiq_mapping = ofiq_mapping

    @torch.inference_mode()
    def embed(self, faces: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding (N, 512), fp32, on the model's device."""
        x = to_input(faces, self.device, self.record)
        with autocast(self.device, self.precision):
            return self.forward(x).float()

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 RGB (N,112,112,3) faces aligned to the ArcFace template -> (norm (N,), quality (N,),
        L2-normalised embedding (N,512)), all float32. quality is the norm, or with `ofiq_mapping`
        OFIQ's unified quality score (an integer 0..100)."""
        if len(faces) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, iresnet.EMBEDDING), np.float32)
        emb = self.embed(faces)
        norm = emb.norm(dim=1).cpu().numpy().astype(np.float32)
        quality = ofiq_unified_quality(norm).astype(np.float32) if self.ofiq_mapping else norm
        unit = F.normalize(emb, dim=1)
        return norm, quality, unit.cpu().numpy().astype(np.float32)
