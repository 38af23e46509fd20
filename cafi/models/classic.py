"""The score-based FQA classifier (after "Score based Face Quality Assessment (FQA)" and the seed's
implementation of it): per feature kind (GIST, CNN, HOG, LBP) an autoencoder to CODE = 50 values, the
four codes concatenated (200 values) and reduced again by a joint autoencoder to JOINT values, then a
softmax layer over good / average / bad.

Each kind's input is standardised with the training set's mean and standard deviation (buffers in the
checkpoint, so scoring needs nothing but the file). Encoders end in a sigmoid, as the stacked
autoencoders of the method (MATLAB trainAutoencoder's logistic transfer); decoders are linear. The
decoders are kept in the checkpoint (the pretraining's reconstruction can be checked from it).

The checkpoint (`cafi train classic`): {"state_dict": tensors, "meta": {classes, kinds, dims, code,
joint, features, embedding_model, ...}}, loaded with torch.load(weights_only=True). The score the
scorer writes is P(good) + 0.5 P(average), in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cafi.classic.features import DIMS, KINDS

CLASSES = ("good", "average", "bad")
CODE = 50  # each kind's code (the method's)
JOINT = 32  # the joint autoencoder's code (the method leaves it open; ours)
WEIGHT_OF = {"good": 1.0, "average": 0.5, "bad": 0.0}  # the score: sum of P(class) * weight


class Autoencoder(nn.Module):
    """Standardise (buffers), encode to `code` values in (0, 1), decode linearly back."""

    def __init__(self, dim: int, code: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.encoder = nn.Linear(dim, code)
        self.decoder = nn.Linear(code, dim)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.encoder(self.standardise(x)))

    def reconstruction_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the standardised input's reconstruction."""
        return nn.functional.mse_loss(self.decoder(self.encode(x)), self.standardise(x))

    def fit_scale(self, x: torch.Tensor) -> None:
        """Set the standardisation from the training set (constant features get std 1)."""
        std = x.std(dim=0)
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


class ClassicFqa(nn.Module):
    def __init__(self, dims: dict[str, int] | None = None, code: int = CODE, joint: int = JOINT):
        super().__init__()
        dims = dict(DIMS if dims is None else dims)
        self.kinds = tuple(dims)
        self.kind_ae = nn.ModuleDict({k: Autoencoder(d, code) for k, d in dims.items()})
        self.joint_ae = Autoencoder(code * len(dims), joint)
        self.classifier = nn.Linear(joint, len(CLASSES))

    def codes(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The concatenated per-kind codes (N, code * kinds)."""
        return torch.cat([self.kind_ae[k].encode(feats[k]) for k in self.kinds], dim=1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """kind -> (N, dim) features -> class logits (N, 3) in CLASSES order."""
        return self.classifier(self.joint_ae.encode(self.codes(feats)))


def build(dims: dict[str, int] | None = None) -> ClassicFqa:
    return ClassicFqa(dims).eval()


def score_of(probabilities: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3) class probabilities in CLASSES order -> P(good) + 0.5 P(average), float32 in [0, 1]."""
    p = np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor) else probabilities)
    weights = np.array([WEIGHT_OF[c] for c in CLASSES], dtype=np.float64)
    return np.clip(p.astype(np.float64) @ weights, 0.0, 1.0).astype(np.float32)


def as_tensors(feats: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v, np.float32), device=device) for k, v in feats.items()}


def checkpoint_object(net: ClassicFqa, meta: dict) -> dict:
    """What `cafi train classic` saves: tensors and plain values only (torch.load weights_only reads it)."""
    return {"state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
            "meta": {"classes": list(CLASSES), "kinds": list(net.kinds), **meta}}


def synth_checkpoint() -> dict:
    """A random classifier in the checkpoint's layout (`cafi weights synth`)."""
    torch.manual_seed(0)
    return checkpoint_object(build(), {"synthetic": True, "embedding_model": None})


def trained_recognizer(path: str) -> dict | None:
    """The recognizer (stage, arch, sha256) whose embeddings a checkpoint's CNN feature was trained on;
    None when it does not say (a synthetic checkpoint, or a run that recorded none)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    model = meta.get("embedding_model") if isinstance(meta, dict) else None
    return model if isinstance(model, dict) else None


class ClassicScorer:
    """The trained classifier of a checkpoint: features -> score, on the CPU (a few small matrices)."""

    def __init__(self, ckpt, cache_dir: str, device: torch.device, storage=None, **_ignored):
        from cafi.errors import WeightsError
        from cafi.redact import redact_uri
        from cafi.weights import fetch, read_state_dict

        path = fetch(ckpt, cache_dir, storage)
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
        if list(meta.get("classes", [])) != list(CLASSES) or tuple(meta.get("kinds", ())) != KINDS:
            raise WeightsError(f"{ckpt.model}: {redact_uri(ckpt.uri)} is not a classic FQA checkpoint of this cafi "
                               f"(classes {meta.get('classes')}, kinds {meta.get('kinds')})")
        self.meta = meta
        self.device = device
        self.net = build()
        self.net.load_state_dict(read_state_dict(ckpt, path), strict=True)
        self.net.to(device).eval()

    @torch.inference_mode()
    def probabilities(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return torch.softmax(self.net(as_tensors(feats, self.device)), dim=1).cpu().numpy()

    def __call__(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return score_of(self.probabilities(feats))
