"""SDD-FIQA (Ou et al., CVPR 2021): a quality regressor trained on similarity-distribution pseudo-labels.

Each training face's pseudo-label is the Wasserstein distance between its similarities to its own
identity's faces and to other identities' (min-max scaled to 0..100 over the training set); an IR-50
regresses it from the face. The released model (Tencent/TFace quality/, trained on the refined MS1M)
is the IR-50 of the InsightFace_Pytorch lineage — the same `input_layer` and `body` of bottleneck_IR
units that facexlib's ArcFace backbone has — with the output head replaced by the quality head
`quality = Sequential(Flatten, PReLU(512*7*7), Dropout(0.5), Linear(512*7*7, 1))` (TFace
generate_pseudo_labels/extract_embedding/model/model.py, use_type "Qua"). No embedding comes out of it.

The published file is `net.state_dict()` of the training script, DataParallel-wrapped on several GPUs
(`module.` prefix, stripped as TFace's eval.py strips it), loaded strictly. Input as TFace's eval.py:
RGB, resized to 112x112 (here: the ArcFace-aligned face), ToTensor, Normalize(0.5, 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
from facexlib.recognition.arcface_arch import bottleneck_IR
from torch import nn

from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint

FEATURES = 512 * 7 * 7
IR50_UNITS = (3, 4, 14, 3)  # bottleneck_IR units per stage of IR-50 (facexlib get_blocks(50))
IR50_WIDTH = 64  # channels of the input layer; the stages have 1, 2, 4, 8 times as many


class SddFiqaNet(nn.Module):
    """The published IR-50 by default. `width` and `units` make a smaller net of the same structure
    (same key names, other shapes): for tests and benches of training only, never a published layout."""

    def __init__(self, width: int = IR50_WIDTH, units: tuple[int, ...] = IR50_UNITS):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        features = width * 8 * 7 * 7
        # nn.Flatten keeps TFace's C,H,W order (its view()) and also takes channels_last tensors. Registered
        # before `body`, as TFace does: the state dict lists the keys in the published file's order.
        self.quality = nn.Sequential(nn.Flatten(), nn.PReLU(features), nn.Dropout(0.5), nn.Linear(features, 1))
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        body = []
        for stage, n in enumerate(units):  # as get_blocks: the first unit of each stage halves the size
            body.append(bottleneck_IR(chans[stage], chans[stage + 1], 2))
            body += [bottleneck_IR(chans[stage + 1], chans[stage + 1], 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,112,112) RGB in [-1, 1] -> quality (N,1)."""
        return self.quality(self.body(self.input_layer(x)))


def build(width: int = IR50_WIDTH, units: tuple[int, ...] = IR50_UNITS) -> SddFiqaNet:
    return SddFiqaNet(width, units).eval()


class SddFiqaScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False):
        super().__init__("sddfiqa_ir50", build, ckpt, cache_dir, device, precision, storage, compile)

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB (N,112,112,3) faces aligned to the ArcFace template -> quality (N,), float32."""
        if len(faces) == 0:
            return np.zeros(0, np.float32)
        x = to_input(faces, self.device, self.record)
        with autocast(self.device, self.precision):
            q = self.forward(x)
        return q.float().view(-1).cpu().numpy()
