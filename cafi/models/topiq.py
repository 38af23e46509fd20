"""TOPIQ face (Chen et al., TIP 2024): pyiqa's `topiq_nr-face`, a CFANet on a ResNet-50.

No-reference CFANet as pyiqa builds it for `topiq_nr-face` (inter_dim 256, 4 heads, one attention
layer per block, feed-forward 1024, GELU, no output activation). Module names and shapes follow
pyiqa's `archs/topiq_arch.py`, so its published checkpoints (whole state dict under `params`,
backbone included) load strictly:

- `semantic_model`: ResNet-50 without its head; features are the stem's ReLU output (before the
  max-pool) and layer1..layer4 (64, 256, 512, 1024, 2048 channels). pyiqa builds it with timm
  (`features_only=True`), whose parameter names are torchvision's minus `fc`; here it is
  torchvision's resnet50(weights=None), so nothing is downloaded.
- per level i: `weight_pool.i` (gated pooling: a 1x1 conv splits C into 2C; the first half
  through GELU, times a sigmoid weight map computed from the second half), average-pooled to the
  size of the last level, `dim_reduce.i` (1x1 conv to 256 + GELU), plus a positional embedding
  (`h_emb`/`w_emb`, bicubically resized), then `sa_attn_blks.i` (a pre-norm self-attention layer).
- coarse to fine: the layer4 tokens attend to layer3's, then layer2's, layer1's and the stem's
  (`attn_blks.0..3`, pre-norm cross-attention layers), then `attn_pool` (self-attention), the
  mean over tokens and `score_linear` (LN, Linear, GELU, LN, Linear, GELU, Linear -> 1).

Input: RGB in [0, 1], ImageNet mean/std, a 512x512 FFHQ-aligned face (pyiqa resizes the shorter
side to 512). Output: quality on the CGFIQA MOS scale (~0..1, higher is better), no squashing.
Inference only: dropout is left out (it has no parameters).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint

CHANNELS = (64, 256, 512, 1024, 2048)  # stem, layer1..layer4
DIM, HEADS, FEEDFORWARD = 256, 4, 1024
TEST_SIZE = 512


class ResNet50Features(nn.Module):
    """torchvision's ResNet-50 trunk: the stem's ReLU output and each stage's output."""

    def __init__(self):
        super().__init__()
        net = torchvision.models.resnet50(weights=None)  # architecture only
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def _attention() -> nn.MultiheadAttention:
    # batch-first tokens (N, L, E); the parameter names do not depend on the layout
    return nn.MultiheadAttention(DIM, HEADS, batch_first=True)


class SelfAttentionLayer(nn.Module):
    """Pre-norm: x + MHA(LN1(x)); then x + Linear2(GELU(Linear1(LN2(x))))."""

    def __init__(self):
        super().__init__()
        self.self_attn = _attention()
        self.linear1 = nn.Linear(DIM, FEEDFORWARD)
        self.linear2 = nn.Linear(FEEDFORWARD, DIM)
        self.norm1 = nn.LayerNorm(DIM)
        self.norm2 = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class CrossAttentionLayer(nn.Module):
    """Pre-norm: q + MHA(LN1(q), LN2(memory)); then q + Linear2(GELU(Linear1(LN3(q))))."""

    def __init__(self):
        super().__init__()
        # pyiqa's layer declares a self-attention it never calls; its weights are in the
        # checkpoints, so it must exist for a strict load.
        self.self_attn = _attention()
        self.multihead_attn = _attention()
        self.linear1 = nn.Linear(DIM, FEEDFORWARD)
        self.linear2 = nn.Linear(FEEDFORWARD, DIM)
        self.norm1 = nn.LayerNorm(DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.norm3 = nn.LayerNorm(DIM)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        m = self.norm2(memory)
        q = q + self.multihead_attn(self.norm1(q), m, m, need_weights=False)[0]
        return q + self.linear2(F.gelu(self.linear1(self.norm3(q))))


class Stack(nn.Module):
    """pyiqa wraps each block in a one-layer stack (the `.layers.0.` in the key names)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, x: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, *memory)
        return x


class GatedPool(nn.Module):
    """GELU(first half of a 1x1 conv) times a sigmoid weight map from the second half."""

    def __init__(self, channels: int):
        super().__init__()
        self.splitconv = nn.Conv2d(channels, 2 * channels, 1)
        self.weight_blk = nn.Sequential(
            nn.Conv2d(channels, 64, 1), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 1, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.splitconv(x).chunk(2, dim=1)
        return F.gelu(value) * self.weight_blk(gate)


class CFANet(nn.Module):
    def __init__(self):
        super().__init__()
        # own parameters first, as in pyiqa's state dict: (1,128,32,1) and (1,128,1,32)
        self.h_emb = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, DIM // 2, 32, 1), std=0.02))
        self.w_emb = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, DIM // 2, 1, 32), std=0.02))
        self.semantic_model = ResNet50Features()
        self.sa_attn_blks = nn.ModuleList(Stack(SelfAttentionLayer()) for _ in CHANNELS)
        self.dim_reduce = nn.ModuleList(nn.Sequential(nn.Conv2d(c, DIM, 1), nn.GELU()) for c in CHANNELS)
        self.weight_pool = nn.ModuleList(GatedPool(c) for c in CHANNELS)
        self.attn_blks = nn.ModuleList(Stack(CrossAttentionLayer()) for _ in CHANNELS[1:])
        self.attn_pool = SelfAttentionLayer()
        self.score_linear = nn.Sequential(
            nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.GELU(),
            nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.GELU(),
            nn.Linear(DIM, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N,3,H,W) -> quality (N,)."""
        feats = self.semantic_model(x)
        th, tw = feats[-1].shape[-2:]
        pos = torch.cat((self.h_emb.expand(-1, -1, -1, self.w_emb.shape[3]),
                         self.w_emb.expand(-1, -1, self.h_emb.shape[2], -1)), dim=1)  # (1,256,32,32)
        tokens = []
        for i in reversed(range(len(CHANNELS))):  # layer4 first
            f = self.weight_pool[i](feats[i])
            if f.shape[2] > th and f.shape[3] > tw:
                f = F.adaptive_avg_pool2d(f, (th, tw))
            p = F.interpolate(pos, size=f.shape[2:], mode="bicubic", align_corners=False)
            t = self.dim_reduce[i](f).flatten(2).transpose(1, 2) + p.flatten(2).transpose(1, 2)  # (N, h*w, 256)
            tokens.append(self.sa_attn_blks[i](t))
        q = tokens[0]
        for block, memory in zip(self.attn_blks, tokens[1:], strict=True):
            q = block(q, memory)
        return self.score_linear(self.attn_pool(q).mean(dim=1)).squeeze(1)


def build() -> CFANet:
    return CFANet().eval()


class TopiqFaceScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False):
        super().__init__("topiq_nr_face", build, ckpt, cache_dir, device, precision, storage, compile)

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB (N,512,512,3) FFHQ-aligned faces -> quality (N,) float32 (~0..1, higher is better).
        Another size is resized as pyiqa does: shorter side to 512, bilinear with antialiasing."""
        if len(faces) == 0:
            return np.zeros(0, np.float32)
        x = to_input(faces, self.device, self.record)
        h, w = x.shape[-2:]
        if min(h, w) != TEST_SIZE:
            long = int(TEST_SIZE * max(h, w) / min(h, w))  # torchvision's rounding of the long side
            size = (TEST_SIZE, long) if h <= w else (long, TEST_SIZE)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        with autocast(self.device, self.precision):
            score = self.forward(x)
        return score.float().cpu().numpy()
