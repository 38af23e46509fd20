"""Incremental re-scoring: take unchanged stages' results from the latest committed version.

Each stage has a fingerprint (cafi/version.py). When a new model version changes only some
stages -- new DBCNN weights, a new FIQA scorer, new thresholds -- the rows of the latest committed
version whose other stages had the same fingerprints are copied instead of recomputed. A
threshold-only change reads no image and runs no model.

The earlier results travel as one sorted table of per-URI keys and values, built by a Ray task
straight into the object store (about 70 bytes per row, plus 1 KiB per row when embeddings are
carried over): the driver holds only a reference to it. `attach` looks rows up by key and adds
`prev_*` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import manifest
from cafi.config import JobConfig

# Read failures may be transient: those rows are always tried again. Decode and size errors
# depend only on the bytes and the image limits (part of the fingerprints), so they are reused.
_RETRIED_ERROR = "cannot read object"
_ROW_COLUMNS = ("status", "error", "width", "height")


@dataclass
class ReusePlan:
    source_version: str
    stages: dict[str, bool]  # stage -> results reusable (fingerprint unchanged, and not needed live)
    rows: int
    table_ref: object = field(repr=False)  # ObjectRef of the table (numpy columns sorted by "key")

    @property
    def reused(self) -> list[str]:
        return [s for s, ok in self.stages.items() if ok]

    def describe(self) -> dict:
        return {"source_version": self.source_version, "reused_stages": self.reused, "source_rows": self.rows}


def reusable_stages(cfg: JobConfig, fingerprints: dict[str, str], source: dict[str, str]) -> dict[str, bool]:
    """Per model stage: can its results be taken over? Its fingerprint must be unchanged, and the
    face parsing must run wherever a stage that reads the live face mask runs."""
    from cafi.stages.specs import live_mask_users, specs_for

    names = [s.name for s in specs_for(cfg)]
    same = {s: source.get(s) == fingerprints[s] for s in names}
    if not all(same[u] for u in live_mask_users(cfg)):
        same["parse"] = False
    return same


def value_columns(cfg: JobConfig, stages: dict[str, bool]) -> list[str]:
    """The manifest columns a plan carries: those of the stages it can take over."""
    from cafi.stages.specs import specs_for, stage_columns

    cols: list[str] = []
    for s in specs_for(cfg):
        if stages.get(s.name):
            cols += list(stage_columns(s, cfg))
    return cols


def plan(output: str, version: str, fingerprints: dict[str, str], cfg: JobConfig, storage=None) -> ReusePlan | None:
    """Which stages the latest other committed version can supply, and (in the object store) its results."""
    import ray

    runs = [r for r in manifest.committed_runs(output, storage)
            if r.get("model_version") != version and r.get("stage_fingerprints")]
    if not runs:
        return None
    source = runs[-1]
    stages = reusable_stages(cfg, fingerprints, source["stage_fingerprints"])
    if not any(stages.values()):
        return None
    run_ids = manifest.committed_run_ids(output, source["model_version"], storage)
    build = ray.remote(num_returns=2, num_cpus=cfg.read.num_cpus)(build_table)
    table_ref, rows_ref = build.remote(output, source["model_version"], run_ids, value_columns(cfg, stages), storage)
    rows = ray.get(rows_ref)
    if rows == 0:
        return None
    return ReusePlan(source["model_version"], stages, rows, table_ref)


def _numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A manifest column as numpy: fixed-size lists as 2-D arrays (null rows NaN), floats with NaN."""
    typ = col.type
    if pa.types.is_fixed_size_list(typ):
        width = typ.list_size
        dtype = np.float16 if typ.value_type == pa.float16() else np.float32
        out = np.full((len(col), width), np.nan, dtype=dtype)
        start = 0
        for chunk in col.chunks:
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            values = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)
            out[start:start + len(chunk)][valid] = values  # flatten() holds the valid rows only
            start += len(chunk)
        return out
    if pa.types.is_floating(typ):
        return pc.fill_null(col, float("nan")).to_numpy(zero_copy_only=False).astype(np.float32)
    if pa.types.is_integer(typ):
        return pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
    return np.asarray([v if v is not None else "" for v in col.to_pylist()], dtype=object)


def build_table(output: str, source_version: str, run_ids: list[str], columns: list[str], storage=None):
    """The source version's committed rows (read failures left out) as numpy columns sorted by key,
    one row per URI; and its row count."""
    flt = (pc.field("run_id").isin(run_ids) & (pc.field("model_version") == source_version)
           & (pc.field("error").is_null() | ~pc.starts_with(pc.field("error"), _RETRIED_ERROR)))
    wanted = ["uri", *_ROW_COLUMNS, *columns]
    parts: dict[str, list] = {c: [] for c in ["key", *_ROW_COLUMNS, *columns]}
    for batch in manifest.dataset(output, storage).to_batches(columns=wanted, filter=flt):
        t = pa.Table.from_batches([batch])
        parts["key"].append(manifest.uri_keys(t.column("uri").to_pylist()))
        for c in [*_ROW_COLUMNS, *columns]:
            parts[c].append(_numpy(t.column(c)))
    if not parts["key"]:
        return {}, 0
    table = {k: np.concatenate(v) for k, v in parts.items()}
    _, first = np.unique(table["key"], return_index=True)  # sorted by key, one row per URI
    table = {k: v[first] for k, v in table.items()}
    return table, len(table["key"])


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
    for c, values in table.items():
        if c in ("key", "status", "error"):
            continue
        values = values[idx_c]
        blank = np.zeros_like(values) if values.dtype.kind == "i" else np.full_like(values, np.nan)
        mask = found.reshape(-1, *([1] * (values.ndim - 1)))
        batch[f"prev_{c}"] = np.where(mask, values, blank)
    for s, ok in stages.items():
        batch[f"prev_{s}_reused"] = found & ok
    batch["prev_needs_pixels"] = ~(found & all(stages.values()))
    return batch
