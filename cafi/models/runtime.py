"""Device, precision and tensor plumbing shared by the model wrappers."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cafi.models.registry import Pretrained

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str, num_gpus: float) -> torch.device:
    """auto: CUDA when this actor holds a GPU and CUDA works, else CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and num_gpus > 0):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if requested == "cuda":
            raise RuntimeError("models.device is cuda but torch.cuda.is_available() is False")
    return torch.device("cpu")


def configure_torch(device: torch.device, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, precision: str):
    """fp16/bf16 autocast on CUDA only; CPU always runs fp32."""
    if device.type == "cuda" and precision in _DTYPES:
        return torch.autocast("cuda", dtype=_DTYPES[precision])
    return contextlib.nullcontext()


def to_input(images: np.ndarray, device: torch.device, record: Pretrained) -> torch.Tensor:
    """uint8 RGB (N,H,W,3) -> normalised float (N,3,H,W) on device, in the record's channel order."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    x = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    if record.channel_order == "bgr":
        x = x.flip(1)
    # mean/std are given in the model's own channel order
    mean = torch.tensor(record.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(record.std, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
