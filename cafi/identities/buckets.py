"""Grouping by identity on Ray Data: hash buckets, not `groupby().map_groups`.

`groupby().map_groups` sorts and materialises the whole dataset and pays a task per small group
(Ray issues 49133, 57936). Here one streaming pass reads the run's manifest files, gives every row
its identity (from the identities CSV, by URI key, or from a kept column) and its bucket (a stable
hash of the identity modulo the bucket count), and writes the rows as `bucket=<b>/` Parquet files.
Every identity lies whole in one bucket, so the within-identity work is one task per bucket whose
memory is that bucket's rows, and no identity ever crosses tasks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cafi import columns, manifest, runs
from cafi.config import StorageConfig
from cafi.keys import uri_keys
from cafi.storage import filesystem, join

BUCKET = "bucket"
READ = ["uri", "embedding", "shard_offset", "shard_size", "scored_at"]
SCHEMA = pa.schema([("uri", pa.string()), ("identity", pa.string()), ("quality", pa.float64()),
                    ("embedding", columns.BY_NAME["embedding"].type), ("shard_offset", pa.int64()),
                    ("shard_size", pa.int64()), ("scored_at", pa.timestamp("us")), (BUCKET, pa.int64())])


def bucket_of(identities: np.ndarray, n_buckets: int) -> np.ndarray:
    """A stable hash (BLAKE2b, not Python's salted hash) of each identity, modulo n_buckets."""
    uniq, inverse = np.unique(identities.astype(str), return_inverse=True)
    h = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uniq],
                 dtype=np.uint64)
    return (h % np.uint64(n_buckets)).astype(np.int64)[inverse]


def lookup(ids: pa.Table) -> dict:
    """The identities CSV as sorted URI keys and their identities (what every read task holds)."""
    keys = uri_keys(ids["uri"].to_pylist())
    order = np.argsort(keys)
    return {"keys": keys[order], "identity": ids["identity"].combine_chunks().take(pa.array(order))}


_LOOKUPS: dict = {}


def _lookup(ref) -> dict:
    import ray

    key = ref.hex()
    if key not in _LOOKUPS:
        _LOOKUPS.clear()
        _LOOKUPS[key] = ray.get(ref)
    return _LOOKUPS[key]


def assign(batch: pa.Table, table: dict | None, identity_column: str | None, quality: str,
           n_buckets: int) -> pa.Table:
    """Rows of a manifest batch with their identity (from the `lookup` table, else from the column),
    oriented quality and bucket; rows without an identity go."""
    if table is not None:
        keys = uri_keys(batch["uri"].to_pylist())
        pos = np.minimum(np.searchsorted(table["keys"], keys), max(len(table["keys"]) - 1, 0))
        found = table["keys"][pos] == keys
        batch = batch.filter(pa.array(found))
        identity = table["identity"].take(pa.array(pos[found]))
    else:
        identity = pc.cast(batch[identity_column], pa.string())
        ok = pc.fill_null(pc.and_(pc.is_valid(identity), pc.not_equal(pc.utf8_trim_whitespace(identity), "")), False)
        batch = batch.filter(ok)
        identity = pc.utf8_trim_whitespace(identity.filter(ok))
    identity = identity.combine_chunks() if isinstance(identity, pa.ChunkedArray) else identity
    q = columns.BY_NAME[quality].oriented(batch[quality].to_numpy(zero_copy_only=False))
    buckets = bucket_of(identity.to_numpy(zero_copy_only=False), n_buckets)
    cols = {"uri": batch["uri"], "identity": identity, "quality": pa.array(q, pa.float64()),
            "embedding": batch["embedding"], "shard_offset": batch["shard_offset"],
            "shard_size": batch["shard_size"], "scored_at": batch["scored_at"], BUCKET: pa.array(buckets)}
    return pa.table(cols, schema=SCHEMA)


def read_assign(items: pa.Table, output: str, storage: StorageConfig, read: list[str], lookup_ref: list | None,
                **assigning):
    """Manifest files (one per item) -> their rows with identity and bucket, a record batch at a time."""
    fs, _ = filesystem(output, storage)
    table = _lookup(lookup_ref[0]) if lookup_ref is not None else None
    for path in items["path"].to_pylist():
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=runs.BATCH_ROWS, columns=read):
                out = assign(pa.Table.from_batches([batch]), table, **assigning)
                if out.num_rows:
                    yield out


@dataclass
class Buckets:
    root: str                    # <work>/buckets
    files: dict[int, list[str]]  # bucket -> its files (paths of the storage's filesystem)
    count: int
    run_rows: int                # rows of the run's manifest files (before the identities join)


def run_files(ref: runs.RunRef, storage: StorageConfig) -> tuple[list[str], int]:
    """The run's manifest files (its own run ids, its model version) and their row count (footers only)."""
    version = ref.summary.get("model_version")
    ids = set(runs.run_ids(ref))
    files = [p for p, rid in manifest.version_files(ref.output, version, storage) if rid in ids]
    fs, _ = filesystem(ref.output, storage)
    rows = 0
    for p in files:
        with fs.open(p, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return files, rows


def write_buckets(ref: runs.RunRef, storage: StorageConfig, work: str, lookup_ref, identity_column: str | None,
                  quality: str, bucket_rows: int) -> Buckets:
    """One Ray Data pass: the run's rows, with identity and bucket, as `<work>/buckets/bucket=<b>/*.parquet`."""
    import ray

    files, rows = run_files(ref, storage)
    n_buckets = max(1, math.ceil(rows / bucket_rows))
    root = join(work, "buckets")
    if files:
        read = list(dict.fromkeys(READ + [quality] + ([identity_column] if identity_column else [])))
        # One item per manifest file, read in record batches inside the task: no schema inference or
        # listing pass (read_parquet's), and a task's memory is a batch, not a file.
        ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files))
        ds = ds.map_batches(read_assign, batch_size=1, batch_format="pyarrow", fn_kwargs={
            "output": ref.output, "storage": storage, "read": read,
            "lookup_ref": [lookup_ref] if lookup_ref is not None else None, "identity_column": identity_column,
            "quality": quality, "n_buckets": n_buckets}, num_cpus=0.5)
        wfs, wpath = manifest.arrow_filesystem(root, storage)
        ds.write_parquet(wpath, filesystem=wfs, partition_cols=[BUCKET], min_rows_per_file=bucket_rows)
    sfs, spath = filesystem(root, storage)
    by_bucket: dict[int, list[str]] = {}
    for p in (sorted(sfs.find(spath)) if sfs.exists(spath) else []):
        part = [s for s in p.split("/") if s.startswith(f"{BUCKET}=")]
        if p.endswith(".parquet") and part:
            by_bucket.setdefault(int(part[-1].split("=", 1)[1]), []).append(p)
    return Buckets(root, by_bucket, n_buckets, rows)


ROW_SCHEMA = SCHEMA.remove(SCHEMA.get_field_index(BUCKET))


def read_parts(root: str, files: list[str], storage: StorageConfig, schema: pa.Schema) -> pa.Table:
    """Parquet files (paths of root's filesystem) as one table of `schema`."""
    fs, _ = filesystem(root, storage)
    parts = []
    for p in files:
        with fs.open(p, "rb") as fh:
            parts.append(pq.read_table(fh, columns=schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def read_bucket(root: str, files: list[str], storage: StorageConfig) -> pa.Table:
    """One bucket's rows, one per URI (the newest where resumed runs wrote a URI twice)."""
    return manifest.latest_per_uri(read_parts(root, files, storage, ROW_SCHEMA))
