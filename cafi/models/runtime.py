"""Device, precision and tensor plumbing shared by the model wrappers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from cafi.models.registry import Pretrained, published
from cafi.weights import Checkpoint, build_loaded

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


def prepare(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On the device, in eval mode; on CUDA with channels_last weights: inputs come channels_last
    (to_input), which cuDNN's tensor-core convolutions read without a transpose. (On CPU the
    input's layout already decides oneDNN's, and facexlib's own forward keeps working.)"""
    net = net.to(device).eval()
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """`models.compile`: torch.compile a model's forward. The first batch of each new batch size
    pays the compilation (tens of seconds per model); later batches run the fused kernels."""
    return torch.compile(fn) if enabled else fn


class LoadedNet:
    """What every scorer's wrapper does first: its published record, its network built by `builder`
    and loaded from the verified checkpoint (cafi/weights.py), on the device in eval mode, its forward
    compiled where `models.compile` asks. A wrapper adds only its preprocessing and its call."""

    def __init__(self, arch: str, builder: Callable[[], torch.nn.Module], ckpt: Checkpoint, cache_dir: str,
                 device: torch.device, precision: str = "fp32", storage=None, compile: bool = False):
        self.record: Pretrained = published(arch)
        self.device = device
        self.precision = precision
        self.net = prepare(build_loaded(builder, ckpt, cache_dir, storage), device)
        self.forward = maybe_compile(self.net, compile)


def autocast(device: torch.device, precision: str):
    """fp16/bf16 autocast on CUDA only; CPU always runs fp32."""
    if device.type == "cuda" and precision in _DTYPES:
        return torch.autocast("cuda", dtype=_DTYPES[precision])
    return contextlib.nullcontext()


def upload(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N,H,W,3) -> the same uint8 tensor on device: a quarter of the bytes of a float copy,
    through pinned memory on CUDA (PyTorch's caching host allocator hands the same pinned blocks
    back batch after batch), copied without blocking the host. A tensor already there stays."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def to_host(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """numpy on the host, whatever device the values are on."""
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else values


def to_input(images: np.ndarray | torch.Tensor, device: torch.device, record: Pretrained) -> torch.Tensor:
    """uint8 RGB (N,H,W,3) -> normalised float (N,3,H,W) on device, in the record's channel order."""
    tensor = images if isinstance(images, torch.Tensor) else upload(images, device)
    x = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    if record.channel_order == "bgr":
        x = x.flip(1)
    # mean/std are given in the model's own channel order
    mean = torch.tensor(record.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(record.std, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
