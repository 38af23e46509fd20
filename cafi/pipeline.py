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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cafi import autoscale, manifest, preflight, reuse, telemetry
from cafi.config import JobConfig, to_dict
from cafi.errors import CafiError, StorageError
from cafi.inputs import is_sharded, keep
from cafi.inputs.shards import ShardInputs, input_summary, settle
from cafi.stages import FusedModels, decide, read_objects, take_over_only
from cafi.stages.registry import grouped, stage_classes
from cafi.storage import list_files
from cafi.version import is_synthetic, model_version, stage_fingerprints

log = logging.getLogger("cafi")


# Fault tolerance, set here rather than left to defaults that happen to work (README, "Reliability"):
# a task or actor lost with its node is run again, and a block lost with a node's object store is
# rebuilt from its lineage (both need unlimited retries); a failing UDF is a bug, never retried and
# never skipped (no errored block may be dropped: every input leaves a row or the run fails).
TASK_RETRIES = {"max_retries": -1, "retry_exceptions": False}
ACTOR_RETRIES = {"max_restarts": -1, "max_task_retries": -1}
ACTOR_INIT_DEATHS = 3  # an actor killed with its node while loading its models is replaced


def configure_data_context(cfg: JobConfig):
    """Ray Data settings of this job. The object-store cap bounds what is in flight: without it the
    reads run ahead of the models until Ray Data's share of the store is full, so memory would
    grow with the input."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    cap = math.inf if cfg.ray.object_store_mb is None else cfg.ray.object_store_mb * 2**20  # inf: Ray Data's share
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=cap)
    ctx.max_errored_blocks = 0
    ctx.actor_task_retry_on_errors = False
    ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    # No per-task memory-polling thread: it wakes every task and model call once a second, and on a
    # small machine each wake-up stalls torch's threads (measured: bench/README.md, issue 11).
    ctx.memory_usage_poll_interval_s = None
    return ctx


def make_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def rows_per_block(n_inputs: int, batch_size: int, models_run: bool = True) -> int:
    """Rows per block of the scoring pipeline. With models to feed: at least 64 blocks so every
    stage can work on a different block at once (streaming), at most 512 rows so a block's pixels
    stay small, and never fewer rows than a read batch (a million inputs make ~2,000 blocks, not
    125,000). Without (a threshold-only re-score): blocks of up to 50,000 rows, a few dozen cheap
    tasks per million rows instead of thousands."""
    if not models_run:
        return int(max(batch_size, min(BIG_BLOCK_ROWS, math.ceil(n_inputs / 8))))
    return int(min(512, max(batch_size, math.ceil(n_inputs / 64))))


BIG_BLOCK_ROWS = 50_000


def input_dataset(cfg: JobConfig):
    """The inputs as a dataset with a `uri` column (and the kept columns), in blocks as read."""
    import ray.data

    inp = cfg.input
    if inp.manifest:
        fs, path = manifest.arrow_filesystem(inp.manifest, cfg.storage)
        reader = ray.data.read_csv if path.lower().endswith(".csv") else ray.data.read_parquet
        extra = {}
        if path.lower().endswith(".csv") and inp.keep_columns:  # CSV values are kept as the text they are
            import pyarrow.csv as pacsv

            extra["convert_options"] = pacsv.ConvertOptions(column_types={k: pa.string() for k in inp.keep_columns})
        try:
            ds = reader(path, filesystem=fs, **extra)
        except Exception as exc:  # noqa: BLE001 - surfaced as one clear line
            raise StorageError(f"input.manifest: cannot read {inp.manifest}: {exc}") from None
        if inp.uri_column not in ds.columns():
            raise StorageError(f"input.uri_column: {inp.uri_column!r} is not a column of {inp.manifest} "
                               f"(columns: {ds.columns()})")
        ds = ds.select_columns([inp.uri_column, *inp.keep_columns])
        if inp.uri_column != "uri":
            ds = ds.rename_columns({inp.uri_column: "uri"})
        if inp.keep_columns:  # as text in flight (cafi/inputs/keep.py)
            ds = ds.map_batches(keep.to_wire_batch, fn_kwargs={"names": list(inp.keep_columns)},
                                batch_format="pyarrow", batch_size=None)
        return ds.limit(inp.limit) if inp.limit else ds
    uris = list(list_files(inp.uri, inp.extensions, cfg.storage))
    if inp.limit:
        uris = uris[: inp.limit]
    step = rows_per_block(len(uris), cfg.read.batch_size)
    chunks = [pa.table({"uri": pa.array(uris[i:i + step], pa.string())}) for i in range(0, max(len(uris), 1), step)]
    return ray.data.from_arrow(chunks)


def _pool_class(names: list[str]) -> type:
    """A FusedModels subclass named after its first stage: Ray Data names the operator by it
    (MapBatches(Detect), MapBatches(Mask), ...)."""
    return type(names[0], (FusedModels,), {"__module__": FusedModels.__module__})


def build(ds, cfg: JobConfig, version: str, run_id: str, plan: reuse.ReusePlan | None = None,
          omit: tuple[str, ...] = (), read=read_objects, kept: pa.Schema | None = None):
    """The scoring pipeline over a `uri` dataset (lazy; nothing runs until written).

    With a reuse plan, earlier results are attached first; stages named in `omit` (every row
    reuses them) load no model: their results are copied over.
    """

    cfg_dict = to_dict(cfg)
    classes = stage_classes(cfg)
    names = [c.__name__ for c in classes]
    running = [n for n in names if n not in omit]
    # Without a model to feed, the CPU steps take whole blocks: a threshold-only re-score of a
    # million rows is then a few thousand cheap calls, not a hundred thousand.
    small = {"batch_size": cfg.read.batch_size if running else None, "num_cpus": cfg.read.num_cpus, **TASK_RETRIES}
    if plan is not None:
        ds = ds.map_batches(reuse.attach, fn_kwargs={"table_ref": [plan.table_ref], "stages": plan.stages},
                            **small)
    ds = ds.map_batches(read, fn_kwargs={"cfg": cfg_dict, "run_id": run_id}, **small)
    if not running:  # a threshold-only re-score: no image was read, no model runs
        ds = ds.map_batches(take_over_only, fn_kwargs={"cfg": cfg_dict, "stages": names}, **small)
    elif cfg.ray.fuse_models:
        ds = ds.map_batches(FusedModels, fn_constructor_kwargs={"cfg": cfg_dict, "stages": running,
                                                                "take_over": list(omit), "run_id": run_id},
                            **FusedModels.resources(cfg, classes), **ACTOR_RETRIES)
    else:
        groups = grouped(cfg, names)
        run_groups = [g for g in groups if g[0] not in omit]
        for group in groups:
            by_name = [c for c in classes if c.__name__ in group]
            if group[0] in omit:
                ds = ds.map_batches(take_over_only, fn_kwargs={"cfg": cfg_dict, "stages": group}, **small)
                continue
            kwargs = {"cfg": cfg_dict, "stages": [n for n in group if n not in omit],
                      "take_over": [n for n in group if n in omit], "decode": group is run_groups[0],
                      "last": group is run_groups[-1], "run_id": run_id}
            ds = ds.map_batches(_pool_class(group), fn_constructor_kwargs=kwargs,
                                **FusedModels.resources(cfg, by_name), **ACTOR_RETRIES)
    # One block at a time (batch_size=None): rows reach storage as their block finishes, so a
    # crash loses only what was in flight.
    return ds.map_batches(decide, fn_kwargs={"cfg": cfg_dict, "model_version": version, "run_id": run_id,
                                             "kept": kept},
                          batch_size=None, num_cpus=cfg.read.num_cpus, **TASK_RETRIES)


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which `keys` are in `sorted_keys` (sorted, unique): a binary search each, O(n log m)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _keys_column(batch: pa.Table) -> pa.Table:
    """The 16-byte key of each URI, computed where the rows are (the driver only receives keys)."""
    keys = manifest.uri_keys(batch.column("uri").to_pylist())
    return pa.table({"key": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys),
                                                                  [None, pa.py_buffer(keys.tobytes())])})


def _as_keys(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_binary(16) column as a numpy S16 array (one copy, no Python objects)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype="S16", count=len(c), offset=c.offset * 16) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.array([], dtype="S16")


@dataclass
class InputKeys:
    keys: np.ndarray        # sorted unique 16-byte keys of every input URI
    duplicated: np.ndarray  # the keys listed more than once
    listed: int             # inputs as listed, duplicates included


def input_keys(ds) -> InputKeys:
    """Hash the input URIs in Ray tasks and stream only the keys to the driver: 16 bytes per input,
    sorted in place (the peak is about twice that, not the several copies np.unique makes)."""
    parts = [_as_keys(b.column("key")) for b in ds.map_batches(_keys_column, batch_format="pyarrow", batch_size=None)
             .iter_batches(batch_size=None, batch_format="pyarrow")]
    listed = np.concatenate(parts) if parts else np.array([], dtype="S16")
    del parts
    listed.sort()
    first = np.ones(len(listed), dtype=bool)
    np.not_equal(listed[1:], listed[:-1], out=first[1:])
    again = np.unique(listed[~first])  # keys listed more than once (few)
    return InputKeys(listed[first], again, len(listed))


def not_done(keys: np.ndarray, done: np.ndarray) -> np.ndarray:
    """`keys` without those in `done` (both sorted, unique); `keys` itself when nothing is done."""
    return keys if len(done) == 0 else keys[~contains(done, keys)]


def _keep_todo(batch: dict, todo: list, drop: list) -> dict:
    """Keep the rows still to score (resume), without the duplicated inputs: those join once each,
    from `duplicate_rows`."""
    import ray

    keys = manifest.uri_keys([str(u) for u in batch["uri"]])
    keep = contains(ray.get(todo[0]), keys) & ~contains(ray.get(drop[0]), keys)
    return {k: v[keep] for k, v in batch.items()}


def duplicate_rows(ds, duplicated: np.ndarray):
    """One row per input listed more than once (their URIs, few, gathered on the driver)."""
    import ray.data

    def pick(batch: dict) -> dict:
        keys = manifest.uri_keys([str(u) for u in batch["uri"]])
        chosen = contains(duplicated, keys)
        return {k: v[chosen] for k, v in batch.items()}

    rows: dict[str, dict] = {}  # the first row of each URI (its kept columns, if any)
    for b in ds.map_batches(pick, batch_size=None).iter_batches(batch_format="numpy"):
        for i, u in enumerate(b["uri"]):
            rows.setdefault(str(u), {k: v[i] for k, v in b.items()})
    uris = sorted(rows)
    columns = list(next(iter(rows.values()))) if rows else ["uri"]
    return ray.data.from_arrow(pa.table({c: pa.array([str(rows[u][c]) for u in uris], pa.string())
                                         for c in columns}))


def _covers(table: dict, todo: np.ndarray) -> bool:
    return len(table) > 0 and bool(np.isin(todo, table["key"]).all())


def omitted_stages(cfg: JobConfig, plan: reuse.ReusePlan | None, todo_ref, n_todo: int) -> tuple[str, ...]:
    """Model stages no row needs: every row to score has earlier results they can take over."""
    import ray

    if plan is None or n_todo == 0 or not ray.get(ray.remote(num_cpus=0)(_covers).remote(plan.table_ref, todo_ref)):
        return ()
    return tuple(cls.__name__ for cls in stage_classes(cfg) if plan.stages.get(cls.name))


def _start_ray(cfg: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS names the cluster; alone, start an embedded Ray
        # ("local") rather than silently joining some cluster this machine happens to run.
        address = cfg.ray.address or (None if os.environ.get("RAY_ADDRESS") else "local")
        ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None, log_to_driver=True)
    configure_data_context(cfg)


@dataclass
class Todo:
    """What a run has to score: the inputs' keys, those not written yet, and how to read them."""
    keys: np.ndarray                   # every input (sorted unique keys)
    todo: np.ndarray                   # the inputs without a row of this version yet
    listed: int                        # inputs as listed, duplicates included
    ds: object = None                  # URI inputs: the input dataset
    duplicated: np.ndarray | None = None
    shards: ShardInputs | None = None  # shard inputs
    kept: pa.Schema | None = None      # the kept input columns and their types

    @property
    def unread(self) -> int:  # shards whose samples are known only once read
        return self.shards.unknown if self.shards is not None else 0


def plan_inputs(cfg: JobConfig, run_id: str, done: np.ndarray) -> Todo:
    if is_sharded(cfg):  # keys known before reading (earlier shard indexes); the rest come with this run's indexes
        shards = ShardInputs(cfg, run_id)
        keys, todo = shards.plan(done)
        return Todo(keys, todo, len(keys), shards=shards, kept=shards.kept)
    ds = input_dataset(cfg)
    found = input_keys(ds)
    return Todo(found.keys, not_done(found.keys, done), found.listed, ds=ds,
                duplicated=found.duplicated, kept=keep.manifest_schema(cfg) if cfg.input.keep_columns else None)


def todo_dataset(cfg: JobConfig, plan: Todo, done: np.ndarray, todo_ref, models_run: bool):
    """The rows to score: inputs without a row yet, each once, in blocks sized for what runs."""
    import ray

    if plan.shards is not None:
        return plan.shards.dataset(ray.put(done), **TASK_RETRIES)
    rows = rows_per_block(len(plan.todo), cfg.read.batch_size, models_run)
    ds = plan.ds.map_batches(_keep_todo, fn_kwargs={"todo": [todo_ref], "drop": [ray.put(plan.duplicated)]},
                             batch_size=None, num_cpus=cfg.read.num_cpus, **TASK_RETRIES)
    if len(plan.duplicated):
        once = duplicate_rows(plan.ds, plan.duplicated).map_batches(_keep_todo, fn_kwargs={
            "todo": [todo_ref], "drop": [ray.put(np.array([], dtype="S16"))]}, batch_size=None)
        ds = ds.union(once)
    return ds.repartition(target_num_rows_per_block=rows)


def score(cfg: JobConfig, todo_ds, plan: Todo, version: str, run_id: str, reuse_plan, omit) -> dict:
    """Run the pipeline into the manifest (files written as blocks finish); its operator stats."""
    from ray.data.datasource import FilenameProvider

    sized = autoscale.sized(cfg, rows=None if plan.unread else len(plan.todo))
    scored = build(todo_ds, sized, version, run_id, reuse_plan, omit,
                   read=settle if plan.shards is not None else read_objects, kept=plan.kept)
    fs, path = manifest.arrow_filesystem(manifest.manifest_uri(cfg.output.uri), cfg.storage, run_id)
    files = FilenameProvider(dataset_uuid=run_id, file_format="parquet")  # every file name starts with the run id
    scored.write_parquet(path, filesystem=fs, partition_cols=list(cfg.output.partition_by),
                         filename_provider=files, schema=manifest.with_kept(plan.kept),
                         min_rows_per_file=cfg.output.min_rows_per_file)
    return stage_stats(scored)


def run(cfg: JobConfig) -> dict:
    """Score the input and commit the run; returns the run summary. Raises CafiError on systemic faults.

    Resumes: URIs already written for this model version (by a committed run or a crashed
    attempt) are not scored again; the committed result takes the attempt's rows over.
    """
    import ray

    _start_ray(cfg)
    out, storage = cfg.output.uri, cfg.storage
    run_id = cfg.run_id or make_run_id()
    version, fingerprints = model_version(cfg), stage_fingerprints(cfg)
    preflight.check(cfg, run_id)
    started = time.time()
    phases = Phases()
    done, prior_runs = scan_written(cfg, version)
    plan = plan_inputs(cfg, run_id, done)
    phases.mark("plan")
    committed = manifest.committed_run_ids(out, version, storage)
    if len(plan.todo) == 0 and not plan.unread and committed and set(prior_runs) <= set(committed):
        latest = [r for r in manifest.committed_runs(out, storage) if r["model_version"] == version][-1]
        log.info("nothing to do: all %d inputs are committed for model version %s (run %s)",
                 len(plan.keys), version, latest["run_id"])
        manifest.abandon(out, run_id, storage)
        return {**latest, "noop": True}
    log.info("cafi run %s: %d inputs (%d already written), model version %s", run_id, len(plan.keys),
             len(plan.keys) - len(plan.todo), version)

    work = len(plan.todo) or plan.unread
    reuse_plan = reuse.plan(out, version, fingerprints, cfg, storage) if cfg.incremental and work else None
    todo_ref = ray.put(plan.todo)
    omit = omitted_stages(cfg, reuse_plan, todo_ref, len(plan.todo)) if not plan.unread else ()
    models_run = any(c.__name__ not in omit for c in stage_classes(cfg))
    phases.mark("reuse_plan")
    stats: dict = {}
    collector = telemetry.start(run_id)
    if work:
        todo_ds = todo_dataset(cfg, plan, done, todo_ref, models_run)
        del done
        stats = score(cfg, todo_ds, plan, version, run_id, reuse_plan, omit)
    # else: a crashed attempt wrote every row but did not commit; this run commits its rows.
    phases.mark("score_and_write")
    elapsed = time.time() - started
    observed = telemetry.collect(collector)
    ray.kill(collector)

    if plan.shards is not None:  # every sample key, from the shard indexes of this run and earlier ones
        plan.keys = plan.shards.input_keys()
        plan.listed = len(plan.keys)
    scored_now = plan.shards.stats["to_score"] if plan.shards is not None else len(plan.todo)
    includes = [r for r in prior_runs if r != run_id]
    counts = count_rows(cfg, [run_id, *includes], version, plan.keys)
    missing = len(plan.keys) - counts["distinct_uris"]
    if missing:
        raise CafiError(f"run {run_id}: {missing} of {len(plan.keys)} inputs have no row; not committed")
    phases.mark("count")
    summary = {
        "run_id": run_id,
        "model_version": version,
        "synthetic_weights": is_synthetic(cfg),
        "stage_fingerprints": fingerprints,
        "inputs": len(plan.keys),
        "duplicate_inputs": plan.listed - len(plan.keys),
        "scored_now": int(scored_now),
        "includes_runs": includes,
        "reuse": reuse_plan.describe() if reuse_plan else None,
        "stages_run": [c.__name__ for c in stage_classes(cfg) if c.__name__ not in omit] if scored_now else [],
        "retries": {k: observed.get("counts", {}).get(k, 0) for k in ("read_retries", "write_retries")},
        "model_actors": telemetry.busy_summary(observed.get("busy", {})),
        "counts": counts,
        "started_at": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "wall_seconds": round(elapsed, 3),
        "phase_seconds": phases.seconds,
        "images_per_second": round(scored_now / elapsed, 3) if elapsed > 0 else None,
        "input": input_summary(cfg, plan.kept if plan.kept is not None else keep.string_schema([]), plan.shards),
        "stages": stats,
        "output": {"manifest": manifest.manifest_uri(out), "run": manifest.run_uri(out, run_id)},
        "config": to_dict(cfg),
    }
    manifest.commit(out, run_id, summary, storage)
    try:  # the report only views the committed run: its failure must never fail the run
        write_report(cfg, manifest.run_uri(out, run_id))
    except Exception as exc:  # noqa: BLE001 - logged, never raised
        log.warning("cafi run %s is committed, but its report was not written: %s", run_id, exc)
    phases.mark("report")
    return summary


def write_report(cfg: JobConfig, run: str) -> None:
    """The run's report (cafi/report.py), written in a Ray task: it streams every row of the run."""
    from cafi import report

    in_task(cfg, report.write_report, run, storage=cfg.storage)


def in_task(cfg: JobConfig, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a Ray task, its result back: for the whole-output scans (written keys,
    row counts, the report), whose reader buffers and URI strings cost tens of MiB per million rows
    and must not land on the driver, which holds the keys only."""
    import ray

    return ray.get(ray.remote(num_cpus=cfg.read.num_cpus, **TASK_RETRIES)(fn).remote(*args, **kwargs))


def scan_written(cfg: JobConfig, version: str) -> tuple[np.ndarray, list[str]]:
    """The keys already written for this version and the runs that wrote them (manifest.scan_version)."""
    return in_task(cfg, manifest.scan_version, cfg.output.uri, version, cfg.storage)


def count_rows(cfg: JobConfig, run_ids: list[str], version: str, keys: np.ndarray) -> dict:
    """The written rows' counts per status and reason (manifest.run_counts), each input once."""
    return in_task(cfg, manifest.run_counts, cfg.output.uri, run_ids, version, cfg.storage, only=keys)


class Phases:
    """Wall seconds of each phase of a run (planning, scoring, counting), for the summary and the log."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
        log.info("phase %s: %.1f s", name, self.seconds[name])


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
