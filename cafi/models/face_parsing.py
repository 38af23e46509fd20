"""Face mask from a parsing network: which pixels belong to the face, and the masked crop."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cafi.models import bisenet, parsenet
from cafi.models.runtime import LoadedNet, autocast, maybe_compile, to_input, upload
from cafi.weights import Checkpoint

_ARCHS = {"bisenet": bisenet, "parsenet": parsenet}


def label_names(arch: str) -> tuple[str, ...]:
    return _ARCHS[arch].LABELS


def build(arch: str) -> torch.nn.Module:
    return _ARCHS[arch].build()


class FaceMasker(LoadedNet):
    def __init__(self, arch: str, ckpt: Checkpoint, cache_dir: str, device: torch.device,
                 face_labels: list[str], fill: list[int], input_size: int = 512,
                 precision: str = "fp32", storage=None, compile: bool = False):
        super().__init__(arch, lambda: build(arch), ckpt, cache_dir, device, precision, storage)  # compiled: logits
        self.arch = _ARCHS[arch]
        self.input_size = input_size
        self.logits = maybe_compile(lambda x: self.arch.logits(self.net, x), compile)
        names = label_names(arch)
        self.face_ids = torch.tensor([names.index(n) for n in face_labels], device=device)
        self.fill = list(fill)

    def _masks(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,3) on device -> bool (N,H,W) on device: pixels whose most likely class is a face label."""
        _, h, w, _ = pixels.shape
        x = to_input(pixels, self.device, self.record)
        if (h, w) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        with autocast(self.device, self.precision):
            out = self.logits(x)
        out = out.float()
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return torch.isin(out.argmax(dim=1), self.face_ids)

    @torch.inference_mode()
    def masks(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """bool (N,H,W): pixels whose most likely class is a face label."""
        return self._masks(upload(images, self.device)).cpu().numpy()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(face mask, bool (N,H,W) on the model's device; face area fraction (N,))."""
        mask = self._masks(upload(images, self.device))
        return mask, mask.float().mean(dim=(1, 2)).cpu().numpy()  # float32 already


def apply_mask(pixels: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, fill: list[int],
               device: torch.device) -> torch.Tensor:
    """uint8 (N,H,W,3) with every non-face pixel replaced by `fill`, on `device`. Done where the
    IQA model runs: on a GPU, numpy's masking of 384x384 crops would cost more than the model."""
    pixels, mask = upload(pixels, device), upload(mask, device).bool()  # uint8 between actors
    return torch.where(mask[..., None], pixels, torch.tensor(fill, dtype=torch.uint8, device=device))
