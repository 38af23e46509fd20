"""Wires the stages into one streaming Ray Data pipeline and commits the run.

input URIs -> ReadDecode (tasks) -> Detect -> Mask -> SER-FIQ -> DBCNN (actor pools, or one
fused actor) -> decide (tasks) -> hive-partitioned Parquet -> summary.json -> _SUCCESS.
"""

from __future__ import annotations

import datetime as _dt
import logging
import secrets
import time

import pyarrow as pa

from cafi import manifest, preflight
from cafi.config import JobConfig, to_dict
from cafi.errors import CafiError, StorageError
from cafi.stages import MODEL_STAGES, FusedModels, decide, read_decode
from cafi.storage import list_files
from cafi.version import is_synthetic, model_version, stage_fingerprints

log = logging.getLogger("cafi")


def make_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def input_dataset(cfg: JobConfig):
    """A dataset with one `uri` column in small blocks, and the number of inputs.

    Blocks of `read.batch_size` rows let every stage work on a different block at once
    (streaming); one big block would run the stages one after another.
    """
    import ray.data

    inp, rows_per_block = cfg.input, cfg.read.batch_size
    if inp.manifest:
        fs, path = manifest.arrow_filesystem(inp.manifest, cfg.storage)
        reader = ray.data.read_csv if path.lower().endswith(".csv") else ray.data.read_parquet
        try:
            ds = reader(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - surfaced as one clear line
            raise StorageError(f"input.manifest: cannot read {inp.manifest}: {exc}") from None
        if inp.uri_column not in ds.columns():
            raise StorageError(f"input.uri_column: {inp.uri_column!r} is not a column of {inp.manifest} "
                               f"(columns: {ds.columns()})")
        ds = ds.select_columns([inp.uri_column])
        if inp.uri_column != "uri":
            ds = ds.rename_columns({inp.uri_column: "uri"})
        if inp.limit:
            ds = ds.limit(inp.limit)
        n = ds.count()
        return ds.repartition(target_num_rows_per_block=rows_per_block), n
    uris = list(list_files(inp.uri, inp.extensions, cfg.storage))
    if inp.limit:
        uris = uris[: inp.limit]
    chunks = [pa.table({"uri": pa.array(uris[i:i + rows_per_block], pa.string())})
              for i in range(0, max(len(uris), 1), rows_per_block)]
    return ray.data.from_arrow(chunks), len(uris)


def build(ds, cfg: JobConfig, version: str, run_id: str):
    """The scoring pipeline over a `uri` dataset (lazy; nothing runs until written)."""
    cfg_dict = to_dict(cfg)
    ds = ds.map_batches(read_decode, fn_kwargs={"cfg": cfg_dict}, batch_size=cfg.read.batch_size,
                        num_cpus=cfg.read.num_cpus)
    stages = [FusedModels] if cfg.ray.fuse_models else list(MODEL_STAGES)
    for stage in stages:
        ds = ds.map_batches(stage, fn_constructor_kwargs={"cfg": cfg_dict}, zero_copy_batch=False,
                            **stage.resources(cfg))
    return ds.map_batches(decide, fn_kwargs={"cfg": cfg_dict, "model_version": version, "run_id": run_id},
                          batch_size=256, num_cpus=cfg.read.num_cpus)


def run(cfg: JobConfig) -> dict:
    """Score the input and commit the run; returns the run summary. Raises CafiError on systemic faults."""
    import ray
    from ray.data.datasource import FilenameProvider

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars

    run_id = cfg.run_id or make_run_id()
    version = model_version(cfg)
    preflight.check(cfg, run_id)
    started = time.time()
    ds, n_inputs = input_dataset(cfg)
    log.info("cafi run %s: %d inputs, model version %s", run_id, n_inputs, version)

    scored = build(ds, cfg, version, run_id)
    fs, path = manifest.arrow_filesystem(manifest.manifest_uri(cfg.output.uri), cfg.storage)
    files = FilenameProvider(dataset_uuid=run_id, file_format="parquet")  # every file name starts with the run id
    scored.write_parquet(path, filesystem=fs, partition_cols=list(cfg.output.partition_by),
                         filename_provider=files, schema=manifest.SCHEMA)
    elapsed = time.time() - started

    counts = manifest.run_counts(cfg.output.uri, run_id, cfg.storage)
    if counts["rows"] != n_inputs or counts["distinct_uris"] != n_inputs:
        raise CafiError(f"run {run_id} wrote {counts['rows']} rows for {counts['distinct_uris']} URIs but had "
                        f"{n_inputs} inputs; not committed")
    summary = {
        "run_id": run_id,
        "model_version": version,
        "synthetic_weights": is_synthetic(cfg),
        "stage_fingerprints": stage_fingerprints(cfg),
        "inputs": n_inputs,
        "counts": counts,
        "started_at": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "wall_seconds": round(elapsed, 3),
        "images_per_second": round(n_inputs / elapsed, 3) if elapsed > 0 else None,
        "stages": stage_stats(scored),
        "output": {"manifest": manifest.manifest_uri(cfg.output.uri),
                   "run": manifest.run_uri(cfg.output.uri, run_id)},
        "config": to_dict(cfg),
    }
    manifest.commit(cfg.output.uri, run_id, summary, cfg.storage)
    try:  # the report only views the committed run: its failure must never fail the run
        from cafi import report

        report.write_report(manifest.run_uri(cfg.output.uri, run_id), storage=cfg.storage)
    except Exception as exc:  # noqa: BLE001 - logged, never raised
        log.warning("cafi run %s is committed, but its report was not written: %s", run_id, exc)
    return summary


def stage_stats(ds) -> dict:
    """Per-operator wall time and rows from Ray Data's execution stats."""
    try:
        text = ds.stats()
    except Exception:  # noqa: BLE001 - stats are informative, never fatal
        return {}
    return {"ray_data_stats": text, "operators": parse_operator_stats(text)}


def parse_operator_stats(text: str) -> list[dict]:
    """Pull name, wall time and output rows of each operator out of `ds.stats()` text."""
    import re

    ops: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        head = re.match(r"^Operator \d+ (.+?): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s", line)
        if head:
            current = {"operator": head.group(1), "tasks": int(head.group(2)), "blocks": int(head.group(3)),
                       "wall_seconds": float(head.group(4))}
            ops.append(current)
            continue
        rows = re.match(r"^\* Output num rows per block: .*?(\d+) total", line.strip()) if current else None
        if rows and current is not None:
            current["rows"] = int(rows.group(1))
            if current["wall_seconds"] > 0:
                current["rows_per_second"] = round(current["rows"] / current["wall_seconds"], 3)
    return ops
