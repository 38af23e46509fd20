"""Near-duplicates within an identity: pairs at cosine >= --dup-cos; the best-quality copy is kept.

Rows come sorted best quality first within each identity, so a pair (i, j) with i < j names i as the
better copy. Identities of equal size are stacked and compared in one batched matrix product (no
Python loop per identity); the few pairs found are then resolved greedily in quality order: a
sample is a duplicate of the best sample that is near it and is itself kept.
"""

from __future__ import annotations

import numpy as np

from cafi.identities.vectors import Groups

BATCH_ELEMENTS = 1 << 23   # floats in one stacked block of embeddings (32 MiB): bounds a task's memory
LARGE = 1024               # identities above this size are compared in row blocks instead


def _pairs_of_size(x: np.ndarray, starts: np.ndarray, n: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    rows_per = max(1, BATCH_ELEMENTS // (n * x.shape[1] + n * n))
    upper = np.triu(np.ones((n, n), bool), 1)
    out_i, out_j = [], []
    for a in range(0, len(starts), rows_per):
        idx = starts[a:a + rows_per, None] + np.arange(n)[None, :]
        block = x[idx]                                   # (m, n, d)
        sims = block @ block.transpose(0, 2, 1)          # (m, n, n)
        g, i, j = np.nonzero((sims >= t) & upper)
        base = starts[a:a + rows_per][g]
        out_i.append(base + i)
        out_j.append(base + j)
    return np.concatenate(out_i), np.concatenate(out_j)


def _pairs_large(x: np.ndarray, start: int, n: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    rows = x[start:start + n]
    out_i, out_j = [], []
    for a in range(0, n, LARGE):
        sims = rows[a:a + LARGE] @ rows.T
        i, j = np.nonzero(sims >= t)
        keep = j > i + a
        out_i.append(start + a + i[keep])
        out_j.append(start + j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


def near_pairs(x: np.ndarray, groups: Groups, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i < j, same identity) at cosine >= t. Rows without an embedding are zeros: never a pair."""
    pi, pj = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for n in np.unique(groups.sizes):
        if n < 2:
            continue
        starts = groups.starts[groups.sizes == n]
        if n > LARGE:
            for s in starts:
                i, j = _pairs_large(x, int(s), int(n), t)
                pi.append(i)
                pj.append(j)
        else:
            i, j = _pairs_of_size(x, starts, int(n), t)
            pi.append(i)
            pj.append(j)
    return np.concatenate(pi), np.concatenate(pj)


def duplicate_of(x: np.ndarray, groups: Groups, t: float) -> np.ndarray:
    """For each row, the row it duplicates (-1: none). Rows are sorted best first within each identity."""
    out = np.full(len(x), -1, np.int64)
    i, j = near_pairs(x, groups, t)
    for a, b in sorted(zip(i.tolist(), j.tolist(), strict=True), key=lambda p: (p[1], p[0])):
        if out[b] < 0 and out[a] < 0:   # a is kept (so far, and for good: every better row is settled)
            out[b] = a
    return out
