"""MANIQA (Yang et al., CVPRW 2022, NTIRE 2022 NR-IQA winner): pyiqa's `maniqa` (KonIQ-10k weights).

A ViT-B/8 (timm's `vit_base_patch8_224`, built without weights: ours come only from the checkpoint)
sees 224x224 crops; the tokens of its blocks 6..9 (class token dropped) are concatenated (4 x 768
channels) and refined in two stages, each: `tablock*` (two transposed-attention blocks: attention
between channels, computed over the tokens), a 1x1 conv (`conv1`: 3072 -> 768, `conv2`: 768 ->
384) and `swintransformer*` (two Swin layers of two window-attention blocks each, window 4, the
second block shifted by 2, each layer followed by a 3x3 conv + ReLU and added back scaled by 0.8 --
pyiqa's `scale` for the KonIQ-10k weights). Every token then gets a score (`fc_score`, ReLU) and a
weight (`fc_weight`, sigmoid); the image's score is the weighted mean over the tokens of all its
crops.

Test time, as pyiqa: RGB in [0, 1] normalised with mean = std = 0.5; `crops` 224-pixel crops on a
uniform grid (pyiqa's `test_sample`, 20: a ceil(sqrt(k)) x ceil(sqrt(k)) grid whose step is
(side - 224) // floor(sqrt(k)), the first k in row order); a side of 224 or less is first scaled
bilinearly so the shorter side is 225. Module and parameter names follow pyiqa's `maniqa_arch.py` and
`maniqa_swin.py`, so its checkpoint (a bare state dict) loads strictly. Blocks 10 and 11 and the
ViT's final norm and head are in the checkpoint but never change the score: they are kept (strict
load) and not run. Output ~0..1, higher is better.

`maniqa_tiny` is the same network at toy widths (64-pixel crops, 32 channels) for tests.
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

FEATURE_BLOCKS = (6, 7, 8, 9)  # ViT blocks whose tokens MANIQA reads


@dataclass(frozen=True)
class Dims:
    crop: int  # side of the crops the ViT sees
    vit: dict  # timm overrides of vit_base_patch8_224 (patch 8, depth 12)
    dim: int  # ViT width
    window: int = 4
    swin_heads: int = 4
    swin_depth: int = 2  # blocks per Swin layer (two layers per stage)
    scale: float = 0.8  # pyiqa's `scale` for the KonIQ-10k (and KADID) weights
    patch: int = 8

    @property
    def grid(self) -> int:
        return self.crop // self.patch


_FULL = Dims(crop=224, vit={}, dim=768)
_TINY = Dims(crop=64, vit={"img_size": 64, "embed_dim": 32, "num_heads": 2}, dim=32, swin_heads=2)
DIMS = {
    "maniqa_koniq": _FULL, "maniqa_tiny": _TINY,
    # the SDD-FIQA regressor with MANIQA in place of the IR-50 (cafi train sddfiqa --backbone maniqa)
    "sddfiqa_maniqa": _FULL, "sddfiqa_maniqa_tiny": _TINY,
}


class TABlock(nn.Module):
    """Transposed attention: channels attend to channels (the linear maps act on the token axis), then
    pyiqa's transpose + reshape of the result (kept as is: the weights were trained with it)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.c_q = nn.Linear(tokens, tokens)
        self.c_k = nn.Linear(tokens, tokens)
        self.c_v = nn.Linear(tokens, tokens)
        self.scale = tokens**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, N) -> (B, C, N)."""
        b, c, n = x.shape
        attn = (self.c_q(x) @ self.c_k(x).transpose(-2, -1) * self.scale).softmax(dim=-1)
        return (attn @ self.c_v(x)).transpose(1, 2).reshape(b, c, n) + x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row order."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindow(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    b = x.shape[0] // ((h // w) * (wd // w))
    return x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learnt bias per relative offset."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, w*w)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (windows*B, N, C); mask: (windows, N, N) of 0 / -100 or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # windows of the same image share the mask; the batch varies slowest
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(bw // nw, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, grid: int, window: int, heads: int, shift: int, hidden: int):
        super().__init__()
        if grid <= window:  # one window covers the map: no shift (as pyiqa)
            window, shift = grid, 0
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.register_buffer("attn_mask", self._shift_mask() if shift else None)

    def _shift_mask(self) -> torch.Tensor:
        """0 between tokens of the same region of the rolled map, -100 across regions."""
        g, w, s = self.grid, self.window, self.shift
        region = torch.zeros(1, g, g, 1)
        bands = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for i, (hs, ws) in enumerate((hs, ws) for hs in bands for ws in bands):
            region[:, hs, ws, :] = i
        ids = _windows(region, w).squeeze(-1)  # (windows, w*w)
        diff = ids.unsqueeze(1) - ids.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C)."""
        b, n, c = x.shape
        g = self.grid
        h = self.norm1(x).view(b, g, g, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = _unwindow(self.attn(_windows(h, self.window), self.attn_mask), self.window, g, g)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """Window-attention blocks (every second one shifted), then a 3x3 conv + ReLU on the map."""

    def __init__(self, dim: int, d: Dims):
        super().__init__()
        self.grid = d.grid
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, d.grid, d.window, d.swin_heads, 0 if i % 2 == 0 else d.window // 2, d.dim)
            for i in range(d.swin_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        b, n, c = x.shape
        x = F.relu(self.conv(x.transpose(1, 2).reshape(b, c, self.grid, self.grid)))
        return x.flatten(2).transpose(1, 2)


class SwinStage(nn.Module):
    """Two Swin layers, each added back scaled: x = scale * layer(x) + x, on a (B, C, H, W) map."""

    def __init__(self, dim: int, d: Dims):
        super().__init__()
        self.scale = d.scale
        # pyiqa builds a stride-2 conv here and never calls it; it is in the checkpoint (strict load)
        self.downsample = nn.Conv2d(dim, dim, 3, 2, 1)
        self.layers = nn.ModuleList(SwinLayer(dim, d) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


def _head(dim: int, last: nn.Module) -> nn.Sequential:
    # index 2 is pyiqa's dropout (no parameters): the keys are `.0.` and `.3.`
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.0), nn.Linear(dim, 1), last)


class MANIQA(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        import timm

        self.dims = d
        tokens = d.grid**2
        # architecture only: no pretrained weights, and timm's own initialisation (10 s of trunc_normal_
        # on a CPU, all overwritten by the checkpoint) skipped; the two embeddings it would leave
        # uninitialised get timm's values, so a random network (`cafi weights synth`) stays finite
        self.vit = timm.create_model("vit_base_patch8_224", pretrained=False, weight_init="skip", **d.vit)
        nn.init.trunc_normal_(self.vit.pos_embed, std=0.02)
        nn.init.normal_(self.vit.cls_token, std=1e-6)
        self.tablock1 = nn.ModuleList(TABlock(tokens) for _ in range(2))
        self.conv1 = nn.Conv2d(4 * d.dim, d.dim, 1)
        self.swintransformer1 = SwinStage(d.dim, d)
        self.tablock2 = nn.ModuleList(TABlock(tokens) for _ in range(2))
        self.conv2 = nn.Conv2d(d.dim, d.dim // 2, 1)
        self.swintransformer2 = SwinStage(d.dim // 2, d)
        self.fc_score = _head(d.dim // 2, nn.ReLU())
        self.fc_weight = _head(d.dim // 2, nn.Sigmoid())

    def vit_features(self, x: torch.Tensor) -> torch.Tensor:
        """Crops (B, 3, crop, crop) -> the patch tokens of blocks 6..9 side by side (B, N, 4C)."""
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        out = []
        for i, block in enumerate(v.blocks[: FEATURE_BLOCKS[-1] + 1]):
            x = block(x)
            if i in FEATURE_BLOCKS:
                out.append(x[:, v.num_prefix_tokens:])
        return torch.cat(out, dim=2)

    def forward(self, crops: torch.Tensor, per_image: int) -> torch.Tensor:
        """Normalised crops (N*per_image, 3, crop, crop), each image's together -> quality (N,)."""
        g = self.dims.grid
        x = self.vit_features(crops).transpose(1, 2)  # (B, 4C, N)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.reshape(x.shape[0], -1, g, g)))
        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.reshape(x.shape[0], -1, g, g)))
        x = x.flatten(2).transpose(1, 2)  # (B, N, C/2)
        n = crops.shape[0] // per_image
        score = self.fc_score(x).reshape(n, -1)
        weight = self.fc_weight(x).reshape(n, -1)
        return (weight * score).sum(dim=-1) / (weight.sum(dim=-1) + 1e-8)


def uniform_crops(x: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """pyiqa's test-time crops: (N, 3, H, W) -> (N*k, 3, size, size), each image's k crops together."""
    h, w = x.shape[-2:]
    if min(h, w) <= size:
        x = F.interpolate(x, scale_factor=(size + 1) / min(h, w), mode="bilinear")
        h, w = x.shape[-2:]
    step_h, step_w = (h - size) // math.isqrt(k), (w - size) // math.isqrt(k)
    side = math.ceil(math.sqrt(k))
    corners = [(i * step_h, j * step_w) for i in range(side) for j in range(side)][:k]
    crops = torch.stack([x[..., t:t + size, s:s + size] for t, s in corners], dim=1)
    return crops.reshape(-1, x.shape[1], size, size)


def build(arch: str = "maniqa_koniq") -> MANIQA:
    return MANIQA(DIMS[arch]).eval()


class FaceRegressor(MANIQA):
    """The seed team's SDD-FIQA variant: MANIQA in place of the IR-50 regressor, on the aligned 112x112
    face (normalised as both do, mean = std = 0.5) scaled bilinearly to one crop of the ViT's side; the
    regressor's output is MANIQA's score head (the weighted mean of its per-token scores), trained on the
    0..100 pseudo-labels. Same module names as MANIQA: its state dict is a MANIQA checkpoint."""

    def forward(self, faces: torch.Tensor, per_image: int = 1) -> torch.Tensor:
        """Normalised faces (N, 3, h, w) -> quality (N,)."""
        size = self.dims.crop
        if faces.shape[-2:] != (size, size):
            faces = F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False)
        return super().forward(faces, per_image)


def build_regressor(arch: str = "sddfiqa_maniqa") -> FaceRegressor:
    return FaceRegressor(DIMS[arch]).eval()


class FaceRegressorScorer(LoadedNet):
    """The sddfiqa stage's scorer for the MANIQA-backbone regressor (models.sddfiqa.arch: sddfiqa_maniqa)."""

    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False, arch: str = "sddfiqa_maniqa"):
        super().__init__(arch, lambda: build_regressor(arch), ckpt, cache_dir, device, precision, storage, compile)

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB (N,112,112,3) aligned faces -> the regressed SDD-FIQA score (N,) float32 (~0..100)."""
        if len(faces) == 0:
            return np.zeros(0, np.float32)
        x = to_input(faces, self.device, self.record).contiguous()
        with autocast(self.device, self.precision):
            score = self.forward(x)
        return score.float().cpu().numpy()


class ManiqaScorer(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, precision: str = "fp32",
                 storage=None, compile: bool = False, arch: str = "maniqa_koniq", crops: int = 20):
        super().__init__(arch, lambda: build(arch), ckpt, cache_dir, device, precision, storage, compile)
        self.crops = crops

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB (N,H,W,3) -> MANIQA score (N,) float32 (~0..1). One image's crops per forward:
        20 crops of 785 tokens are already a full batch, and memory stays flat."""
        out = np.zeros(len(images), np.float32)
        for i in range(len(images)):
            x = to_input(images[i:i + 1], self.device, self.record).contiguous()
            with autocast(self.device, self.precision):
                score = self.forward(uniform_crops(x, self.net.dims.crop, self.crops), self.crops)
            out[i] = score.float().item()
        return out
