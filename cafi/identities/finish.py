"""Keep and reason per bucket, once the cross-identity results are known: one Ray task per bucket
reads what `analyse` wrote, adds the conflicts, applies the caps (cafi/identities/caps.py) and writes
the bucket's part of samples.parquet and identities.parquet; it returns counts, a histogram and a few
examples of each finding for the page."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi.config import StorageConfig
from cafi.identities.analyse import ANALYSED, IDENTITY_STATS, write_table
from cafi.identities.buckets import read_parts
from cafi.identities.caps import apply_caps, first_reason
from cafi.identities.options import REASONS, Options
from cafi.identities.vectors import Groups
from cafi.storage import join

SAMPLES = pa.schema([("uri", pa.string()), ("identity", pa.string()), ("centroid_cos", pa.float32()),
                     ("outlier", pa.bool_()), ("duplicate_of", pa.string()), ("conflict_with", pa.string()),
                     ("rank", pa.int32()), ("keep", pa.bool_()), ("reason", pa.string()), ("quality", pa.float64())])
IDENTITIES = pa.schema([("identity", pa.string()), ("samples", pa.int64()), ("kept", pa.int64()),
                        ("embedded", pa.int64()), ("outliers", pa.int64()), ("duplicates", pa.int64()),
                        ("conflicts", pa.int64()), ("mean_centroid_cos", pa.float32()),
                        ("min_centroid_cos", pa.float32()), ("spread", pa.float32()),
                        ("merge_candidates", pa.list_(pa.string())), ("merge_cos", pa.list_(pa.float32()))])
HIST_EDGES = np.linspace(-1.0, 1.0, 101)
EXAMPLES = 12
EXAMPLE_COLUMNS = ["uri", "identity", "centroid_cos", "duplicate_of", "conflict_with", "reason", "shard_offset",
                   "shard_size"]


def finish(analysed: pa.Table, stats: pa.Table, conflicts: pa.Table, merges: dict, options: Options
           ) -> tuple[pa.Table, pa.Table, dict]:
    """(samples, identities, what the page and summary need) of one bucket."""
    n = analysed.num_rows
    groups = Groups.of_sorted(analysed["identity"].to_numpy(zero_copy_only=False))
    pos = pc.index_in(analysed["uri"], value_set=conflicts["uri"])
    found = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    conflict_with = conflicts["conflict_with"].take(pos)
    drop = pc.fill_null(conflicts["conflict_drop"].take(pos), False).to_numpy(zero_copy_only=False)
    flags = {
        "no_embedding": ~analysed["has_embedding"].to_numpy(zero_copy_only=False),
        "outlier": analysed["outlier"].to_numpy(zero_copy_only=False),
        "conflict": found & drop,
        "duplicate": pc.is_valid(analysed["duplicate_of"]).to_numpy(zero_copy_only=False),
    }
    assert list(flags) == list(REASONS[:4])
    reason = apply_caps(first_reason(flags, n), groups, options)
    keep = reason == None  # noqa: E711
    samples = pa.table({
        "uri": analysed["uri"], "identity": analysed["identity"], "centroid_cos": analysed["centroid_cos"],
        "outlier": analysed["outlier"], "duplicate_of": analysed["duplicate_of"], "conflict_with": conflict_with,
        "rank": analysed["rank"], "keep": pa.array(keep), "reason": pa.array(reason.tolist(), pa.string()),
        "quality": analysed["quality"]}, schema=SAMPLES)
    kept = groups.sums(keep.astype(np.int64))
    names = stats["identity"].to_pylist()
    cands = [merges.get(i, []) for i in names]
    mean = stats["mean_centroid_cos"].to_numpy(zero_copy_only=False)
    identities = pa.table({
        "identity": stats["identity"], "samples": stats["samples"], "kept": pa.array(kept, pa.int64()),
        "embedded": stats["embedded"], "outliers": stats["outliers"], "duplicates": stats["duplicates"],
        "conflicts": pa.array(groups.sums(found.astype(np.int64)), pa.int64()),
        "mean_centroid_cos": stats["mean_centroid_cos"], "min_centroid_cos": stats["min_centroid_cos"],
        "spread": pa.array(1.0 - mean, pa.float32()),
        "merge_candidates": pa.array([[c for c, _ in x] for x in cands], pa.list_(pa.string())),
        "merge_cos": pa.array([[s for _, s in x] for x in cands], pa.list_(pa.float32()))}, schema=IDENTITIES)
    cos = analysed["centroid_cos"].to_numpy(zero_copy_only=False).astype(np.float64)
    hist = {}
    finite = np.isfinite(cos)
    for name, mask in (("kept", keep), ("outlier", reason == "outlier"), ("other", ~keep & (reason != "outlier"))):
        hist[name] = np.histogram(np.clip(cos[finite & mask], -1, 1), HIST_EDGES)[0]
    extra = pa.table({"reason": samples["reason"], "conflict_with": conflict_with})
    full = pa.table({c: (extra[c] if c in extra.column_names else analysed[c]) for c in EXAMPLE_COLUMNS})
    examples = {
        "outlier": _pick(full, flags["outlier"], cos, ascending=True),
        "duplicate": _pick(full, flags["duplicate"], cos, ascending=True),
        "conflict": _pick(full, found, cos, ascending=True),
    }
    info = {"rows": n, "kept": int(keep.sum()), "identities": stats.num_rows,
            "identities_kept": int((kept > 0).sum()),
            "reasons": {r: int((reason == r).sum()) for r in REASONS},
            "flagged": {"outlier": int(flags["outlier"].sum()), "duplicate": int(flags["duplicate"].sum()),
                        "conflict": int(found.sum())},
            "hist": hist, "examples": examples}
    return samples, identities, info


def _pick(table: pa.Table, mask: np.ndarray, cos: np.ndarray, ascending: bool) -> list[dict]:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    key = np.where(np.isfinite(cos[idx]), cos[idx], np.inf if ascending else -np.inf)
    idx = idx[np.argsort(key if ascending else -key, kind="stable")[:EXAMPLES]]
    return table.take(pa.array(idx, pa.int64())).to_pylist()


def finish_bucket(bucket: int, work: str, storage: StorageConfig, options: Options, conflicts: pa.Table,
                  merges: dict) -> dict:
    """The task of one bucket: writes samples/bucket=<b>.parquet and identities/... under `work/final`."""
    analysed = read_parts(work, [_path(work, "analysed", bucket, storage)], storage, ANALYSED)
    stats = read_parts(work, [_path(work, "identities", bucket, storage)], storage, IDENTITY_STATS)
    samples, identities, info = finish(analysed, stats, conflicts, merges, options)
    write_table(samples, join(work, "final", "samples", f"bucket={bucket}.parquet"), storage)
    write_table(identities, join(work, "final", "identities", f"bucket={bucket}.parquet"), storage)
    return info


def _path(work: str, kind: str, bucket: int, storage: StorageConfig) -> str:
    from cafi.storage import filesystem

    _, path = filesystem(join(work, kind, f"bucket={bucket}.parquet"), storage)
    return path
