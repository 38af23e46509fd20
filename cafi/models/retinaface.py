"""RetinaFace face detector (facexlib architecture: resnet50 or mobile0.25), batched.

Crops hold one face, so each image keeps its most confident detection; that detection
always survives NMS, so no NMS is needed and the whole batch decodes in tensor ops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from facexlib.detection.retinaface import RetinaFace
from facexlib.detection.retinaface_utils import PriorBox, batched_decode, batched_decode_landm

from cafi.models.runtime import LoadedNet, autocast, to_input
from cafi.weights import Checkpoint

ARCHS = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobile0.25"}


def build(arch: str, device: torch.device | str = "cpu") -> RetinaFace:
    """The bare facexlib architecture, randomly initialised, in eval mode."""
    with warnings.catch_warnings():  # facexlib still passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = RetinaFace(network_name=ARCHS[arch], half=False, phase="test", device=torch.device(device))
    return net.eval()


@dataclass
class Detections:
    score: np.ndarray  # (N,) best face confidence, 0 where nothing was found
    box: np.ndarray  # (N, 4) x1, y1, x2, y2 in input pixels
    landmarks: np.ndarray  # (N, 5, 2) eyes, nose, mouth corners in input pixels


class FaceDetector(LoadedNet):
    def __init__(self, arch: str, ckpt: Checkpoint, cache_dir: str, device: torch.device,
                 precision: str = "fp32", storage=None, compile: bool = False):
        super().__init__(arch, lambda: build(arch, "cpu"), ckpt, cache_dir, device, precision, storage, compile)
        self.net.device = device
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    def _priors_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._priors:
            pb = PriorBox(self.net.cfg, image_size=(h, w), phase="test")
            self._priors[(h, w)] = pb.forward().to(self.device).unsqueeze(0)
        return self._priors[(h, w)]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Detections:
        """images: uint8 RGB (N,H,W,3), all the same size."""
        n, h, w, _ = images.shape
        x = to_input(images, self.device, self.record)
        with autocast(self.device, self.precision):
            loc, conf, landm = self.forward(x)
        loc, conf, landm = loc.float(), conf.float(), landm.float()
        priors = self._priors_for(h, w)
        variance = self.net.cfg["variance"]
        scores, best = conf[:, :, 1].max(dim=1)
        idx = torch.arange(n, device=self.device)
        boxes = batched_decode(loc[idx, best].unsqueeze(1), priors[:, best].transpose(0, 1), variance)[:, 0]
        lms = batched_decode_landm(landm[idx, best].unsqueeze(1), priors[:, best].transpose(0, 1), variance)[:, 0]
        scale = torch.tensor([w, h], dtype=torch.float32, device=self.device)
        boxes = boxes.view(n, 2, 2) * scale
        lms = lms.view(n, 5, 2) * scale
        return Detections(
            score=scores.cpu().numpy().astype(np.float32),
            box=boxes.reshape(n, 4).cpu().numpy().astype(np.float32),
            landmarks=lms.cpu().numpy().astype(np.float32),
        )
