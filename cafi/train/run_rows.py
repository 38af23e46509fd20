"""The rows of a committed run a trainer learns from: its manifest files (a run, or an output root's
latest model version), the identity of each row (an identities CSV, or a column the run kept), and
checks, from Parquet metadata only, that the run stored what training needs (embeddings, landmarks)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import manifest, runs
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.redact import redact_uri


def run_files(uri: str, storage: StorageConfig | None) -> tuple[runs.RunRef, list[str]]:
    """The run (or the output root's latest model version) and its manifest files."""
    ref = runs.resolve_run(uri, storage)
    version = ref.summary.get("model_version")
    if ref.uri.rstrip("/") != uri.rstrip("/"):  # an output root: every committed run of its latest version
        committed = [r for r in manifest.committed_runs(ref.output, storage) if r.get("model_version") == version]
        ids = {i for r in committed for i in (r["run_id"], *(r.get("includes_runs") or []))}
    else:
        ids = set(runs.run_ids(ref))
    files = [p for p, run_id in manifest.version_files(ref.output, version, storage) if run_id in ids]
    if not files:
        raise CafiError(f"{redact_uri(uri)} has no manifest files")
    return ref, files


def arrow_fs(ref: runs.RunRef, storage: StorageConfig | None):
    """The pyarrow filesystem the run's manifest files are read with."""
    return manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)[0]


def may_hold(meta, column: str) -> bool:
    """Whether a Parquet file may hold a non-null `column` (its statistics say; unknown counts as yes)."""
    leaf = [i for i in range(meta.num_columns)
            if meta.schema.column(i).path == column or meta.schema.column(i).path.startswith(column + ".")]
    if not leaf:
        return False
    for g in range(meta.num_row_groups):
        col = meta.row_group(g).column(leaf[0])
        st = col.statistics
        if st is None or not st.has_null_count or st.null_count < col.num_values:
            return True
    return False


def require_column(ref: runs.RunRef, files: list[str], column: str, what: str, why: str,
                   storage: StorageConfig | None) -> None:
    """Stop early (metadata only) when no file of the run holds a non-null `column` (`what`, in words);
    `why` ends the message."""
    import pyarrow.parquet as pq

    fs = arrow_fs(ref, storage)
    if not any(may_hold(pq.ParquetFile(p, filesystem=fs).metadata, column) for p in files):
        raise CafiError(f"run {ref.run_id} stored no {what}: {why}")


def embedding_model(ref: runs.RunRef, files: list[str], storage: StorageConfig | None) -> dict | None:
    """The one recognizer the run's stored embeddings come from (their field metadata); refused when two."""
    import pyarrow.parquet as pq

    fs = arrow_fs(ref, storage)
    found = {}
    for p in files:
        model = manifest.embedding_model_of(pq.read_schema(p, filesystem=fs))
        if model is not None:
            found.setdefault(json.dumps(model, sort_keys=True), model)
    models = list(found.values())
    if len(models) > 1:
        raise CafiError(f"the embeddings of run {ref.run_id} come from {len(models)} recognizers: a trainer "
                        "compares pairs of one recognizer's embeddings")
    return models[0] if models else None


def identity_source(ref: runs.RunRef, identities: str | None, identity_column: str,
                    storage: StorageConfig | None) -> tuple[pa.Table | None, str | None]:
    """Where each row's identity comes from: (the identities CSV as uri, identity; None) or, without a CSV,
    (None; the kept column), refused when the run kept no such column."""
    from cafi.eval_inputs import read_identities

    if identities:
        return read_identities(identities, storage, identity_column), None
    names = manifest.kept_columns([ref.summary]).names
    if identity_column not in names:
        raise CafiError(f"run {ref.run_id} kept no column {identity_column!r} (kept: {names or 'none'}): give "
                        "--identities IDS.csv or the kept column holding the identity")
    return None, identity_column


def with_identity(table: pa.Table, ids: pa.Table | None, kept: str | None, columns: list[str]) -> pa.Table:
    """The batch's `columns` and an `identity` (from the CSV table, or the kept column), rows with an
    identity and no null in `columns` only."""
    if ids is not None:
        identity = ids["identity"].take(pc.index_in(table["uri"], value_set=ids["uri"]))
    else:
        identity = pc.cast(table[kept], pa.string())
    keep = pc.is_valid(identity)
    for c in columns:
        if c != "uri":
            keep = pc.and_(keep, pc.is_valid(table[c]))
    return pa.table({"uri": table["uri"], "identity": identity,
                     **{c: table[c] for c in columns if c != "uri"}}).filter(keep)


def file_rows(path: str, fs) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) numpy from a fixed-size-list column without nulls."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), -1) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
