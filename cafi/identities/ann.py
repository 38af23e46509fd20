"""The approximate-nearest-neighbour index (faiss; inner product on unit vectors = cosine).

An inverted file with a two-level coarse quantizer: k1 coarse centroids, each split into k2 fine ones
(spherical k-means, faiss.Kmeans), k1 * k2 cells in all. Two levels because both learning and
assigning a million vectors to ~4,000 flat cells costs ~4 TFLOP, more than the search itself; here
a vector meets k1 + reach * k2 centroids (~200) instead. Every vector is stored in its nearest cell
and looked up in its `nprobe` nearest (within its `reach` nearest coarse centroids), so a close pair
is found when either side's probes reach the other's cell. Each cell is then searched exactly
(faiss range search). The conflict search spreads the cells over Ray tasks (cafi/identities/
conflicts.py); `close_pairs` runs the same index in one process for the identity centroids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXACT_UP_TO = 4096       # up to this many vectors one cell (an exact search) is cheaper than an index
ROWS_PER_CELL = 256      # cells: about n / 256 (the search costs n * nprobe * 256 dot products)
TRAIN_PER_CELL = 32      # training points per centroid (spherical k-means needs few)
REACH = 3                # coarse centroids whose fine cells a vector may probe


@dataclass(frozen=True)
class Cells:
    coarse: np.ndarray   # (k1, d) unit centroids
    fine: np.ndarray     # (k1, k2, d) unit centroids; cell id = coarse * k2 + fine

    @property
    def count(self) -> int:
        return self.fine.shape[0] * self.fine.shape[1]


def cells_for(n: int) -> int:
    return 1 if n <= EXACT_UP_TO else int(math.ceil(n / ROWS_PER_CELL))


def threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    if len(x) <= k:  # fewer points than centroids: the points themselves, repeated
        return x[np.arange(k) % max(1, len(x))] if len(x) else np.zeros((k, x.shape[1]), np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=10, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=TRAIN_PER_CELL, min_points_per_centroid=1)
    km.train(x)
    return km.centroids.astype(np.float32)


def train_cells(sample: np.ndarray, cells: int, seed: int = 0) -> Cells:
    """About `cells` cells learned from `sample` (unit float32 rows); one cell when cells <= 1."""
    d = sample.shape[1]
    if cells <= 1 or len(sample) == 0:
        return Cells(np.zeros((1, d), np.float32), np.zeros((1, 1, d), np.float32))
    k1 = int(math.ceil(math.sqrt(cells)))
    k2 = int(math.ceil(cells / k1))
    coarse = _kmeans(sample, k1, seed)
    owner = np.argmax(sample @ coarse.T, axis=1)
    fine = np.stack([_kmeans(sample[owner == j], k2, seed + 1 + j) for j in range(k1)])
    return Cells(coarse, fine)


def probe_cells(x: np.ndarray, cells: Cells, nprobe: int, rows: int = 65_536) -> np.ndarray:
    """(n, min(nprobe, cells)) cells nearest each row, nearest first (column 0: where it is stored)."""
    k1, k2 = cells.fine.shape[:2]
    k = min(nprobe, k1 * k2)
    if k1 * k2 == 1 or len(x) == 0:
        return np.zeros((len(x), k), np.int64)
    reach = min(REACH, k1)
    out = np.empty((len(x), k), np.int64)
    for a in range(0, len(x), rows):
        xa = x[a:a + rows]
        top = np.argsort(-(xa @ cells.coarse.T), axis=1)[:, :reach]                # (m, reach)
        sims = np.empty((len(xa), reach, k2), np.float32)
        for j in range(k1):  # each coarse centroid's fine ones against the rows that reach it: (m, reach, k2)
            r, c = np.nonzero(top == j)
            if len(r):
                sims[r, c] = xa[r] @ cells.fine[j].T
        ids = (top[:, :, None] * k2 + np.arange(k2)[None, None, :]).reshape(len(xa), -1)
        best = np.argsort(-sims.reshape(len(xa), -1), axis=1)[:, :k]
        out[a:a + rows] = np.take_along_axis(ids, best, axis=1)
    return out


def cell_pairs(base: np.ndarray, queries: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, base row, cosine) of every pair at cosine >= t: an exact range search of one cell."""
    import faiss

    if len(base) == 0 or len(queries) == 0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, np.float32))
    lims, sims, ids = index.range_search(np.ascontiguousarray(queries, np.float32), float(t))
    q = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
    return q, ids.astype(np.int64), sims


def pairs_by_cell(x: np.ndarray, cell: np.ndarray, stored: np.ndarray, t: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of x, each with the cell it is in and whether it is stored there (else it only probes it):
    (probing row, stored row, cosine) of every pair at cosine >= t within a cell."""
    order = np.argsort(cell, kind="stable")
    bounds = np.flatnonzero(np.diff(cell[order])) + 1
    qa, ba, sa = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for rows in np.split(order, bounds):
        here = rows[stored[rows]]
        q, b, s = cell_pairs(x[here], x[rows], t)
        qa.append(rows[q])
        ba.append(here[b])
        sa.append(s)
    return np.concatenate(qa), np.concatenate(ba), np.concatenate(sa)


def close_pairs(x: np.ndarray, t: float, nprobe: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine), i < j, of the rows of x at cosine >= t, with the index above in one process."""
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(seed)
    n_cells = cells_for(len(x))
    sample = x[rng.choice(len(x), min(len(x), n_cells * TRAIN_PER_CELL), replace=False)] if n_cells > 1 else x
    probes = probe_cells(x, train_cells(sample, n_cells, seed), nprobe)
    rows = np.repeat(np.arange(len(x)), probes.shape[1])
    stored = np.tile(np.arange(probes.shape[1]) == 0, len(x))
    q, b, s = pairs_by_cell(x[rows], probes.ravel(), stored, t)
    q, b = rows[q], rows[b]
    # a pair may be found from either side, or in several cells: once each
    keep = q != b
    lo, hi, s = np.minimum(q, b)[keep], np.maximum(q, b)[keep], s[keep]
    _, first = np.unique(lo * len(x) + hi, return_index=True)
    return lo[first], hi[first], s[first]
