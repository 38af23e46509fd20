"""The output: a hive-partitioned Parquet manifest plus per-run commit records.

Layout under `output.uri`:
  manifest/<partition>=<value>/.../<run_id>_<write>_<task>.parquet   one row per input URI
  runs/<run_id>/summary.json                                          written after the data
  runs/<run_id>/_SUCCESS                                              written last: the commit

A run without `_SUCCESS` is not committed, and readers here skip its rows.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from cafi.config import StorageConfig
from cafi.storage import filesystem, join

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
        run_ids = [r["run_id"] for r in runs if version is None or r["model_version"] == version]
    if not run_ids:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    flt = pc.field("run_id").isin(run_ids)
    if version is not None:
        flt = flt & (pc.field("model_version") == version)
    table = dataset(output, storage).to_table(filter=flt)
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


def run_counts(output: str, run_id: str, storage: StorageConfig | None = None) -> dict:
    """Counts of one run's rows per status and per reject reason, read back from storage."""
    table = dataset(output, storage).to_table(columns=["status", "reject_reason", "uri"],
                                              filter=pc.field("run_id") == run_id)
    by_status = {r["values"]: r["counts"] for r in pc.value_counts(table["status"]).to_pylist()}
    by_reason = {str(r["values"]): r["counts"] for r in pc.value_counts(table["reject_reason"]).to_pylist()
                 if r["values"] is not None}
    return {
        "rows": table.num_rows,
        "distinct_uris": pc.count_distinct(table["uri"]).as_py() if table.num_rows else 0,
        "status": by_status,
        "reject_reason": by_reason,
        "accepted": int(table.num_rows - sum(by_reason.values())),
    }
