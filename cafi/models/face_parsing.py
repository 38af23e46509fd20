"""Face mask from a parsing network: which pixels belong to the face, and the masked crop."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cafi.models import bisenet, parsenet
from cafi.models.registry import published
from cafi.models.runtime import autocast, to_input
from cafi.weights import Checkpoint, load_into

_ARCHS = {"bisenet": bisenet, "parsenet": parsenet}


def label_names(arch: str) -> tuple[str, ...]:
    return _ARCHS[arch].LABELS


def build(arch: str) -> torch.nn.Module:
    return _ARCHS[arch].build()


class FaceMasker:
    def __init__(self, arch: str, ckpt: Checkpoint, cache_dir: str, device: torch.device,
                 face_labels: list[str], fill: list[int], input_size: int = 512,
                 precision: str = "fp32", storage=None):
        self.arch = _ARCHS[arch]
        self.record = published(arch)
        self.device = device
        self.precision = precision
        self.input_size = input_size
        self.net = load_into(build(arch), ckpt, cache_dir, storage).to(device).eval()
        names = label_names(arch)
        self.face_ids = torch.tensor([names.index(n) for n in face_labels], device=device)
        self.fill = np.asarray(fill, dtype=np.uint8)

    @torch.inference_mode()
    def masks(self, images: np.ndarray) -> np.ndarray:
        """bool (N,H,W): pixels whose most likely class is a face label."""
        _, h, w, _ = images.shape
        x = to_input(images, self.device, self.record)
        if (h, w) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        with autocast(self.device, self.precision):
            out = self.arch.logits(self.net, x)
        out = out.float()
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        labels = out.argmax(dim=1)
        return torch.isin(labels, self.face_ids).cpu().numpy()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(masked images uint8 (N,H,W,3), face area fraction (N,))."""
        mask = self.masks(images)
        masked = np.where(mask[..., None], images, self.fill)
        return masked.astype(np.uint8, copy=False), mask.mean(axis=(1, 2)).astype(np.float32)
