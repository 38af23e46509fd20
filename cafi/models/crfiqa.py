"""CR-FIQA (Boutros et al., CVPR 2023): face quality as the learnt relative classifiability of a sample.

CR-FIQA trains an iResNet recognizer (ArcFace margin) together with a one-unit regression head, `qs`,
on the embedding: it learns to predict each training sample's certainty ratio (its cosine to its own
class centre over the nearest other centre). One forward pass of the 112x112 aligned face gives both
the embedding and the quality; nothing is sampled.

The net is MagFace's iResNet (cafi/models/iresnet.py: the same module names, shapes and order, as in
fdbtrs/CR-FIQA backbones/iresnet.py) with insightface's batch-norm eps 1e-5 and the head
`qs = Linear(512, 1)` on the BatchNorm1d output (`features`). The published files are the plain state
dict of that backbone (`<step>backbone.pth`, saved from the DDP module without its prefix), loaded
strictly. Input as the repository's evaluation/QualityModel.py: RGB (its README: convert OpenCV's BGR),
pixel / 255, minus 0.5, over 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cafi.models import iresnet
from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint

EPS = 1e-5
# arch -> iResNet depth: CR-FIQA(L) is trained on MS1MV2, CR-FIQA(S) on CASIA-WebFace
DEPTHS = {"crfiqa_iresnet100": 100, "crfiqa_iresnet50": 50}


class CrFiqaNet(iresnet.IResNet):
    def __init__(self, depth: int):
        super().__init__(depth, eps=EPS)
        self.qs = nn.Linear(iresnet.EMBEDDING, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,112,112) RGB in [-1, 1] -> (unnormalised embedding (N,512), quality (N,1))."""
        emb = super().forward(x)
        return emb, self.qs(emb)


def build(arch: str) -> CrFiqaNet:
    return CrFiqaNet(DEPTHS[arch]).eval()


class CrFiqaScorer(LoadedNet):
    def __init__(self, arch: str, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False):
        super().__init__(arch, lambda: build(arch), ckpt, cache_dir, device, precision, storage, compile)

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (N,112,112,3) faces aligned to the ArcFace template -> (quality (N,), the raw
        regression output; L2-normalised embedding (N,512)), float32."""
        if len(faces) == 0:
            return np.zeros(0, np.float32), np.zeros((0, iresnet.EMBEDDING), np.float32)
        x = to_input(faces, self.device, self.record)
        with autocast(self.device, self.precision):
            emb, quality = self.forward(x)
        unit = F.normalize(emb.float(), dim=1)
        return quality.float().view(-1).cpu().numpy(), unit.cpu().numpy()
