"""A bucket's rows as numpy: embeddings as unit float32 rows, and the identities as contiguous groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cafi import columns


def embeddings(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n, 512) unit float32 rows and which rows have an embedding (the others are zeros)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    n = sum(len(c) for c in chunks)
    out = np.zeros((n, columns.EMBEDDING_DIM), np.float32)
    valid = np.zeros(n, bool)
    start = 0
    for c in chunks:
        if len(c):
            ok = c.is_valid().to_numpy(zero_copy_only=False)
            flat = c.values.to_numpy(zero_copy_only=False)[c.offset * c.type.list_size:]
            vals = flat[: len(c) * c.type.list_size].reshape(len(c), -1)
            out[start:start + len(c)][ok] = vals[ok]
            valid[start:start + len(c)] = ok
        start += len(c)
    norm = row_norms(out)
    valid &= norm > 0
    out[valid] /= norm[valid, None]
    out[~valid] = 0.0
    return out, valid


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row (einsum: no squared copy of the array)."""
    return np.sqrt(np.einsum("ij,ij->i", x, x))


@dataclass
class Groups:
    """Rows sorted so that each identity is contiguous: group g is rows starts[g] .. starts[g] + sizes[g]."""

    starts: np.ndarray   # (g,) first row of each group
    sizes: np.ndarray    # (g,) rows of each group
    gid: np.ndarray      # (n,) the group of each row

    @classmethod
    def of_sorted(cls, identities: np.ndarray) -> Groups:
        n = len(identities)
        if n == 0:
            z = np.zeros(0, np.int64)
            return cls(z, z, z)
        new = np.ones(n, bool)
        new[1:] = identities[1:] != identities[:-1]
        starts = np.flatnonzero(new)
        sizes = np.diff(np.append(starts, n))
        return cls(starts, sizes, np.repeat(np.arange(len(starts)), sizes))

    @property
    def count(self) -> int:
        return len(self.starts)

    def position(self) -> np.ndarray:
        """Each row's 0-based position within its group."""
        return np.arange(len(self.gid)) - self.starts[self.gid]

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per-group sums of rows of `values` (1-D or 2-D). Rows of a 2-D array are summed by a sparse
        (groups x rows) indicator product: np.add.reduceat along axis 0 walks the array column-strided."""
        if self.count == 0:
            return np.zeros((0, *values.shape[1:]), values.dtype)
        if values.ndim == 1:
            return np.add.reduceat(values, self.starts)
        from scipy import sparse

        n = len(self.gid)
        ones = np.ones(n, values.dtype)
        indicator = sparse.csr_matrix((ones, self.gid, np.arange(n + 1)), shape=(n, self.count)).T.tocsr()
        return np.asarray(indicator @ values)

    def median(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group median of the finite values and how many there are (NaN where none)."""
        finite = np.isfinite(values)
        order = np.lexsort((np.where(finite, values, np.inf), self.gid))
        m = self.sums(finite.astype(np.int64))
        srt = values[order]
        lo = self.starts + np.maximum(m - 1, 0) // 2   # within the group's finite values, sorted first
        hi = self.starts + m // 2
        last = max(len(values) - 1, 0)
        med = (srt[np.minimum(lo, last)] + srt[np.minimum(hi, last)]) / 2 if len(values) else np.zeros(0)
        return np.where(m > 0, med, np.nan), m
