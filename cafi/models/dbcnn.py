"""DBCNN (Zhang et al., TCSVT 2018): deep bilinear CNN for no-reference image quality.

Two branches -- VGG16 conv features (authentic distortions) and SCNN (synthetic
distortions) -- are bilinearly pooled, square-rooted, L2-normalised and regressed to one
score. Module names follow pyiqa's DBCNN (`features1`, `features2`, `fc`), so pyiqa's
published checkpoints (state dict under `params`) load strictly. Input: RGB in [0, 1],
ImageNet mean/std, any size (no resize).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cafi.models.runtime import LoadedNet, autocast, maybe_compile, to_input
from cafi.weights import Checkpoint

# SCNN conv stack: (in, out, stride); each conv is 3x3 followed by BatchNorm and ReLU.
_SCNN_LAYERS = (
    (3, 48, 1), (48, 48, 2), (48, 64, 1), (64, 64, 2), (64, 64, 1),
    (64, 64, 2), (64, 128, 1), (128, 128, 1), (128, 128, 2),
)


# arch -> width divisor; dbcnn_tiny (tests): both branches at an eighth of their widths, the same layers
# and key names.
_DIVISOR = {"dbcnn": 1, "dbcnn_tiny": 8}
ARCHS = tuple(_DIVISOR)


def _scnn_features(divisor: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout, stride in _SCNN_LAYERS:
        cin = cin if cin == 3 else cin // divisor
        cout //= divisor
        layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _vgg16_features(divisor: int = 1) -> nn.Sequential:
    """torchvision's VGG16 conv stack (its `features`, architecture only) without the last max-pool."""
    widths = [w if w == "M" else w // divisor for w in torchvision.models.vgg.cfgs["D"]]
    return nn.Sequential(*list(torchvision.models.vgg.make_layers(widths).children())[:-1])


class DBCNN(nn.Module):
    def __init__(self, arch: str = "dbcnn"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown DBCNN arch {arch!r}; known: {', '.join(ARCHS)}")
        divisor = _DIVISOR[arch]
        self.features1 = _vgg16_features(divisor)
        self.features2 = _scnn_features(divisor)
        self.fc = nn.Linear((512 // divisor) * (_SCNN_LAYERS[-1][1] // divisor), 1)  # the two branches' widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised (N,3,H,W) -> quality (N,)."""
        return self.pool_and_regress(self.features1(x), self.features2(x))

    def pool_and_regress(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Bilinear pooling / (H*W), sqrt, L2 normalise, linear. Always fp32: sqrt and the
        normalisation are precision-sensitive."""
        n, ca, h, w = a.shape
        if b.shape[-2:] != (h, w):
            b = F.interpolate(b.float(), size=(h, w), mode="bilinear", align_corners=True)
        a = a.float().reshape(n, ca, h * w)
        b = b.float().reshape(n, b.shape[1], h * w)
        pooled = torch.bmm(a, b.transpose(1, 2)).div_(h * w).reshape(n, -1)
        pooled = F.normalize(torch.sqrt(pooled + 1e-8), dim=1)
        return self.fc(pooled).squeeze(1)


def build(arch: str = "dbcnn") -> DBCNN:
    return DBCNN(arch).eval()


class DbcnnScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False, arch: str = "dbcnn"):
        # compiled: the features
        super().__init__(arch, lambda: build(arch), ckpt, cache_dir, device, precision, storage)
        self.features = maybe_compile(lambda x: (self.net.features1(x), self.net.features2(x)), compile)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N,H,W,3) -> DBCNN score (N,), KonIQ MOS scale for the published weights."""
        x = to_input(images, self.device, self.record)
        with autocast(self.device, self.precision):
            a, b = self.features(x)
        with torch.autocast(self.device.type, enabled=False):
            score = self.net.pool_and_regress(a, b)
        return score.cpu().numpy().astype(np.float32)
