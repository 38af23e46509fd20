"""SDD-FIQA pseudo-labels for millions of rows as a Ray Data job (`cafi train sddfiqa ... --labels-only`).

The input is a dataset of `uri`, `identity` (string), `embedding` (fixed-size list, the run's stored
recognition embedding) and optionally `scored_at`. The flow:

1. each row gets its identity's code (a 64-bit hash) and a bucket (code mod the number of buckets);
2. the pool, a seeded random sample of at most POOL rows of the whole set (the rows of smallest
   seeded URI hash), is collected on the driver (POOL x 512 floats) and put in the object store once;
3. the rows are grouped by bucket (Ray Data's distributed shuffle: a bucket's rows meet on one worker,
   never the whole set), and each bucket computes its raw distances vectorised (cafi/train/sdd_labels.py),
   its random draws seeded by (seed, bucket) over rows sorted by (code, uri): reproducible whatever
   the blocks;
4. the per-draw minimum and maximum over the set (read on the driver: 12 floats a row) normalise the
   distances to 0..100, averaged over the draws: the label, streamed into one Parquet file.

Memory per worker is bounded by a bucket (about BUCKET_ROWS rows), not by the set. A set of at most
LOCAL_ROWS rows (= POOL: the pool is then every row, and one bucket) skips steps 2-3's two passes and
the shuffle: its rows come to the driver once and the same bucket function labels them there (the
same draws, so the same labels up to float rounding; starting a shuffle costs more than such a set's
work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi.errors import CafiError
from cafi.train import sdd_labels
from cafi.train.run_rows import vectors_of

POOL = 8192            # other-identity draws come from this many rows of the whole set (all when fewer)
BUCKET_ROWS = 50_000   # rows per identity bucket (a bucket's embeddings: ~100 MiB as float32)
LOCAL_ROWS = POOL      # a set of at most this many rows is labelled on the driver: no shuffle to start
ID_KEY = "cafi-sddfiqa-ids"  # pandas hash keys are 16 characters


def identity_codes(identities: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """One 64-bit code per identity string, the same in every process (a keyed hash, not Python's)."""
    from pandas.util import hash_array

    return hash_array(np.asarray(identities, dtype=object), hash_key=ID_KEY, categorize=False)


def uri_ranks(uris, seed: int) -> np.ndarray:
    """A seeded pseudo-random 64-bit rank per URI: the pool is the rows of smallest rank."""
    from pandas.util import hash_array

    return hash_array(np.asarray(uris, dtype=object), hash_key=f"{seed % 10**16:016d}", categorize=False)


def _tag(table: pa.Table, buckets: int) -> pa.Table:
    codes = identity_codes(table["identity"])
    return table.append_column("code", pa.array(codes, pa.uint64())).append_column(
        "bucket", pa.array((codes % np.uint64(buckets)).astype(np.int64)))


def _pool_candidates(table: pa.Table, seed: int, threshold: float) -> pa.Table:
    ranks = uri_ranks(table["uri"], seed)
    keep = ranks.astype(np.float64) < threshold
    return pa.table({"rank": pa.array(ranks[keep], pa.uint64()), "code": table["code"].filter(pa.array(keep)),
                     "embedding": table["embedding"].filter(pa.array(keep))})


def collect_pool(tagged, seed: int, n_estimate: int, size: int = POOL) -> dict:
    """The `size` rows of smallest seeded URI rank (twice as many candidates kept per block, then cut on
    the driver), as unit float32 vectors sorted by identity code, ties by rank."""
    threshold = 2.0**64 * min(1.0, 2.0 * size / max(n_estimate, 1))
    parts = [b for b in tagged.map_batches(_pool_candidates, fn_kwargs={"seed": seed, "threshold": threshold},
                                           batch_format="pyarrow", zero_copy_batch=True)
             .iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not parts:
        return {"vectors": np.zeros((0, 0), np.float32), "codes": np.zeros(0, np.uint64)}
    return _pool_of(pa.concat_tables(parts), size)


def _pool_of(candidates: pa.Table, size: int) -> dict:
    """The pool from candidate rows (rank, code, embedding): the `size` of smallest rank, sorted by code."""
    t = candidates.take(pc.sort_indices(candidates, [("rank", "ascending")])[:size])
    t = t.take(pc.sort_indices(t, [("code", "ascending"), ("rank", "ascending")]))
    return {"vectors": sdd_labels.unit(vectors_of(t["embedding"])), "codes": t["code"].to_numpy()}


def _bucket(table: pa.Table, pool_ref, seed: int) -> pa.Table:
    import ray

    from cafi.manifest import latest_per_uri

    # map_groups passes its fn_args as they are (Ray 2.60): fetched here, numpy zero-copy from the store
    pool = ray.get(pool_ref) if isinstance(pool_ref, ray.ObjectRef) else pool_ref

    if "scored_at" in table.column_names:  # one row per URI: the newest where a run re-scored one
        table = latest_per_uri(table)
    table = table.take(pc.sort_indices(table, [("code", "ascending"), ("uri", "ascending")]))
    rng = np.random.default_rng([seed, int(table["bucket"][0].as_py())])
    try:
        dist, n_same = sdd_labels.bucket_distances(vectors_of(table["embedding"]), table["code"].to_numpy(),
                                                   pool["vectors"], pool["codes"], rng)
    except ValueError as exc:
        raise CafiError(str(exc)) from None
    dist_col = pa.FixedSizeListArray.from_arrays(pa.array(dist.ravel(), pa.float32()), sdd_labels.REPEATS)
    return pa.table({"uri": table["uri"], "identity": table["identity"], "code": table["code"],
                     "n_same": pa.array(n_same, pa.int32()), "dist": dist_col})


def _label(table: pa.Table, lo: np.ndarray, hi: np.ndarray) -> pa.Table:
    labels = sdd_labels.normalise(vectors_of(table["dist"]).astype(np.float64), lo, hi)
    return pa.table({"uri": table["uri"], "identity": table["identity"],
                     "label": pa.array(labels.astype(np.float32), pa.float32(), mask=np.isnan(labels)),
                     "n_same": table["n_same"], "code": table["code"]})


def pseudo_labels(ds, n_estimate: int, seed: int = 0, pool_size: int = POOL,
                  bucket_rows: int = BUCKET_ROWS) -> Labels:
    """The labels (batches of uri, identity, label: float32, null without one; n_same; code) of a dataset
    of uri, identity, embedding (and optionally scored_at). `n_estimate`: an upper bound of its rows (sets
    the number of buckets and the pool's sampling rate)."""
    buckets = max(1, math.ceil(n_estimate / bucket_rows))
    tagged = ds.map_batches(_tag, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
    if n_estimate <= min(LOCAL_ROWS, pool_size):
        return _small_set(tagged, seed, pool_size)
    pool = collect_pool(tagged, seed, n_estimate, pool_size)
    if len(pool["codes"]) == 0:
        raise CafiError("no row with an embedding and an identity: nothing to label")
    import ray

    pool_ref = ray.put(pool)
    dists = tagged.groupby("bucket", num_partitions=buckets).map_groups(_bucket, fn_args=(pool_ref, seed),
                                                                       batch_format="pyarrow").materialize()
    lo, hi = _extremes(dists.iter_batches(batch_format="pyarrow", batch_size=None))
    return Labels(dists, lo, hi)


def _small_set(tagged, seed: int, pool_size: int) -> Labels:
    """A set no larger than the pool, in one bucket: its rows (embeddings included, at most LOCAL_ROWS)
    come to the driver in one pass, which computes the pool and the bucket as the distributed path
    would (every row is in the pool, the one bucket is every row): the same labels without a shuffle."""
    parts = [b for b in tagged.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not parts:
        raise CafiError("no row with an embedding and an identity: nothing to label")
    table = pa.concat_tables(parts)
    ranks = uri_ranks(table["uri"], seed)
    pool = _pool_of(pa.table({"rank": pa.array(ranks, pa.uint64()), "code": table["code"],
                              "embedding": table["embedding"]}), pool_size)
    dists = _bucket(table, pool, seed)
    lo, hi = _extremes([dists])
    return Labels(dists, lo, hi)


def _extremes(batches) -> tuple[np.ndarray, np.ndarray]:
    """Each draw's minimum and maximum distance over the labelled rows (12 floats a row are read)."""
    lo = hi = None
    for batch in batches:
        d = vectors_of(batch["dist"])
        d = d[~np.isnan(d[:, 0])] if len(d) else d
        if len(d):
            lo = d.min(axis=0) if lo is None else np.minimum(lo, d.min(axis=0))
            hi = d.max(axis=0) if hi is None else np.maximum(hi, d.max(axis=0))
    if lo is None:
        raise CafiError("no identity has two samples with embeddings: SDD-FIQA labels need genuine pairs")
    return lo.astype(np.float64), hi.astype(np.float64)


@dataclass
class Labels:
    """The raw distances of every row (a materialized dataset, or a table for a small set) and each
    draw's extremes over the set."""
    dists: object
    lo: np.ndarray
    hi: np.ndarray

    def batches(self, batch_size: int = 65_536):
        if isinstance(self.dists, pa.Table):
            parts = (self.dists.slice(i, batch_size) for i in range(0, self.dists.num_rows, batch_size))
        else:
            parts = self.dists.iter_batches(batch_format="pyarrow", batch_size=batch_size)
        for batch in parts:
            yield _label(batch, self.lo, self.hi)


LABELS_SCHEMA = pa.schema([("uri", pa.string()), ("identity", pa.string()), ("label", pa.float32()),
                           ("n_same", pa.int32())])
HIST_BINS = 20


def write_labels(labels: Labels, uri: str, storage=None) -> dict:
    """Stream the labels dataset into one Parquet file at `uri` (labels and URIs only pass the driver,
    never embeddings); its statistics: rows, labelled, unlabelled (identities of one sample),
    identities, label mean/std and a 0..100 histogram."""
    import pyarrow.parquet as pq

    from cafi.storage import filesystem

    fs, path = filesystem(uri, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    rows = labelled = 0
    total = total_sq = 0.0
    counts = np.zeros(HIST_BINS, np.int64)
    codes = []
    with fs.open(path, "wb") as fh, pq.ParquetWriter(fh, LABELS_SCHEMA) as writer:
        for batch in labels.batches():
            writer.write_table(batch.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA))
            lab = batch["label"].drop_null().to_numpy().astype(np.float64)
            rows, labelled = rows + batch.num_rows, labelled + len(lab)
            total, total_sq = total + lab.sum(), total_sq + (lab**2).sum()
            counts += np.histogram(lab, bins=HIST_BINS, range=(0.0, 100.0))[0]
            codes.append(np.unique(batch["code"].to_numpy()))
    mean = total / labelled if labelled else None
    return {"rows": rows, "labelled": labelled, "unlabelled_one_sample": rows - labelled,
            "identities": int(len(np.unique(np.concatenate(codes)))) if codes else 0,
            "label_mean": mean, "label_std": math.sqrt(max(total_sq / labelled - mean**2, 0.0)) if labelled else None,
            "histogram": {"edges": np.linspace(0, 100, HIST_BINS + 1).tolist(), "counts": counts.tolist()}}
