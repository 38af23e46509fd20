"""Merge candidates: pairs of identities whose centroids (of their inlier samples) are at cosine
>= --merge-cos, probably one person under two labels. Listed for review; no sample is removed.
The centroids are one float16 vector per identity, few enough for one task (cafi/identities/ann.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cafi.config import StorageConfig
from cafi.identities import ann
from cafi.identities.analyse import IDENTITY_STATS
from cafi.identities.buckets import read_parts
from cafi.identities.vectors import embeddings

MERGES = pa.schema([("identity_a", pa.string()), ("identity_b", pa.string()), ("cos", pa.float32())])


def merge_pairs(root: str, files: list[str], storage: StorageConfig, t: float, nprobe: int, cpus: int = 1
                ) -> pa.Table:
    """The task: every identity pair at centroid cosine >= t, most similar first."""
    ann.threads(cpus)
    schema = pa.schema([IDENTITY_STATS.field("identity"), IDENTITY_STATS.field("centroid")])
    table = read_parts(root, files, storage, schema)
    x, _ = embeddings(table["centroid"])
    i, j, s = ann.close_pairs(x, t, nprobe)
    ids = table["identity"]
    out = pa.table({"identity_a": ids.take(pa.array(i, pa.int64())), "identity_b": ids.take(pa.array(j, pa.int64())),
                    "cos": pa.array(s, pa.float32())}, schema=MERGES)
    return out.sort_by([("cos", "descending"), ("identity_a", "ascending"), ("identity_b", "ascending")])


def candidates(pairs: pa.Table, limit: int = 5) -> dict[str, list[tuple[str, float]]]:
    """identity -> its closest other identities (at most `limit`), most similar first."""
    out: dict[str, list[tuple[str, float]]] = {}
    for a, b, c in zip(pairs["identity_a"].to_pylist(), pairs["identity_b"].to_pylist(), pairs["cos"].to_pylist(),
                       strict=True):
        for me, other in ((a, b), (b, a)):
            lst = out.setdefault(me, [])
            if len(lst) < limit:
                lst.append((other, float(np.float32(c))))
    return out
