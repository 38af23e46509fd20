"""SER-FIQ (Terhorst et al., CVPR 2020): face quality from stochastic embedding robustness.

The trunk runs once per face; only the head (dropout -> linear -> batchnorm -> L2) runs
`samples` times. The dropout masks are drawn once from `seed`, so a face always gets the
same score (re-scoring and resume stay reproducible) and the masks can be replayed
through full forward passes to check the shortcut.
"""

from __future__ import annotations

import numpy as np
import torch

from cafi.decision import rescale_serfiq
from cafi.models import arcface
from cafi.models.runtime import LoadedNet, autocast, maybe_compile, to_input
from cafi.weights import Checkpoint

FEATURES = 512 * 7 * 7


def dropout_masks(samples: int, dropout: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(samples, FEATURES, generator=gen) >= dropout
    return keep.to(device=device, dtype=torch.float32)


def quality_from_embeddings(emb: torch.Tensor) -> torch.Tensor:
    """emb (N, T, D), L2-normalised -> 2*sigmoid(-mean pairwise Euclidean distance), (N,)."""
    t = emb.shape[1]
    gram = emb @ emb.transpose(1, 2)
    dist = (2.0 - 2.0 * gram).clamp_min(0.0).sqrt()
    iu = torch.triu_indices(t, t, offset=1, device=emb.device)
    mean_dist = dist[:, iu[0], iu[1]].mean(dim=1)
    return 2.0 * torch.sigmoid(-mean_dist)


def rescale(q: torch.Tensor | np.ndarray, alpha: float, r: float):
    """The reference implementation's spread of the raw score: 1/(1+exp(-alpha*(q-r)))."""
    if isinstance(q, torch.Tensor):
        return torch.sigmoid(alpha * (q - r))
    return rescale_serfiq(q, alpha, r)


class SerFiq(LoadedNet):
    def __init__(self, ckpt: Checkpoint, cache_dir: str, device: torch.device, samples: int = 100,
                 dropout: float = 0.5, alpha: float = 130.0, r: float = 0.88, seed: int = 0,
                 precision: str = "fp32", storage=None, chunk: int = 8, compile: bool = False,
                 arch: str = "arcface_ir_se50"):
        # compiled: the trunk (the head runs T times on its output)
        super().__init__(arch, lambda: arcface.build(dropout, arch), ckpt, cache_dir, device, precision, storage)
        self.dropout, self.alpha, self.r = dropout, alpha, r
        self.trunk = maybe_compile(lambda x: arcface.trunk(self.net, x), compile)
        self.masks = dropout_masks(samples, dropout, seed, device)
        # nn.Dropout's inverted scaling folded into the masks: one pass over the repeated features
        self.scaled_masks = self.masks * (1.0 / (1.0 - dropout))
        self.chunk = chunk  # faces per head GEMM: bounds memory at chunk*samples*25088 floats

    @torch.inference_mode()
    def embed(self, faces: np.ndarray) -> torch.Tensor:
        """One plain (dropout off) embedding per aligned face, (N, 512)."""
        x = to_input(faces, self.device, self.record)
        with autocast(self.device, self.precision):
            return arcface.head(self.net, arcface.trunk(self.net, x), None, self.dropout).float()

    @torch.inference_mode()
    def __call__(self, faces: np.ndarray, embeddings: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """aligned uint8 RGB (N,112,112,3) -> (raw quality, rescaled quality), each (N,), and with
        `embeddings` the plain (dropout off) L2-normalised embedding (N, 512) from the same trunk pass."""
        x = to_input(faces, self.device, self.record)
        t = self.masks.shape[0]
        out, plain = [], None
        with autocast(self.device, self.precision):
            feats = self.trunk(x)
            for start in range(0, len(feats), self.chunk):
                f = feats[start:start + self.chunk]
                rep = (f[:, None, :] * self.scaled_masks[None]).reshape(-1, FEATURES)
                emb = arcface.head(self.net, rep, None, self.dropout)
                out.append(quality_from_embeddings(emb.float().view(len(f), t, -1)))
            if embeddings:
                plain = arcface.head(self.net, feats, None, self.dropout).float().cpu().numpy()
        raw = torch.cat(out).float() if out else torch.zeros(0, device=self.device)  # bf16 has no numpy dtype
        return (raw.cpu().numpy().astype(np.float32), rescale(raw, self.alpha, self.r).cpu().numpy().astype(np.float32),
                plain)
