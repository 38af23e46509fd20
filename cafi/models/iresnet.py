"""iResNet for 112x112 faces, as MagFace (Meng et al., CVPR 2021) defines it.

Module names and shapes follow MagFace's `models/iresnet.py` (IrvingMeng/MagFace@99bae61), so its
published checkpoints load strictly once the training wrapper's prefix is stripped (see the
`magface_iresnet100` record in cafi.models.registry):

    conv1 (3x3, stride 1) -> bn1 -> prelu -> layer1..layer4 -> bn2 -> dropout -> flatten -> fc -> features

Each block is pre-activation style, bn1 -> conv1 -> bn2 -> prelu -> conv2 (carries the stride)
-> bn3, plus the identity or a 1x1-conv+BN downsample, with nothing after the sum. Every stage
halves the size (112 -> 56 -> 28 -> 14 -> 7), so every stage's first block has a downsample.
`features` is an affine BatchNorm1d over the 512-d embedding; MagFace's quality is the norm of
its output. MagFace's batch norms use eps 2e-5; CR-FIQA's iResNet (cafi/models/crfiqa.py), the same
net with insightface's defaults, uses 1e-5 (`eps`). The momentum only matters in training.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)
EMBEDDING = 512
MAGFACE_EPS = 2e-5


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.9)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, eps: float):
        super().__init__()
        self.bn1 = _bn(inplanes, eps)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = _bn(planes, eps)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = _bn(planes, eps)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            _bn(planes, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, depth: int = 100, eps: float = MAGFACE_EPS):
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = _bn(64, eps)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip(WIDTHS, DEPTHS[depth], strict=True)):
            stage = [IBasicBlock(inplanes, planes, 2, eps)] + [IBasicBlock(planes, planes, 1, eps)
                                                                for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = _bn(512, eps)
        self.dropout = nn.Dropout2d(p=0.4)  # training only
        self.fc = nn.Linear(512 * 7 * 7, EMBEDDING)
        self.features = nn.BatchNorm1d(EMBEDDING, eps=eps, momentum=0.9)
        for m in self.modules():  # an untrained net whose activations stay finite over 100 layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,112,112), normalised as the checkpoint's record says -> unnormalised embedding (N,512)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        # flatten (not view): same C,H,W order, and it also takes channels_last tensors
        return self.features(self.fc(torch.flatten(x, 1)))


def build(depth: int = 100) -> IResNet:
    return IResNet(depth).eval()
