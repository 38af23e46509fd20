"""Decode, inside the model actor: encoded bytes -> square RGB crops of `image.crop_size`.

Where the actor holds a GPU, baseline JPEGs (most crops) are decoded there in batches (nvJPEG
through torchvision) and square-padded and resized on the device; the pixels never cross the
PCIe bus. Everything else -- PNG, WebP, BMP, TIFF, 16-bit, CMYK, progressive JPEG, and every
CUDA-less run -- decodes on the actor's CPU threads (Pillow and OpenCV release the GIL), with the
same checks and error texts as before: a file that passed the header check but fails to decode
becomes an error row.

The device resize reproduces the host's (OpenCV's INTER_AREA shrink exactly, its bicubic
enlargement to one level); JPEG decoders differ by a level or two (nvJPEG's IDCT is not
libjpeg-turbo's). tests/test_decode.py measures what the device path does to pixels and scores.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cafi import imaging
from cafi.config import ImageConfig
from cafi.decision import ERROR, OK

log = logging.getLogger("cafi")

_DEVICE_FORMATS = {"JPEG"}
_DEVICE_MODES = {"RGB", "L"}


def area_weights(src: int, dst: int, device=None, start: int = 0, count: int | None = None):
    """(dst, count) weights of OpenCV's INTER_AREA shrink, for the source pixels start .. start+count
    (default: all): each output pixel averages the input pixels its footprint covers, partly covered
    ones by the covered fraction. Applied as two matrix products it reproduces
    cv2.resize(..., INTER_AREA) to the rounding."""
    import torch

    count = src - start if count is None else count
    scale = src / dst
    i = torch.arange(dst, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(start, start + count, dtype=torch.float64, device=device)[None, :]
    overlap = torch.minimum((i + 1) * scale, j + 1)
    overlap -= torch.maximum(i * scale, j)
    return overlap.clamp_(min=0).div_(scale).float()


def square_resize_tensor(chw, size: int):
    """uint8 (3,H,W) tensor -> uint8 (size,size,3) on the tensor's device, as imaging.square_resize
    does on the host: a centred black square pad, then INTER_AREA's shrink (as matrix products)
    or a bicubic enlargement (INTER_CUBIC's kernel, a = -0.75).

    A shrink never makes the square canvas (its padding only multiplies zeros): the weights of the
    rows and columns the image covers, applied longer side first. Memory: the image, its float
    copy, weights of size x (H + W) and a (3, size, shorter side) product -- never max(H, W)^2.
    A canvas is made only for an enlargement, where it is at most size x size."""
    import torch
    import torch.nn.functional as F

    _, h, w = chw.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if side > size:
        x = chw.float()
        rows = area_weights(side, size, chw.device, top, h)     # (size, h)
        cols = area_weights(side, size, chw.device, left, w).T  # (w, size)
        x = rows @ (x @ cols) if w >= h else (rows @ x) @ cols
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
    if h != w:
        canvas = torch.zeros((3, side, side), dtype=chw.dtype, device=chw.device)
        canvas[:, top:top + h, left:left + w] = chw
        chw = canvas
    if side != size:
        x = F.interpolate(chw.float()[None], size=(size, size), mode="bicubic", align_corners=False)[0]
        chw = x.round_().clamp_(0, 255).to(torch.uint8)
    return chw.permute(1, 2, 0)


class Decode:
    """Fills `image` (N,S,S,3) uint8 -- a numpy array, or a CUDA tensor when decoded on the GPU --
    from `data`, for the rows still in flight that carry bytes."""

    def __init__(self, image_cfg: ImageConfig, device, threads: int = 2, jpeg_batches: bool | None = None):
        """`jpeg_batches`: decode baseline JPEGs as one torchvision batch on `device` (default: when
        the device is CUDA; forced on a CPU device, the same code path runs with libjpeg-turbo)."""
        self.cfg = image_cfg
        self.device = device
        self.jpeg_batches = (device is not None and device.type == "cuda") if jpeg_batches is None else jpeg_batches
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cafi-decode")

    def __call__(self, batch: dict) -> dict:
        data = batch.pop("data", None)
        n, size = len(batch["uri"]), self.cfg.crop_size
        rows = [i for i in range(n) if batch["status"][i] == OK and data is not None and len(data[i])]
        on_device = self.jpeg_batches
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        host_rows = rows
        if on_device:
            host_rows, device_images = self._decode_on_device(batch, data, rows)
        for i, dec in zip(host_rows, self.pool.map(lambda i: imaging.decode(data[i], self.cfg), host_rows),
                          strict=True):
            self._record(batch, i, dec.width, dec.height, dec.error)
            if dec.error is None:
                images[i] = dec.image
        if on_device:
            from cafi.models.runtime import upload

            pixels = upload(images, self.device)
            for i, img in device_images.items():
                pixels[i] = img
            batch["image"] = pixels
        else:
            batch["image"] = images
        return batch

    @staticmethod
    def _record(batch: dict, i: int, width: int, height: int, error: str | None) -> None:
        if width or height:
            batch["width"][i], batch["height"][i] = width, height
        if error is not None:
            batch["status"][i], batch["error"][i] = ERROR, error

    def _decode_on_device(self, batch: dict, data, rows: list[int]) -> tuple[list[int], dict]:
        """Baseline RGB/grey JPEGs in one nvJPEG batch; returns the rows left to the CPU and the
        device crops by row. A batch the device refuses goes to the CPU whole (per-row reasons)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = []
        for i in rows:
            head = imaging.probe(data[i], self.cfg)
            if head.error is None and head.format in _DEVICE_FORMATS and head.mode in _DEVICE_MODES \
                    and not head.progressive:
                jpeg.append(i)
        if not jpeg:
            return rows, {}
        try:
            encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpeg]
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            crops = {}
            for i, chw in zip(jpeg, decoded, strict=True):
                self._record(batch, i, int(chw.shape[2]), int(chw.shape[1]), None)
                crops[i] = square_resize_tensor(chw, self.cfg.crop_size)
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt file in the batch: the CPU gives per-row reasons
            log.debug("device JPEG decode fell back to the CPU for %d files: %s", len(jpeg), exc)
            return rows, {}
        done = set(jpeg)
        return [i for i in rows if i not in done], crops
