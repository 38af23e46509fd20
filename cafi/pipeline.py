"""Wires the stages into one streaming Ray Data pipeline and commits the run.

input URIs -> ReadDecode (tasks) -> Detect -> Mask -> SER-FIQ -> DBCNN (actor pools, or one
fused actor) -> decide (tasks) -> hive-partitioned Parquet -> summary.json -> _SUCCESS.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import secrets
import time

import numpy as np
import pyarrow as pa

from cafi import autoscale, manifest, preflight, reuse
from cafi.config import JobConfig, to_dict
from cafi.errors import CafiError, StorageError
from cafi.stages import MODEL_STAGES, FusedModels, decide, read_decode, take_over_only
from cafi.storage import list_files
from cafi.version import is_synthetic, model_version, stage_fingerprints

log = logging.getLogger("cafi")


def configure_data_context(cfg: JobConfig):
    """Ray Data settings of this job. The object-store cap bounds the decoded pixels in flight:
    without it the reads run ahead of the models until Ray Data's share of the store is full
    (every input's pixels, on a 10,000-crop run), so memory would grow with the input."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    cap = math.inf if cfg.ray.object_store_mb is None else cfg.ray.object_store_mb * 2**20  # inf: Ray Data's share
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=cap)
    return ctx


def make_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def rows_per_block(n_inputs: int, batch_size: int) -> int:
    """Rows per input block: at least 64 blocks so every stage can work on a different block at
    once (streaming), at most 512 rows so a block's pixels stay small, and never fewer rows than
    a read batch: a million inputs make ~2,000 blocks, not 125,000."""
    return int(min(512, max(batch_size, math.ceil(n_inputs / 64))))


def input_dataset(cfg: JobConfig):
    """A dataset with one `uri` column in small blocks, and the number of inputs."""
    import ray.data

    inp = cfg.input
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
        return ds.repartition(target_num_rows_per_block=rows_per_block(n, cfg.read.batch_size)), n
    uris = list(list_files(inp.uri, inp.extensions, cfg.storage))
    if inp.limit:
        uris = uris[: inp.limit]
    step = rows_per_block(len(uris), cfg.read.batch_size)
    chunks = [pa.table({"uri": pa.array(uris[i:i + step], pa.string())}) for i in range(0, max(len(uris), 1), step)]
    return ray.data.from_arrow(chunks), len(uris)


def build(ds, cfg: JobConfig, version: str, run_id: str, plan: reuse.ReusePlan | None = None,
          omit: tuple[str, ...] = ()):
    """The scoring pipeline over a `uri` dataset (lazy; nothing runs until written).

    With a reuse plan, earlier results are attached first; stages named in `omit` (every row
    reuses them) are replaced by a CPU task that copies the results over.
    """
    import ray

    cfg_dict = to_dict(cfg)
    small = {"batch_size": cfg.read.batch_size, "num_cpus": cfg.read.num_cpus}
    if plan is not None:
        ds = ds.map_batches(reuse.attach, fn_kwargs={"table_ref": [ray.put(plan.table)], "stages": plan.stages},
                            **small)
    ds = ds.map_batches(read_decode, fn_kwargs={"cfg": cfg_dict}, **small)
    groups: list[tuple[str, list]] = []  # consecutive stages: ("run" | "take_over", classes)
    for cls in MODEL_STAGES:
        kind = "take_over" if cls.__name__ in omit else "run"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(cls)
        else:
            groups.append((kind, [cls]))
    for kind, classes in groups:
        names = [c.__name__ for c in classes]
        if kind == "take_over":
            ds = ds.map_batches(take_over_only, fn_kwargs={"stages": names}, **small)
        elif cfg.ray.fuse_models:
            ds = ds.map_batches(FusedModels, fn_constructor_kwargs={"cfg": cfg_dict, "stages": names},
                                zero_copy_batch=False, **FusedModels.resources(cfg, classes))
        else:
            for cls in classes:
                ds = ds.map_batches(cls, fn_constructor_kwargs={"cfg": cfg_dict}, zero_copy_batch=False,
                                    **cls.resources(cfg))
    # One block at a time (batch_size=None): rows reach storage as their block finishes, so a
    # crash loses only what was in flight.
    return ds.map_batches(decide, fn_kwargs={"cfg": cfg_dict, "model_version": version, "run_id": run_id},
                          batch_size=None, num_cpus=cfg.read.num_cpus)


def _keep_todo(batch: dict, todo: list) -> dict:
    """Drop rows already written for this version (resume)."""
    import ray

    keys = manifest.uri_keys([str(u) for u in batch["uri"]])
    keep = np.isin(keys, ray.get(todo[0]))
    return {k: v[keep] for k, v in batch.items()}


def _input_keys(ds) -> np.ndarray:
    """Sorted unique 16-byte keys of all input URIs, streamed to the driver (16 bytes per input)."""
    parts = [manifest.uri_keys([str(u) for u in b["uri"]])
             for b in ds.iter_batches(batch_size=65536, batch_format="numpy")]
    return np.unique(np.concatenate(parts)) if parts else np.array([], dtype="S16")


def omitted_stages(plan: reuse.ReusePlan | None, todo: np.ndarray) -> tuple[str, ...]:
    """Model stages no row needs: every row to score has earlier results they can take over."""
    if plan is None or len(todo) == 0 or not np.isin(todo, plan.table["key"]).all():
        return ()
    full = dict(plan.stages)
    full["parse"] = full["parse"] and full["dbcnn"]  # DBCNN needs the masked pixels
    return tuple(cls.__name__ for cls in MODEL_STAGES if full[cls.reuse_stage])


def run(cfg: JobConfig) -> dict:
    """Score the input and commit the run; returns the run summary. Raises CafiError on systemic faults.

    Resumes: URIs already written for this model version (by a committed run or a crashed
    attempt) are not scored again; the committed result takes the attempt's rows over.
    """
    import ray
    from ray.data.datasource import FilenameProvider

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS names the cluster; alone, start an embedded Ray
        # ("local") rather than silently joining some cluster this machine happens to run.
        address = cfg.ray.address or (None if os.environ.get("RAY_ADDRESS") else "local")
        ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None, log_to_driver=True)
    configure_data_context(cfg)

    out, storage = cfg.output.uri, cfg.storage
    run_id = cfg.run_id or make_run_id()
    version, fingerprints = model_version(cfg), stage_fingerprints(cfg)
    preflight.check(cfg, run_id)
    started = time.time()
    ds, n_listed = input_dataset(cfg)
    input_keys = _input_keys(ds)
    done, prior_runs = manifest.scan_version(out, version, storage)
    todo = np.setdiff1d(input_keys, done, assume_unique=True)
    committed = manifest.committed_run_ids(out, version, storage)
    if len(todo) == 0 and committed and set(prior_runs) <= set(committed):
        latest = [r for r in manifest.committed_runs(out, storage) if r["model_version"] == version][-1]
        log.info("nothing to do: all %d inputs are committed for model version %s (run %s)",
                 len(input_keys), version, latest["run_id"])
        manifest.abandon(out, run_id, storage)
        return {**latest, "noop": True}
    log.info("cafi run %s: %d inputs (%d already written), model version %s", run_id, len(input_keys),
             len(input_keys) - len(todo), version)

    plan = reuse.plan(out, version, fingerprints, storage) if cfg.incremental and len(todo) else None
    omit = omitted_stages(plan, todo)
    stats: dict = {}
    if len(todo):
        todo_ds = ds.map_batches(_keep_todo, fn_kwargs={"todo": [ray.put(todo)]}, batch_size=cfg.read.batch_size,
                                 num_cpus=cfg.read.num_cpus)
        scored = build(todo_ds, autoscale.sized(cfg, rows=len(todo)), version, run_id, plan, omit)
        fs, path = manifest.arrow_filesystem(manifest.manifest_uri(out), storage)
        files = FilenameProvider(dataset_uuid=run_id, file_format="parquet")  # every file name starts with the run id
        scored.write_parquet(path, filesystem=fs, partition_cols=list(cfg.output.partition_by),
                             filename_provider=files, schema=manifest.SCHEMA,
                             min_rows_per_file=cfg.output.min_rows_per_file)
        stats = stage_stats(scored)
    # else: a crashed attempt wrote every row but did not commit; this run commits its rows.
    elapsed = time.time() - started

    includes = [r for r in prior_runs if r != run_id]
    counts = manifest.run_counts(out, [run_id, *includes], version, storage, only=input_keys)
    missing = len(input_keys) - counts["distinct_uris"]
    if missing:
        raise CafiError(f"run {run_id}: {missing} of {len(input_keys)} inputs have no row; not committed")
    summary = {
        "run_id": run_id,
        "model_version": version,
        "synthetic_weights": is_synthetic(cfg),
        "stage_fingerprints": fingerprints,
        "inputs": len(input_keys),
        "duplicate_inputs": n_listed - len(input_keys),
        "scored_now": int(len(todo)),
        "includes_runs": includes,
        "reuse": plan.describe() if plan else None,
        "stages_run": [c.__name__ for c in MODEL_STAGES if c.__name__ not in omit] if len(todo) else [],
        "counts": counts,
        "started_at": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "wall_seconds": round(elapsed, 3),
        "images_per_second": round(len(todo) / elapsed, 3) if elapsed > 0 else None,
        "stages": stats,
        "output": {"manifest": manifest.manifest_uri(out), "run": manifest.run_uri(out, run_id)},
        "config": to_dict(cfg),
    }
    manifest.commit(out, run_id, summary, storage)
    try:  # the report only views the committed run: its failure must never fail the run
        from cafi import report

        report.write_report(manifest.run_uri(out, run_id), storage=storage)
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
