"""ArcFace IR-SE50 recognition net (facexlib `Backbone(50, drop_ratio, 'ir_se')`), split for SER-FIQ.

facexlib's output layer is BatchNorm2d -> Dropout -> Flatten -> Linear -> BatchNorm1d, then
L2 normalisation. Everything before the Dropout is the deterministic trunk; the rest is
the stochastic head that SER-FIQ repeats.
"""

from __future__ import annotations

import torch
from facexlib.recognition.arcface_arch import Backbone, bottleneck_IR_SE

ARCHS = ("arcface_ir_se50", "arcface_ir_se50_tiny")
# arcface_ir_se50_tiny (tests): facexlib's network with one IR-SE unit per stage instead of 3, 4, 14 and 3,
# the same stage widths, strides and key names; about a fifth of the trunk's compute.
_TINY_UNITS = ((64, 64), (64, 128), (128, 256), (256, 512))


def build(dropout: float = 0.5, arch: str = "arcface_ir_se50") -> Backbone:
    if arch not in ARCHS:
        raise ValueError(f"unknown SER-FIQ arch {arch!r}; known: {', '.join(ARCHS)}")
    net = Backbone(num_layers=50, drop_ratio=dropout, mode="ir_se")
    if arch == "arcface_ir_se50_tiny":
        net.body = torch.nn.Sequential(*(bottleneck_IR_SE(cin, depth, 2) for cin, depth in _TINY_UNITS))
    return net.eval()


def trunk(net: Backbone, x: torch.Tensor) -> torch.Tensor:
    """(N,3,112,112) -> flattened features entering the dropout, (N, 512*7*7)."""
    x = net.input_layer(x)
    x = net.body(x)
    x = net.output_layer[0](x)
    return x.flatten(1)


def head(net: Backbone, features: torch.Tensor, keep_mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Dropout with an explicit 0/1 keep mask (inverted scaling, as nn.Dropout) -> Linear -> BN -> L2."""
    if keep_mask is not None:
        features = features * keep_mask * (1.0 / (1.0 - dropout))
    emb = net.output_layer[4](net.output_layer[3](features))
    return torch.nn.functional.normalize(emb, dim=1)
