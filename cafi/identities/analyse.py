"""One bucket's within-identity work, in one Ray task: outliers, near-duplicates, quality ranks,
per-identity statistics and centroids, and the bucket's rows for the conflict index.

Writes, under the work prefix:
  analysed/bucket=<b>.parquet             per sample (sorted by identity, best quality first)
  identities/bucket=<b>.parquet           per identity: counts, centroid cosines, centroid
  cells/group=<g>/bucket=<b>.parquet      the samples with an embedding, once per cell they are probed in
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import columns
from cafi.config import StorageConfig
from cafi.identities import ann, duplicates, outliers
from cafi.identities.buckets import read_bucket
from cafi.identities.options import Options
from cafi.identities.vectors import Groups, embeddings
from cafi.storage import join

EMBEDDING = columns.BY_NAME["embedding"].type
ANALYSED = pa.schema([("uri", pa.string()), ("identity", pa.string()), ("quality", pa.float64()),
                      ("centroid_cos", pa.float32()), ("outlier", pa.bool_()), ("duplicate_of", pa.string()),
                      ("rank", pa.int32()), ("has_embedding", pa.bool_()), ("shard_offset", pa.int64()),
                      ("shard_size", pa.int64())])
IDENTITY_STATS = pa.schema([("identity", pa.string()), ("samples", pa.int64()), ("embedded", pa.int64()),
                            ("outliers", pa.int64()), ("duplicates", pa.int64()),
                            ("mean_centroid_cos", pa.float32()), ("min_centroid_cos", pa.float32()),
                            ("centroid", EMBEDDING)])
CELLS = pa.schema([("cell", pa.int64()), ("primary", pa.bool_()), ("uri", pa.string()), ("identity", pa.string()),
                   ("outlier", pa.bool_()), ("embedding", EMBEDDING)])


def write_table(table: pa.Table, uri: str, storage: StorageConfig) -> None:
    import pyarrow.parquet as pq

    from cafi.storage import filesystem

    fs, path = filesystem(uri, storage)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as fh:  # work files of float16 embeddings: compression costs time, saves nothing
        pq.write_table(table, fh, compression="none")


def sort_bucket(table: pa.Table) -> pa.Table:
    """Identity, then best quality first (a missing quality last), then URI: every rank and tie is fixed."""
    q = table["quality"].to_numpy(zero_copy_only=False)
    key = pa.array(np.where(np.isnan(q), np.inf, -q))
    order = pc.sort_indices(table.append_column("_q", key),
                            sort_keys=[("identity", "ascending"), ("_q", "ascending"), ("uri", "ascending")])
    return table.take(order)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1), 0).astype(np.float16)


def analyse(table: pa.Table, options: Options) -> tuple[pa.Table, pa.Table, np.ndarray, np.ndarray]:
    """(samples, identity statistics, unit embeddings, has-embedding) of a sorted bucket."""
    groups = Groups.of_sorted(table["identity"].to_numpy(zero_copy_only=False))
    x, valid = embeddings(table["embedding"])
    cos = outliers.centroid_cos(x, groups, valid, options)
    out = outliers.flag(cos, groups, options) & valid
    dup = duplicates.duplicate_of(x, groups, options.dup_cos)
    dup_uri = table["uri"].take(pa.array(np.where(dup >= 0, dup, 0))).combine_chunks() if len(dup) else \
        pa.array([], pa.string())
    dup_uri = pc.if_else(pa.array(dup >= 0), dup_uri, pa.scalar(None, pa.string()))
    samples = pa.table({
        "uri": table["uri"], "identity": table["identity"], "quality": table["quality"],
        "centroid_cos": pa.array(cos, pa.float32()), "outlier": pa.array(out), "duplicate_of": dup_uri,
        "rank": pa.array(groups.position() + 1, pa.int32()), "has_embedding": pa.array(valid),
        "shard_offset": table["shard_offset"], "shard_size": table["shard_size"]}, schema=ANALYSED)
    finite = np.isfinite(cos)
    measured = groups.sums(finite.astype(np.int64))
    total = groups.sums(np.where(finite, cos, 0.0))
    lowest = np.fmin.reduceat(np.where(finite, cos, np.nan), groups.starts) if groups.count else np.zeros(0)
    clean = valid & ~out
    inliers = groups.sums(x * clean[:, None])
    everyone = groups.sums(x)  # an identity whose samples are all outliers: the centroid of them all
    centroid = _unit(np.where(groups.sums(clean.astype(np.int64))[:, None] > 0, inliers, everyone))
    stats = pa.table({
        "identity": table["identity"].take(pa.array(groups.starts, pa.int64())),
        "samples": pa.array(groups.sizes, pa.int64()), "embedded": pa.array(groups.sums(valid.astype(np.int64))),
        "outliers": pa.array(groups.sums(out.astype(np.int64))),
        "duplicates": pa.array(groups.sums((dup >= 0).astype(np.int64))),
        "mean_centroid_cos": pa.array(np.where(measured > 0, total / np.maximum(measured, 1), np.nan), pa.float32()),
        "min_centroid_cos": pa.array(lowest, pa.float32()),
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centroid.ravel(), pa.float16()),
                                                      columns.EMBEDDING_DIM)}, schema=IDENTITY_STATS)
    return samples, stats, x, valid


def cell_rows(table: pa.Table, samples: pa.Table, x: np.ndarray, valid: np.ndarray, centroids: ann.Cells,
              nprobe: int) -> pa.Table:
    """The samples with an embedding, once per cell probed: the first (nearest) is where it is stored."""
    keep = pa.array(valid)
    base = pa.table({"uri": table["uri"], "identity": table["identity"], "outlier": samples["outlier"],
                     "embedding": table["embedding"]}).filter(keep)
    probes = ann.probe_cells(x[valid], centroids, nprobe)
    parts = [base.add_column(0, "cell", pa.array(probes[:, j], pa.int64()))
             .add_column(1, "primary", pa.array(np.full(base.num_rows, j == 0))) for j in range(probes.shape[1])]
    return pa.concat_tables(parts).select(CELLS.names).cast(CELLS) if parts else CELLS.empty_table()


def analyse_bucket(bucket: int, root: str, files: list[str], work: str, storage: StorageConfig, options: Options,
                   centroids: ann.Cells, cell_groups: int) -> dict:
    """The task of one bucket; returns where it wrote its cell rows and how many rows it had."""
    ann.threads(1)
    table = sort_bucket(read_bucket(root, files, storage))
    samples, stats, x, valid = analyse(table, options)
    write_table(samples, join(work, "analysed", f"bucket={bucket}.parquet"), storage)
    write_table(stats, join(work, "identities", f"bucket={bucket}.parquet"), storage)
    cells = cell_rows(table, samples, x, valid, centroids, options.nprobe)
    del x
    group_np = cells["cell"].to_numpy() % cell_groups
    written = {}
    for g in np.unique(group_np):
        uri = join(work, "cells", f"group={int(g)}", f"bucket={bucket}.parquet")
        write_table(cells.filter(pa.array(group_np == g)), uri, storage)
        written[int(g)] = uri
    return {"bucket": bucket, "rows": table.num_rows, "embedded": int(valid.sum()), "identities": stats.num_rows,
            "cells": written}


def training_sample(root: str, files: dict[int, list[str]], storage: StorageConfig, rows: int, seed: int = 0
                    ) -> np.ndarray:
    """Up to `rows` unit embeddings drawn from the buckets (identities are hashed to buckets at random)."""
    from cafi.identities.buckets import read_parts

    rng = np.random.default_rng(seed)
    per = max(1, rows // max(1, len(files)))
    parts = []
    for paths in files.values():
        t = read_parts(root, paths[:1], storage, pa.schema([("embedding", EMBEDDING)]))
        x, valid = embeddings(t["embedding"])
        x = x[valid]
        parts.append(x[rng.choice(len(x), min(per, len(x)), replace=False)] if len(x) else x)
    return np.concatenate(parts) if parts else np.zeros((0, columns.EMBEDDING_DIM), np.float32)
