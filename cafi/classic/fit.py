"""Training the score-based FQA classifier (cafi/models/classic.py) on feature arrays: the held-out
split, the greedy layer-wise pretraining of the autoencoders, the softmax layer, the end-to-end
fine-tuning, and the held-out confusion matrix. Plain torch on one process: the labels are an
afternoon's work (thousands of rows), seconds to a few minutes of CPU.

The stages, as the method's stacked autoencoders train:
1. each kind's autoencoder on its standardised features (reconstruction MSE);
2. the joint autoencoder on the four kinds' concatenated codes;
3. the softmax layer on the joint codes, the encoders frozen (cross-entropy, classes weighted by the
   inverse of their frequency so an unbalanced label set does not teach "always good");
4. the whole stack fine-tuned with cross-entropy at a tenth of the learning rate.
Only the training rows are ever seen by 1-4 (the standardisation included); the held-out rows are scored
once at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from cafi.models.classic import CLASSES, ClassicFqa, as_tensors


@dataclass(frozen=True)
class FitSettings:
    holdout: float = 0.2  # fraction of each class held out
    seed: int = 0
    epochs_autoencoder: int = 60
    epochs_classifier: int = 150
    epochs_finetune: int = 60
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    # Torch threads while training: the matrices are small, and on a busy box a second thread costs
    # more in contention than it gains (a 6084x50 autoencoder step: 10x slower with 2 threads at load 6).
    threads: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def split(labels: np.ndarray, holdout: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Row indices (train, held out): per class a `holdout` share (at least one row where the class has
    two or more), seeded. With `groups` (e.g. identities) whole groups are held out, so no person is on
    both sides; a group's class is its first row's."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keys = np.arange(len(labels)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    first = {}
    for i, g in enumerate(keys):
        first.setdefault(int(g), i)
    held_groups = []
    for c in np.unique(labels):
        members = np.array([g for g, i in first.items() if labels[i] == c])
        rng.shuffle(members)
        n = int(round(holdout * len(members)))
        if holdout > 0 and len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        held_groups += members[:n].tolist()
    held = np.isin(keys, np.array(held_groups, dtype=keys.dtype))
    return np.flatnonzero(~held), np.flatnonzero(held)


def _batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[i:i + size] for i in range(0, n, size)]


def _train(params, loss_of, n: int, epochs: int, s: FitSettings, gen: torch.Generator, lr: float) -> list[float]:
    opt = torch.optim.Adam(params, lr=lr, weight_decay=s.weight_decay, foreach=True)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in _batches(n, s.batch_size, gen):
            opt.zero_grad()
            loss = loss_of(idx)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(n, 1))
    return losses


def fit(feats: dict[str, np.ndarray], labels: np.ndarray, s: FitSettings = FitSettings()) -> tuple[ClassicFqa, dict]:
    """Train on every row given (the caller passes the training split). `labels`: class indices into
    CLASSES. Returns the net (eval mode) and the losses of each stage."""
    before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _fit(feats, labels, s)
    finally:
        torch.set_num_threads(before)


def _fit(feats: dict[str, np.ndarray], labels: np.ndarray, s: FitSettings) -> tuple[ClassicFqa, dict]:
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    x = as_tensors(feats)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y)
    net = ClassicFqa({k: v.shape[1] for k, v in x.items()})
    net.train()
    history: dict[str, list[float]] = {}
    for k in net.kinds:  # 1. each kind's autoencoder
        ae = net.kind_ae[k]
        ae.fit_scale(x[k])
        history[f"autoencoder_{k}"] = _train(ae.parameters(), lambda i, ae=ae, k=k: ae.reconstruction_loss(x[k][i]),
                                             n, s.epochs_autoencoder, s, gen, s.learning_rate)
    with torch.no_grad():
        codes = net.codes(x)
    net.joint_ae.fit_scale(codes)  # 2. the joint autoencoder on the concatenated codes
    history["autoencoder_joint"] = _train(net.joint_ae.parameters(),
                                          lambda i: net.joint_ae.reconstruction_loss(codes[i]),
                                          n, s.epochs_autoencoder, s, gen, s.learning_rate)
    counts = torch.bincount(y, minlength=len(CLASSES)).float()
    weight = torch.where(counts > 0, counts.sum() / (len(CLASSES) * counts.clamp(min=1)), torch.zeros_like(counts))
    ce = nn.CrossEntropyLoss(weight=weight)
    with torch.no_grad():
        joint = net.joint_ae.encode(codes)
    history["classifier"] = _train(net.classifier.parameters(), lambda i: ce(net.classifier(joint[i]), y[i]),
                                   n, s.epochs_classifier, s, gen, s.learning_rate)  # 3. the softmax layer
    trainable = [p for name, p in net.named_parameters() if ".decoder." not in name]
    history["finetune"] = _train(trainable, lambda i: ce(net({k: v[i] for k, v in x.items()}), y[i]),
                                 n, s.epochs_finetune, s, gen, s.learning_rate / 10)  # 4. end to end
    return net.eval(), history


@torch.inference_mode()
def predict(net: ClassicFqa, feats: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 3) class probabilities in CLASSES order."""
    return torch.softmax(net(as_tensors(feats)), dim=1).numpy()


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(3, 3) counts: rows the true class, columns the predicted one (CLASSES order)."""
    k = len(CLASSES)
    return np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(k, k)


def evaluate(net: ClassicFqa, feats: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """Accuracy, the confusion matrix and per-class recall of the net on these rows."""
    labels = np.asarray(labels)
    pred = predict(net, feats).argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    m = confusion(labels, pred)
    recall = {c: (float(m[i, i] / m[i].sum()) if m[i].sum() else None) for i, c in enumerate(CLASSES)}
    return {"rows": int(len(labels)), "accuracy": float((pred == labels).mean()) if len(labels) else None,
            "confusion": m.tolist(), "recall": recall}
