"""Incremental re-scoring: take unchanged stages' results from the latest committed version.

Each stage has a fingerprint (cafi/version.py). When a new model version changes only later
stages -- new DBCNN weights, new thresholds -- the rows of the latest committed version whose
earlier stages had the same fingerprints are copied instead of recomputed. A threshold-only
change reads no image and runs no model.

The earlier results travel as one sorted table of per-URI keys and values in the object store
(about 70 bytes per row); `attach` looks rows up by key and adds `prev_*` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from cafi import manifest

REUSABLE = ("detect", "parse", "serfiq", "dbcnn")
_VALUE_COLUMNS = ("width", "height", "det_score", "landmarks", "mask_fraction", "serfiq_raw", "dbcnn")
# Read failures may be transient: those rows are always tried again. Decode and size errors
# depend only on the bytes and the image limits (part of the fingerprints), so they are reused.
_RETRIED_ERROR = "cannot read object"


@dataclass
class ReusePlan:
    source_version: str
    stages: dict[str, bool]
    rows: int
    table: dict = field(repr=False)  # numpy columns sorted by "key"

    @property
    def reused(self) -> list[str]:
        return [s for s, ok in self.stages.items() if ok]

    def describe(self) -> dict:
        return {"source_version": self.source_version, "reused_stages": self.reused, "source_rows": self.rows}


def plan(output: str, version: str, fingerprints: dict[str, str], storage=None) -> ReusePlan | None:
    """Which stages the latest other committed version can supply, and its results."""
    runs = [r for r in manifest.committed_runs(output, storage)
            if r.get("model_version") != version and r.get("stage_fingerprints")]
    if not runs:
        return None
    source = runs[-1]
    stages = {s: source["stage_fingerprints"].get(s) == fingerprints[s] for s in REUSABLE}
    if not any(stages.values()):
        return None
    run_ids = manifest.committed_run_ids(output, source["model_version"], storage)
    parts: dict[str, list] = {"key": [], "status": [], "error": [], **{c: [] for c in _VALUE_COLUMNS}}
    flt = (pc.field("run_id").isin(run_ids) & (pc.field("model_version") == source["model_version"])
           & (pc.field("error").is_null() | ~pc.starts_with(pc.field("error"), _RETRIED_ERROR)))
    for batch in manifest.dataset(output, storage).to_batches(columns=["uri", "status", "error", *_VALUE_COLUMNS],
                                                              filter=flt):
        parts["key"].append(manifest.uri_keys(batch.column("uri").to_pylist()))
        parts["status"].append(np.asarray(batch.column("status").to_pylist(), dtype=object))
        parts["error"].append(np.asarray([e or "" for e in batch.column("error").to_pylist()], dtype=object))
        for c in _VALUE_COLUMNS:
            col = batch.column(c)
            if c == "landmarks":
                parts[c].append(np.asarray(col.flatten().to_numpy(zero_copy_only=False),
                                           dtype=np.float32).reshape(-1, 10))
            else:
                parts[c].append(col.to_numpy(zero_copy_only=False))
    if not parts["key"]:
        return None
    table = {k: np.concatenate(v) for k, v in parts.items()}
    _, first = np.unique(table["key"], return_index=True)  # sorted by key, one row per URI
    table = {k: v[first] for k, v in table.items()}
    return ReusePlan(source["model_version"], stages, len(table["key"]), table)


_TABLES: dict = {}


def _table(ref) -> dict:
    """The reuse table of this plan, fetched once per worker process (zero-copy numpy)."""
    import ray

    key = ref.hex()
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = ray.get(ref)
    return _TABLES[key]


def attach(batch: dict, table_ref: list, stages: dict[str, bool]) -> dict:
    """Add prev_* columns and per-stage `prev_<stage>_reused` flags to a batch of URIs."""
    table = _table(table_ref[0])
    keys = manifest.uri_keys([str(u) for u in batch["uri"]])
    idx = np.searchsorted(table["key"], keys)
    idx_c = np.minimum(idx, len(table["key"]) - 1)
    found = (idx < len(table["key"])) & (table["key"][idx_c] == keys)
    # "" rather than None: a column of only nulls would lose its string type between stages
    batch["prev_status"] = np.where(found, table["status"][idx_c], "").astype(object)
    batch["prev_error"] = np.where(found, table["error"][idx_c], "").astype(object)
    for c in _VALUE_COLUMNS:
        values = table[c][idx_c]
        blank = np.zeros_like(values) if values.dtype.kind == "i" else np.full_like(values, np.nan)
        mask = found.reshape(-1, *([1] * (values.ndim - 1)))
        batch[f"prev_{c}"] = np.where(mask, values, blank)
    for s in REUSABLE:
        batch[f"prev_{s}_reused"] = found & stages[s]
    batch["prev_needs_pixels"] = ~(found & all(stages[s] for s in REUSABLE))
    return batch


def reused(batch: dict, stage: str) -> np.ndarray:
    """Rows where `stage` can take its results over instead of running its model."""
    flag = batch.get(f"prev_{stage}_reused")
    if flag is None:
        return np.zeros(len(batch["uri"]), dtype=bool)
    flag = flag.astype(bool)
    if stage == "parse":  # DBCNN needs the masked pixels whenever it runs
        flag = flag & batch["prev_dbcnn_reused"].astype(bool)
    return flag
