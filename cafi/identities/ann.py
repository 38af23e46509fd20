"""The approximate-nearest-neighbour index (faiss, inner product on unit vectors = cosine).

The conflict search is an inverted-file index spread over Ray tasks: `train_cells` learns the coarse
cells (spherical k-means) once, `probe_cells` gives every sample its nearest cells (the first is the
cell it is stored in, all of them are where it is looked up), and `cell_pairs` searches one cell
exactly. `close_pairs` is the same idea in one process (faiss IndexIVFFlat) for the identity
centroids, which are few enough to hold.
"""

from __future__ import annotations

import math

import numpy as np

EXACT_UP_TO = 20_000     # below this many vectors an exact search is cheaper than training cells
TRAIN_PER_CELL = 32      # training points per cell (faiss warns below 39; spherical k-means needs few)


def cells_for(n: int) -> int:
    """Cells of the index for n vectors: about sqrt(n), so a cell holds about as many as there are cells."""
    return 1 if n <= EXACT_UP_TO else int(min(8192, math.sqrt(n)))


def threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


def train_cells(sample: np.ndarray, cells: int, seed: int = 0) -> np.ndarray:
    """(cells, d) unit centroids learned from `sample` (unit float32 rows)."""
    import faiss

    if cells <= 1:
        return np.zeros((1, sample.shape[1]), np.float32)
    km = faiss.Kmeans(sample.shape[1], cells, niter=10, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=TRAIN_PER_CELL, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample, np.float32))
    return km.centroids.astype(np.float32)


def probe_cells(x: np.ndarray, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """(n, min(nprobe, cells)) cells nearest each row, nearest first."""
    import faiss

    k = min(nprobe, len(centroids))
    if len(centroids) == 1 or len(x) == 0:
        return np.zeros((len(x), k), np.int64)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, cells = index.search(np.ascontiguousarray(x, np.float32), k)
    return cells


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


def close_pairs(x: np.ndarray, t: float, nprobe: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine), i < j, of the rows of x at cosine >= t: exact up to EXACT_UP_TO rows, else an
    IndexIVFFlat with about 4 sqrt(n) cells, `nprobe` of them searched."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    if len(x) <= EXACT_UP_TO:
        q, b, s = cell_pairs(x, x, t)
    else:
        nlist = int(4 * math.sqrt(len(x)))
        quantizer = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(x[rng.choice(len(x), min(len(x), nlist * TRAIN_PER_CELL), replace=False)])
        index.add(x)
        index.nprobe = nprobe
        lims, s, b = index.range_search(x, float(t))
        q, b = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64))), b.astype(np.int64)
    # a pair may be found from either side (its rows probe different cells): once each
    keep = q != b
    lo, hi, s = np.minimum(q, b)[keep], np.maximum(q, b)[keep], s[keep]
    _, first = np.unique(lo * len(x) + hi, return_index=True)
    return lo[first], hi[first], s[first]
