"""The output: a hive-partitioned Parquet manifest plus per-run commit records.

Layout under `output.uri`:
  manifest/<partition>=<value>/.../<run_id>_<write>_<task>.parquet   one row per input URI
  runs/<run_id>/summary.json                                          written after the data
  runs/<run_id>/_SUCCESS                                              written last: the commit

A run without `_SUCCESS` is not committed, and readers here skip its rows.
"""

from __future__ import annotations

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

from cafi import columns
from cafi.config import StorageConfig
from cafi.fetch import RetryingWrites, write_bytes
from cafi.inputs.keep import schema_from_text
from cafi.keys import uri_keys
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

MANIFEST_DIR = "manifest"
RUNS_DIR = "runs"
SUCCESS = "_SUCCESS"
SUMMARY = "summary.json"

# Every column, its type and meaning: cafi/columns.py.
SCHEMA = columns.SCHEMA


def manifest_uri(output: str) -> str:
    return join(output, MANIFEST_DIR)


def run_uri(output: str, run_id: str) -> str:
    return join(output, RUNS_DIR, run_id)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def arrow_filesystem(uri: str, storage: StorageConfig | None, run_id: str | None = None
                     ) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over fsspec, so Ray and pyarrow see the same endpoint and credentials.
    With a `run_id` (the run's manifest writes), object-store requests are retried within
    `storage.retry_budget_s` and counted in the run's telemetry (cafi/fetch.py)."""
    fs, path = filesystem(uri, storage)
    if _is_local(fs):
        return pafs.LocalFileSystem(), path
    if run_id is None:  # reading: the client's own retries
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    writer, _ = filesystem(uri, storage, client_retries=False)  # writing: retried within the budget, counted
    return pafs.PyFileSystem(RetryingWrites(writer, (storage or StorageConfig()).retry_budget_s, run_id)), path


def write_json(uri: str, obj: dict, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    if _is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_bytes(fs, path, data, (storage or StorageConfig()).retry_budget_s)


def commit(output: str, run_id: str, summary: dict, storage: StorageConfig | None) -> None:
    """Summary first, marker last: a reader that sees the marker sees a complete run."""
    base = run_uri(output, run_id)
    write_json(join(base, SUMMARY), summary, storage)
    fs, path = filesystem(join(base, SUCCESS), storage)
    write_bytes(fs, path, b"", (storage or StorageConfig()).retry_budget_s)


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


# Field metadata of `embedding`: which recognizer (stage, arch, sha256; cafi.stages.specs.embedding_model)
# the run took its embeddings from. Every file a run writes carries it in its Arrow schema.
EMBEDDING_MODEL = b"cafi.embedding_model"


def with_embedding_model(schema: pa.Schema, model: dict | None) -> pa.Schema:
    """The schema with `embedding`'s recognizer recorded in its field metadata (unchanged without one)."""
    if model is None:
        return schema
    i = schema.get_field_index("embedding")
    return schema.set(i, schema.field(i).with_metadata({EMBEDDING_MODEL: json.dumps(model, sort_keys=True)}))


def embedding_model_of(schema: pa.Schema) -> dict | None:
    """The recognizer a file's `embedding` came from (None: not recorded, as before cafi recorded it)."""
    meta = schema.field("embedding").metadata if "embedding" in schema.names else None
    text = (meta or {}).get(EMBEDDING_MODEL)
    return json.loads(text) if text else None


def with_kept(kept: pa.Schema | None) -> pa.Schema:
    """The schema a run writes: the cafi columns, then its input.keep_columns (cafi/inputs/keep.py)."""
    return SCHEMA if not kept else pa.schema([*SCHEMA, *kept])


def kept_columns(runs: list[dict]) -> pa.Schema:
    """The kept columns of these runs (their summaries record the types), in first-seen order; where
    two runs keep a column with different types, the newest run's type."""
    fields: dict[str, pa.Field] = {}
    for summary in runs:
        text = (summary.get("input") or {}).get("keep_schema")
        for f in (schema_from_text(text) if text else []):
            fields[f.name] = f
    return pa.schema(list(fields.values()))


def dataset(output: str, storage: StorageConfig | None = None, kept: pa.Schema | None = None) -> pds.Dataset:
    """Every manifest file, committed or not, as one hive-partitioned pyarrow dataset; with `kept`,
    those input columns too (null in files that lack them)."""
    fs, path = arrow_filesystem(manifest_uri(output), storage)
    return pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", schema=with_kept(kept))


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
    kept = kept_columns([r for r in runs if r["run_id"] in run_ids or set(r.get("includes_runs") or []) & set(run_ids)])
    empty = with_kept(kept).empty_table()
    if not run_ids:
        return empty if columns is None else empty.select(columns)
    flt = pc.field("run_id").isin(run_ids)
    if version is not None:
        flt = flt & (pc.field("model_version") == version)
    # Read only what is asked for, plus what de-duplication needs.
    needed = None if columns is None else list(dict.fromkeys([*columns, "uri", "scored_at"]))
    table = dataset(output, storage, kept).to_table(filter=flt, columns=needed)
    table = latest_per_uri(table)
    return table.select(columns) if columns else table


def latest_per_uri(table: pa.Table) -> pa.Table:
    """One row per URI, the newest (`scored_at`) where several runs of a version wrote the same URI."""
    if table.num_rows == 0 or pc.count_distinct(table["uri"]).as_py() == table.num_rows:
        return table
    table = table.take(pc.sort_indices(table, sort_keys=[("uri", "ascending"), ("scored_at", "descending")]))
    uris = table["uri"].combine_chunks()
    first = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


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
    ignores other rows. Memory: one byte per input with `only`, else 16 bytes per row.
    """
    flt = pc.field("run_id").isin(run_ids) & (pc.field("model_version") == version)
    status: Counter = Counter()
    reasons: Counter = Counter()
    seen = np.zeros(len(only), dtype=bool) if only is not None else None
    rows, keys = 0, []
    # small batches, little read-ahead: the driver holds a few batches of URIs at a time
    scanner = dataset(output, storage).scanner(columns=["uri", "status", "reject_reason"], filter=flt,
                                               batch_size=65_536, batch_readahead=2, fragment_readahead=1)
    for batch in scanner.to_batches():
        k = uri_keys(batch.column("uri").to_pylist())
        if seen is not None:
            pos = np.minimum(np.searchsorted(only, k), max(len(only) - 1, 0))
            known = (only[pos] == k) if len(only) else np.zeros(len(k), dtype=bool)
            # a URI written twice (concurrent runs of a version) counts once: its first row here
            hits = np.flatnonzero(known)
            _, first = np.unique(pos[hits], return_index=True)
            take = np.zeros(len(k), dtype=bool)
            take[hits[first]] = True
            take &= ~seen[pos]
            seen[pos[take]] = True
            batch, k = batch.filter(pa.array(take)), k[take]
        rows += batch.num_rows
        for name, counter in (("status", status), ("reject_reason", reasons)):
            for item in pc.value_counts(batch.column(name)).to_pylist():
                if item["values"] is not None:
                    counter[item["values"]] += item["counts"]
        if seen is None:
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


def write_dataset(ds, output: str, run_id: str, storage: StorageConfig | None, partition_by: list[str],
                  min_rows_per_file: int, schema: pa.Schema = SCHEMA) -> None:
    """Stream a Ray dataset of manifest rows into the manifest: hive partitions, every file name
    starting with the run id (resume and readers key on it), files written as blocks finish."""
    from ray.data.datasource import FilenameProvider

    fs, path = arrow_filesystem(manifest_uri(output), storage, run_id)
    ds.write_parquet(path, filesystem=fs, partition_cols=list(partition_by),
                     filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
                     schema=schema, min_rows_per_file=min_rows_per_file)
