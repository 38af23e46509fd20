"""`cafi train sddfiqa RUN_OR_OUTPUT --identities IDS.csv --out DIR --labels-only`: SDD-FIQA pseudo-labels
of a committed run's rows, from the recognition embeddings the run stored (`output.embeddings=true`),
written to DIR/labels.parquet (uri, identity, label, n_same) and DIR/labels.json (where they came from and
their statistics). The identities come from a CSV (`uri` + `--identity-column`, default `identity`) or,
without --identities, from a column the run kept from its input (`--identity-column COL`).

The run's manifest files are read by Ray Data on the workers (cafi/sdd_job.py); the driver reads only
the identities CSV, the files' metadata, the pool sample and the labels it writes.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from cafi import manifest, runs, sdd_job, sdd_labels
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.redact import redact_uri
from cafi.storage import filesystem, join

NO_EMBEDDINGS = ("stored no embeddings: SDD-FIQA pseudo-labels are computed from the run's recognition "
                 "embeddings; re-score with output.embeddings=true to store them")


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


def _embedded(meta) -> bool:
    """Whether a Parquet file may hold a non-null embedding (its statistics say; unknown counts as yes)."""
    leaf = [i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("embedding.")]
    if not leaf:
        return False
    for g in range(meta.num_row_groups):
        col = meta.row_group(g).column(leaf[0])
        st = col.statistics
        if st is None or not st.has_null_count or st.null_count < col.num_values:
            return True
    return False


def check_embeddings(ref: runs.RunRef, files: list[str], storage: StorageConfig | None) -> dict | None:
    """Stop early (metadata only) when the run stored no embeddings; the one recognizer they come from."""
    import pyarrow.parquet as pq

    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)
    if not any(_embedded(pq.ParquetFile(p, filesystem=fs).metadata) for p in files):
        raise CafiError(f"run {ref.run_id} {NO_EMBEDDINGS}")
    found = {}
    for p in files:  # the recognizer each file records in its `embedding` field metadata
        model = manifest.embedding_model_of(pq.read_schema(p, filesystem=fs))
        if model is not None:
            found.setdefault(json.dumps(model, sort_keys=True), model)
    models = list(found.values())
    if len(models) > 1:
        raise CafiError(f"the embeddings of run {ref.run_id} come from {len(models)} recognizers: pseudo-labels "
                        "compare pairs of one recognizer")
    return models[0] if models else None


def _with_identity(table: pa.Table, ids: pa.Table | None, kept: str | None) -> pa.Table:
    """The batch's rows with an embedding and an identity (from the CSV, or the kept column)."""
    if ids is not None:
        pos = pc.index_in(table["uri"], value_set=ids["uri"])
        identity = ids["identity"].take(pos)
    else:
        identity = pc.cast(table[kept], pa.string())
    keep = pc.and_(pc.is_valid(identity), pc.is_valid(table["embedding"]))
    return pa.table({"uri": table["uri"], "identity": identity, "embedding": table["embedding"],
                     "scored_at": table["scored_at"]}).filter(keep)


def labels(uri: str, out: str, identities: str | None = None, identity_column: str = "identity",
           seed: int = 0, storage: StorageConfig | None = None) -> dict:
    """Compute and write DIR/labels.parquet and DIR/labels.json; returns the latter's content."""
    from cafi.eval_inputs import read_identities

    started = time.time()
    ref, files = run_files(uri, storage)
    recognizer = check_embeddings(ref, files, storage)
    ids = read_identities(identities, storage, identity_column) if identities else None
    kept = None
    if ids is None:
        kept = identity_column
        names = manifest.kept_columns([ref.summary]).names
        if kept not in names:
            raise CafiError(f"run {ref.run_id} kept no column {kept!r} (kept: {names or 'none'}): give "
                            "--identities IDS.csv or the kept column holding the identity")
    import ray

    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)
    cols = ["uri", "embedding", "scored_at", *([kept] if kept else [])]
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols, partitioning=None)
    ids_ref = ray.put(ids) if ids is not None else None
    ds = ds.map_batches(_select, fn_kwargs={"ids": ids_ref, "kept": kept}, batch_format="pyarrow")
    n_estimate = sum(pq_rows(p, fs) for p in files)
    if ids is not None:
        n_estimate = min(n_estimate, ids.num_rows)
    result = sdd_job.pseudo_labels(ds, n_estimate, seed)
    stats = sdd_job.write_labels(result, join(out, "labels.parquet"), storage)
    if stats["rows"] == 0:
        raise CafiError(f"none of the rows of run {ref.run_id} with an embedding has an identity")
    doc = {"run": redact_uri(ref.uri), "run_id": ref.run_id, "model_version": ref.summary.get("model_version"),
           "identities_file": redact_uri(identities) if identities else None,
           "identity_column": identity_column, "identity_source": "csv" if ids is not None else "kept column",
           "listed": ids.num_rows if ids is not None else None, "embedding_model": recognizer, "seed": seed,
           "definition": {"same_identity_draws": sdd_labels.SAME, "other_identity_draws": sdd_labels.OTHER,
                          "repeats": sdd_labels.REPEATS, "distance": "1-D Wasserstein",
                          "normalisation": "each draw min-max scaled to 0..100 over the set, then averaged",
                          "pool": f"other identities drawn from a random slice of {sdd_labels.SUBPOOL} of a seeded "
                                  f"sample of up to {sdd_job.POOL} rows of the set"},
           "labels": stats, "seconds": round(time.time() - started, 1)}
    write_json(join(out, "labels.json"), doc, storage)
    return doc


def _select(table: pa.Table, ids, kept: str | None) -> pa.Table:
    import ray

    return _with_identity(table, ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids, kept)


def pq_rows(path: str, fs) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def write_json(uri: str, doc: dict, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "w") as fh:
        json.dump(doc, fh, indent=2, default=float)
