"""MUSIQ (Ke et al., ICCV 2021): pyiqa's `musiq` (KonIQ-10k weights, converted from Google's release).

The multi-scale patch encoding: the image at its own size and resized (aspect kept, bicubic) so its
longer side is 224 and 384, each cut into 32x32 patches (TF "SAME" zero padding at the edges). A
resized scale's sequence is padded (or cut) to ceil(side/32)^2 patches, padding masked out; the
original scale keeps every patch. Each patch goes through a small ResNet stem (weight-standardised
7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool, one bottleneck 64 -> 256) and is flattened (H, W, C
order, as TF) and projected to 384 (`embedding`). Each token gets a hash-based spatial embedding
(its patch's row and column mapped by nearest neighbour onto a 10x10 grid, whatever the scale's
patch count) and a scale embedding (0, 1 for 224, 384; 2 for the original); a class token is
prepended, 14 pre-norm transformer layers (6 heads, MLP 1152, LayerNorm eps 1e-6; masked tokens get
the logit -1000) run, and `head` (Linear 384 -> 1) of the final-normed class token is the score,
KonIQ-10k's MOS scale (~0..100, higher is better).

Input: RGB in [0, 1] mapped to [-1, 1] (mean = std = 0.5), any size. Module and parameter names
follow pyiqa's `musiq_arch.py`, so its checkpoint (a bare state dict) loads strictly.

`musiq_tiny` is the same network at toy widths (16-pixel patches, 32 channels) for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint


@dataclass(frozen=True)
class Dims:
    patch: int = 32
    sides: tuple[int, ...] = (224, 384)  # longer sides of the resized scales; the original comes last
    stem: int = 64  # stem channels (the bottleneck outputs 4x)
    hidden: int = 384
    mlp: int = 1152
    heads: int = 6
    layers: int = 14
    grid: int = 10  # hash grid of the spatial embedding


DIMS = {
    "musiq_koniq": Dims(),
    "musiq_tiny": Dims(patch=16, sides=(32, 64), stem=32, hidden=32, mlp=64, heads=2, layers=2),
}


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" zero padding (the odd pixel goes to the bottom / right)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class StdConv(nn.Conv2d):
    """Weight standardisation (zero mean, unit sample std per output filter, eps 1e-5), SAME padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(same_pad(x, self.kernel_size[0], self.stride[0]), w, self.bias, self.stride)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = StdConv(cin, cin, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv2 = StdConv(cin, cin, 3, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv3 = StdConv(cin, cout, 1, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-4)
        self.conv_proj = StdConv(cin, cout, 1, 1, bias=False)
        self.gn_proj = nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.gn_proj(self.conv_proj(x))
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return F.relu(self.gn3(self.conv3(x)) + identity)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        if not bool(mask.all()):  # padded tokens: the logit -1000 in both directions, as pyiqa
            pair = mask[:, None, :, None] & mask[:, None, None, :]
            logits = logits.masked_fill(~pair, -1e3)
        return self.out((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.norm1 = nn.LayerNorm(d.hidden, eps=1e-6)
        self.attention = Attention(d.hidden, d.heads)
        self.norm2 = nn.LayerNorm(d.hidden, eps=1e-6)
        self.mlp = Mlp(d.hidden, d.mlp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class SpatialEmbedding(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.position_emb = nn.Parameter(torch.empty(1, d.grid * d.grid, d.hidden).normal_(std=0.02))


class ScaleEmbedding(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.empty(len(d.sides) + 1, d.hidden).normal_(std=0.02))


class Encoder(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.posembed_input = SpatialEmbedding(d)
        self.scaleembed_input = ScaleEmbedding(d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d.hidden))
        self.encoder_norm = nn.LayerNorm(d.hidden, eps=1e-6)
        self.transformer = nn.ModuleDict({f"encoderblock_{i}": EncoderBlock(d) for i in range(d.layers)})

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.posembed_input.position_emb[0, spatial] + self.scaleembed_input.scale_emb[scale]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.transformer.values():
            x = block(x, mask)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.dims = d
        self.conv_root = StdConv(3, d.stem, 7, 2, bias=False)
        self.gn_root = nn.GroupNorm(32, d.stem, eps=1e-6)
        self.block1 = Bottleneck(d.stem, 4 * d.stem)
        self.embedding = nn.Linear(4 * d.stem * (d.patch // 4) ** 2, d.hidden)
        self.transformer_encoder = Encoder(d)
        self.head = nn.Linear(d.hidden, 1)

    def forward(self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """patches (B, L, 3, p, p), hashed positions, scale ids (B, L) long, mask (B, L) bool -> (B,)."""
        b, n = patches.shape[:2]
        x = F.relu(self.gn_root(self.conv_root(patches.flatten(0, 1))))
        x = F.max_pool2d(same_pad(x, 3, 2), 3, 2)
        x = self.block1(x).permute(0, 2, 3, 1).reshape(b, n, -1)  # (H, W, C) order: TF's flattening
        x = self.transformer_encoder(self.embedding(x), spatial, scale, mask)
        return self.head(x[:, 0]).squeeze(1)


def hashed_positions(grid: int, rows: int, cols: int) -> torch.Tensor:
    """Each patch's cell on the grid x grid hash: its row and column mapped by nearest neighbour."""
    g = torch.arange(grid, dtype=torch.float32).view(1, 1, grid)
    r = F.interpolate(g, size=rows, mode="nearest").view(-1)
    c = F.interpolate(g, size=cols, mode="nearest").view(-1)
    return (r[:, None] * grid + c[None, :]).reshape(-1).long()


def multiscale_patches(x: torch.Tensor, d: Dims) -> tuple[torch.Tensor, ...]:
    """Normalised (B, 3, H, W) -> patches (B, L, 3, p, p), spatial and scale ids (B, L), mask (B, L)."""
    b, c, h, w = x.shape
    parts = []
    for scale_id, side in enumerate([*sorted(d.sides), None]):
        if side is None:  # the original resolution: every patch
            image, limit = x, None
        else:
            ratio = side / max(h, w)
            image = F.interpolate(x, (round(h * ratio), round(w * ratio)), mode="bicubic", align_corners=False)
            limit = math.ceil(side / d.patch) ** 2
        rows, cols = (math.ceil(s / d.patch) for s in image.shape[-2:])
        p = F.unfold(same_pad(image, d.patch, d.patch), d.patch, stride=d.patch)  # (B, 3*p*p, L)
        p = p.transpose(1, 2).reshape(b, rows * cols, c, d.patch, d.patch)
        spatial = hashed_positions(d.grid, rows, cols).to(x.device).expand(b, -1)
        n = rows * cols
        keep = n if limit is None else min(n, limit)
        pad = 0 if limit is None else limit - keep
        parts.append((
            F.pad(p[:, :keep], (0, 0, 0, 0, 0, 0, 0, pad)),
            F.pad(spatial[:, :keep], (0, pad)),
            F.pad(torch.full((b, keep), scale_id, dtype=torch.long, device=x.device), (0, pad)),
            F.pad(torch.ones(b, keep, dtype=torch.bool, device=x.device), (0, pad)),
        ))
    return tuple(torch.cat(t, dim=1) for t in zip(*parts, strict=True))


def build(arch: str = "musiq_koniq") -> MUSIQ:
    return MUSIQ(DIMS[arch]).eval()


class MusiqScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False, arch: str = "musiq_koniq"):
        super().__init__(arch, lambda: build(arch), ckpt, cache_dir, device, precision, storage, compile)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB (N,H,W,3) -> MUSIQ score (N,) float32 (KonIQ-10k MOS scale, ~0..100)."""
        if len(images) == 0:
            return np.zeros(0, np.float32)
        x = to_input(images, self.device, self.record).contiguous()
        inputs = multiscale_patches(x, self.net.dims)
        with autocast(self.device, self.precision):
            score = self.forward(*inputs)
        return score.float().cpu().numpy()
