"""The output: a hive-partitioned Parquet manifest plus per-run commit records.

Layout under `output.uri`:
  manifest/<partition>=<value>/.../<run_id>_<write>_<task>.parquet   one row per input URI
  runs/<run_id>/summary.json                                          written after the data
  runs/<run_id>/_SUCCESS                                              written last: the commit

A run without `_SUCCESS` is not committed, and readers here skip its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cafi.config import StorageConfig
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

MANIFEST_DIR = "manifest"
RUNS_DIR = "runs"
SUCCESS = "_SUCCESS"
SUMMARY = "summary.json"

SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("det_score", pa.float32()),
    ("landmarks", pa.list_(pa.float32(), 10)),  # eyes, nose, mouth corners (x, y) in crop pixels
    ("mask_fraction", pa.float32()),
    ("serfiq", pa.float32()),
    ("serfiq_raw", pa.float32()),
    ("dbcnn", pa.float32()),
    ("cafi", pa.float32()),
    ("accepted", pa.bool_()),
    ("decision", pa.string()),
    ("reject_reason", pa.string()),
    ("model_version", pa.string()),
    ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us")),
])


def manifest_uri(output: str) -> str:
    return join(output, MANIFEST_DIR)


def run_uri(output: str, run_id: str) -> str:
    return join(output, RUNS_DIR, run_id)


def arrow_filesystem(uri: str, storage: StorageConfig | None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over fsspec, so Ray and pyarrow see the same endpoint and credentials."""
    fs, path = filesystem(uri, storage)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def write_json(uri: str, obj: dict, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)


def commit(output: str, run_id: str, summary: dict, storage: StorageConfig | None) -> None:
    """Summary first, marker last: a reader that sees the marker sees a complete run."""
    base = run_uri(output, run_id)
    write_json(join(base, SUMMARY), summary, storage)
    fs, path = filesystem(join(base, SUCCESS), storage)
    with fs.open(path, "wb") as fh:
        fh.write(b"")


def committed_runs(output: str, storage: StorageConfig | None = None) -> list[dict]:
    """Summaries of committed runs, oldest first."""
    fs, root = filesystem(join(output, RUNS_DIR), storage)
    if not fs.exists(root):
        return []
    runs = []
    for entry in fs.ls(root, detail=False):
        if fs.exists(posixpath.join(entry, SUCCESS)):
            with fs.open(posixpath.join(entry, SUMMARY), "r") as fh:
                runs.append(json.load(fh))
    return sorted(runs, key=lambda s: s.get("finished_at", ""))


def is_committed(output: str, run_id: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(join(run_uri(output, run_id), SUCCESS), storage)
    return fs.exists(path)


def dataset(output: str, storage: StorageConfig | None = None) -> pds.Dataset:
    """Every manifest file, committed or not, as one hive-partitioned pyarrow dataset."""
    fs, path = arrow_filesystem(manifest_uri(output), storage)
    return pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", schema=SCHEMA)


def read(output: str, version: str | None = "latest", storage: StorageConfig | None = None,
         columns: list[str] | None = None, run_ids: list[str] | None = None) -> pa.Table:
    """Committed rows as one table: of one model version, or of the latest committed one.

    Exactly one row per input URI: where several committed runs of the version scored the
    same URI, the newest row wins.
    """
    runs = committed_runs(output, storage)
    if run_ids is None:
        if version == "latest":
            if not runs:
                return SCHEMA.empty_table()
            version = runs[-1]["model_version"]
        run_ids = _committed_ids(runs, version)
    if not run_ids:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    flt = pc.field("run_id").isin(run_ids)
    if version is not None:
        flt = flt & (pc.field("model_version") == version)
    # Read only what is asked for, plus what de-duplication needs.
    needed = None if columns is None else list(dict.fromkeys([*columns, "uri", "scored_at"]))
    table = dataset(output, storage).to_table(filter=flt, columns=needed)
    table = _latest_per_uri(table)
    return table.select(columns) if columns else table


def _latest_per_uri(table: pa.Table) -> pa.Table:
    if table.num_rows == 0 or pc.count_distinct(table["uri"]).as_py() == table.num_rows:
        return table
    order = pc.sort_indices(table, sort_keys=[("uri", "ascending"), ("scored_at", "descending")])
    table = table.take(order)
    uris = table["uri"].to_pylist()
    keep = [i for i, u in enumerate(uris) if i == 0 or u != uris[i - 1]]
    return table.take(pa.array(keep))


def _committed_ids(runs: list[dict], version: str | None) -> list[str]:
    ids: list[str] = []
    for r in runs:
        if version is None or r["model_version"] == version:
            ids += [r["run_id"], *r.get("includes_runs", [])]
    return sorted(set(ids))


def committed_run_ids(output: str, version: str, storage: StorageConfig | None = None) -> list[str]:
    """Run ids whose rows make up the committed result of a version: committed runs and the
    crashed attempts a committed resume took over."""
    return _committed_ids(committed_runs(output, storage), version)


def uri_keys(uris: list[str]) -> np.ndarray:
    """16-byte BLAKE2b keys of URIs: what resume and reuse hold per row instead of the URI string."""
    return np.array([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in uris], dtype="S16")


def version_files(output: str, version: str, storage: StorageConfig | None = None) -> list[tuple[str, str]]:
    """(path, run_id) of every data file of a version, committed or not."""
    fs, root = filesystem(join(manifest_uri(output), f"model_version={version}"), storage)
    if not fs.exists(root):
        return []
    return [(p, posixpath.basename(p).split("_", 1)[0]) for p in sorted(fs.find(root)) if p.endswith(".parquet")]


def scan_version(output: str, version: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """Keys of every URI already written for a version (sorted, unique) and the runs that wrote them.

    A data file that cannot be read is the torn write of a crashed run: it is removed, so its
    rows are scored again instead of being lost or read half.
    """
    fs, _ = filesystem(output, storage)
    keys, runs = [], set()
    for path, run_id in version_files(output, version, storage):
        try:
            with fs.open(path, "rb") as fh:
                uris = pq.read_table(fh, columns=["uri"])["uri"].to_pylist()
        except Exception as exc:  # noqa: BLE001 - truncated footer, zero bytes, ...
            log.warning("removing unreadable data file of an uncommitted run: %s (%s)", path, exc)
            fs.rm(path)
            continue
        keys.append(uri_keys(uris))
        runs.add(run_id)
    merged = np.unique(np.concatenate(keys)) if keys else np.array([], dtype="S16")
    return merged, sorted(runs)


def run_counts(output: str, run_ids: list[str], version: str, storage: StorageConfig | None = None,
               only: np.ndarray | None = None) -> dict:
    """Counts per status and reject reason over the rows of the given runs of a version.

    Streamed from storage; with `only` (sorted input keys), counts each of those inputs once and
    ignores other rows. Memory: 16 bytes per row beyond the keys.
    """
    flt = pc.field("run_id").isin(run_ids) & (pc.field("model_version") == version)
    status: Counter = Counter()
    reasons: Counter = Counter()
    seen = np.zeros(len(only), dtype=bool) if only is not None else None
    rows, keys = 0, []
    for batch in dataset(output, storage).to_batches(columns=["uri", "status", "reject_reason"], filter=flt):
        k = uri_keys(batch.column("uri").to_pylist())
        if seen is not None:
            pos = np.searchsorted(only, k)
            take = np.zeros(len(k), dtype=bool)
            for i, p in enumerate(pos):  # a URI written twice (concurrent runs of a version) counts once
                if p < len(only) and only[p] == k[i] and not seen[p]:
                    seen[p] = take[i] = True
            batch, k = batch.filter(pa.array(take)), k[take]
        rows += batch.num_rows
        status.update(batch.column("status").to_pylist())
        reasons.update(r for r in batch.column("reject_reason").to_pylist() if r is not None)
        keys.append(k)
    distinct = int(seen.sum()) if seen is not None else len(np.unique(np.concatenate(keys))) if keys else 0
    return {
        "rows": rows,
        "distinct_uris": distinct,
        "status": dict(status),
        "reject_reason": dict(reasons),
        "accepted": int(rows - sum(reasons.values())),
    }


def abandon(output: str, run_id: str, storage: StorageConfig | None = None) -> None:
    """Remove the start marker of a run that had nothing to do."""
    fs, path = filesystem(run_uri(output, run_id), storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
