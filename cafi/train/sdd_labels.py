"""SDD-FIQA pseudo-labels (Ou et al., CVPR 2021) for the rows of one identity bucket, in numpy.

The definition, as TFace's quality/generate_pseudo_labels/gen_pseudo_labels.py computes it: for each
sample, the cosine similarities to up to 24 other samples of its identity (all of them when it has
fewer than 25) and to 24 samples of other identities, drawn at random; the 1-D Wasserstein distance
between those two empirical distributions; 12 such draws, each min-max normalised to 0..100 over the
whole set, then averaged. A sample whose identity has no other sample has no genuine similarity: it
gets no label.

Here the other-identity samples are drawn from a bounded, seeded sample of the whole set (the pool:
every row when the set is small; each row draws from a random slice of SUBPOOL of it), so a bucket
never needs the rest of the set. Everything is vectorised over the bucket's rows: the genuine
similarities come from one Gram matrix per identity, identities padded to power-of-two sizes and
stacked; the draws are made distinct by redrawing collisions (or, for identities barely larger than
24, as the head of a random permutation); the Wasserstein distance integrates the difference of the
two quantile functions on the grid their sizes fix.
"""

from __future__ import annotations

import numpy as np

SAME = 24           # genuine similarities per draw (TFace fix_num)
OTHER = 24          # impostor similarities per draw
REPEATS = 12        # fresh draws, averaged after normalising each
SUBPOOL = 512       # each row's other-identity draws come from a random slice of this many pool samples
GRAM_MAX = 512      # larger identities: similarities by gathering the drawn vectors instead of a Gram matrix
CHUNK_ELEMS = 1 << 24  # bound on the float32 elements of a temporary (64 MiB)


def unit(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(vectors, np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1)


def _distinct(draws: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted draws with every value that repeats another of its draw redrawn (uniform in [0, high) per
    row) until none does; only the rows that had a repeat are looked at again.
    draws: (m, R, K) with K well below `high` (repeats are then rare); high: (m,)."""
    draws = np.sort(draws, axis=-1)
    active = np.arange(len(draws))
    d = draws
    for _ in range(10_000):
        repeat = d[..., 1:] == d[..., :-1]
        again = repeat.reshape(len(d), -1).any(axis=1)
        if not again.any():
            return draws
        active, d, repeat = active[again], d[again], repeat[again]
        later = d[..., 1:]
        later[repeat] = rng.integers(0, np.broadcast_to(high[active][:, None, None], repeat.shape)[repeat])
        d = np.sort(d, axis=-1)
        draws[active] = d
    raise RuntimeError("could not draw distinct samples")  # not reached when each row has enough to draw


def _permuted(n_others: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """SAME distinct positions in [0, n_others) per row and draw, as the first of a random permutation
    (random keys, sorted): for identities barely larger than SAME, where redrawing collisions is slow."""
    keys = rng.random((len(n_others), REPEATS, width), np.float32)
    beyond = np.broadcast_to(np.arange(width) >= n_others[:, None, None], keys.shape)
    keys[beyond] = 2.0  # beyond the identity: sorted last
    return np.argsort(keys, axis=-1)[..., :SAME]


def same_draws(k: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (within the identity) of the genuine comparisons of each row: (m, REPEATS, SAME) and
    how many are valid per row, min(SAME, k - 1). k: the identity's size, p: the row's position in it.
    An identity of at most SAME + 1 samples compares with all the others at every draw."""
    m = len(k)
    n_same = np.minimum(SAME, k - 1)
    draws = np.broadcast_to(np.arange(SAME), (m, REPEATS, SAME)).copy()
    mid = (k - 1 > SAME) & (k - 1 <= 4 * SAME)
    if mid.any():
        draws[mid] = _permuted(k[mid] - 1, int(k[mid].max() - 1), rng)
    big = k - 1 > 4 * SAME
    if big.any():
        high = k[big] - 1
        first = rng.integers(0, high[:, None, None], size=(int(big.sum()), REPEATS, SAME))
        draws[big] = _distinct(first, high, rng)
    draws = np.where(draws < (k - 1)[:, None, None], draws, 0)  # padding: any valid position
    return draws + (draws >= p[:, None, None]), n_same           # skip the row itself


def _gram_similarities(x: np.ndarray, start: np.ndarray, k: np.ndarray, p: np.ndarray, pos: np.ndarray,
                       rows: np.ndarray, size: int) -> np.ndarray:
    """Similarities of `rows` (all of identities padded to `size`) to their drawn positions `pos`,
    through one (size x size) Gram matrix per identity."""
    ident_start, inverse = np.unique(start[rows], return_inverse=True)
    ident_k = k[rows][np.unique(inverse, return_index=True)[1]]
    out = np.empty(pos[rows].shape, np.float32)
    per = max(1, CHUNK_ELEMS // (size * max(size, x.shape[1])))
    for lo in range(0, len(ident_start), per):
        s, kk = ident_start[lo:lo + per], ident_k[lo:lo + per]
        idx = s[:, None] + np.minimum(np.arange(size), kk[:, None] - 1)  # padding repeats a member
        e = x[idx]                                                        # (g, size, d)
        gram = e @ e.transpose(0, 2, 1)
        sel = (inverse >= lo) & (inverse < lo + len(s))
        r = rows[sel]
        g = inverse[sel] - lo
        out[sel] = gram[g[:, None, None], p[r][:, None, None], pos[r]]
    return out


def same_similarities(x: np.ndarray, start: np.ndarray, k: np.ndarray, p: np.ndarray,
                      pos: np.ndarray) -> np.ndarray:
    """(m, REPEATS, SAME) cosine similarities of each row to its drawn same-identity positions.
    x: unit vectors sorted by identity; start/k/p per row: its identity's first row, size, its position."""
    out = np.zeros(pos.shape, np.float32)
    has = k >= 2
    size = np.where(k <= GRAM_MAX, 1 << np.ceil(np.log2(np.maximum(k, 2))).astype(int), 0)
    for s in np.unique(size[has]):
        rows = np.flatnonzero(has & (size == s))
        if s:
            out[rows] = _gram_similarities(x, start, k, p, pos, rows, int(s))
        else:  # a very large identity: gather the drawn vectors
            per = max(1, CHUNK_ELEMS // (REPEATS * SAME * x.shape[1]))
            for lo in range(0, len(rows), per):
                r = rows[lo:lo + per]
                other = x[start[r][:, None, None] + pos[r]]             # (c, R, S, d)
                out[r] = np.einsum("cd,crsd->crs", x[r], other)
    return out


def other_similarities(x: np.ndarray, codes: np.ndarray, pool: np.ndarray, pool_codes: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """(m, REPEATS, OTHER) cosine similarities of each row to distinct samples of other identities,
    drawn from a random slice of SUBPOOL samples of the pool (the pool is in random order: it is sorted
    by code, a hash): one matrix product per slice and chunk instead of one per row and draw.
    Within a code-sorted slice a row's own identity is one run [a, a + own), skipped by drawing in
    [0, size - own) and shifting the draws at or past a."""
    if np.any(pool_codes[1:] < pool_codes[:-1]):
        raise ValueError("the pool must be sorted by identity code")
    slices = max(1, len(pool) // SUBPOOL)
    bounds = np.linspace(0, len(pool), slices + 1).astype(int)
    which = rng.integers(0, slices, size=len(x))
    out = np.empty((len(x), REPEATS, OTHER), np.float32)
    for i in range(slices):
        sub, sub_codes = pool[bounds[i]:bounds[i + 1]], pool_codes[bounds[i]:bounds[i + 1]]
        rows = np.flatnonzero(which == i)
        a = np.searchsorted(sub_codes, codes[rows], "left")
        own = np.searchsorted(sub_codes, codes[rows], "right") - a
        high = len(sub) - own
        if high.min(initial=OTHER) < OTHER:
            raise ValueError(f"SDD-FIQA draws {OTHER} samples of other identities; the sample of the set "
                             f"has only {high.min()} for some identity")
        per = max(1, CHUNK_ELEMS // max(len(sub), REPEATS * OTHER))
        for lo in range(0, len(rows), per):
            r, h = rows[lo:lo + per], high[lo:lo + per]
            draws = _distinct(rng.integers(0, h[:, None, None], size=(len(r), REPEATS, OTHER)), h, rng)
            draws += np.where(draws >= a[lo:lo + per, None, None], own[lo:lo + per, None, None], 0)
            sims = x[r] @ sub.T                                              # (c, slice)
            out[r] = np.take_along_axis(sims, draws.reshape(len(r), -1), 1).reshape(draws.shape)
    return out


def _quantile_grid(n_u: int, n_v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces of [0, 1] on which both empirical quantile functions (n_u and n_v equally weighted
    points) are constant: (index into sorted u, index into sorted v, width) per piece."""
    edges = np.union1d(np.arange(n_u + 1) / n_u, np.arange(n_v + 1) / n_v)
    mid = (edges[:-1] + edges[1:]) / 2
    return (np.floor(mid * n_u).astype(int), np.floor(mid * n_v).astype(int), np.diff(edges))


def wasserstein(u: np.ndarray, n_u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1-D Wasserstein distance between the empirical distributions of u[..., :n_u] (n_u per row of the
    first axis, >= 1) and v (all of its last axis), for every leading index (scipy.stats.
    wasserstein_distance's definition): the integral over t in [0, 1] of |Q_u(t) - Q_v(t)|, the
    quantile functions being step functions on a grid fixed by the two sizes. Rows are grouped by n_u."""
    out = np.empty(u.shape[:-1], np.float32)
    sv = np.sort(v, axis=-1)
    for size in np.unique(n_u):
        rows = np.flatnonzero(n_u == size)
        su = np.sort(u[rows, ..., :size], axis=-1)
        iu, iv, width = _quantile_grid(int(size), v.shape[-1])
        out[rows] = (np.abs(su[..., iu] - sv[rows][..., iv]) * width.astype(np.float32)).sum(axis=-1)
    return out


def bucket_distances(vectors: np.ndarray, codes: np.ndarray, pool: np.ndarray, pool_codes: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Raw SDD distances of the rows of whole identities: (n, REPEATS) float32 (NaN where the identity
    has one sample) and n_same (n,), the genuine similarities per draw (0: no label).
    Rows must be grouped by identity (`codes`, one integer per identity, equal rows adjacent); `pool`:
    unit vectors of a sample of the whole set sorted by `pool_codes`, their identities' codes."""
    n = len(codes)
    if n == 0:
        return np.zeros((0, REPEATS), np.float32), np.zeros(0, np.int32)
    x = unit(vectors)
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[first, n])
    start = np.repeat(first, sizes)
    k = np.repeat(sizes, sizes)
    p = np.arange(n) - start
    pos, n_same = same_draws(k, p, rng)
    same = same_similarities(x, start, k, p, pos)
    labelled = n_same > 0
    dist = np.full((n, REPEATS), np.nan, np.float32)
    if labelled.any():
        other = other_similarities(x[labelled], codes[labelled], pool, pool_codes, rng)
        dist[labelled] = wasserstein(same[labelled], n_same[labelled], other)
    return dist, n_same.astype(np.int32)


def normalise(dist: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The label: each draw's distance min-max scaled to 0..100 over the set (lo/hi per draw), averaged
    over the draws, as TFace averages its 12 normalised passes. NaN stays NaN (no label)."""
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((dist - lo) / span * 100.0).mean(axis=1)
