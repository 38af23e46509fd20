"""How this job uses Ray: starting or joining it, the Ray Data settings of a run, retries, block sizes,
and running one function in a Ray task."""

from __future__ import annotations

import math
import os

from cafi.config import JobConfig

# Fault tolerance (README, "Reliability"): a task or actor lost with its node is run again, and a
# block lost with a node's object store is rebuilt from its lineage (both need unlimited retries); a
# failing UDF is a bug, never retried and never skipped (no errored block may be dropped: every input
# leaves a row or the run fails). Ray Data gives its map tasks and actors exactly these retries
# (RAY_DATA_RETRIES), and passing them to `map_batches` is deprecated since Ray 2.60 (removed in
# 2.64): they are not passed there. tests/test_config.py checks Ray Data's defaults against them.
# Plain Ray tasks of the job take TASK_RETRIES.
TASK_RETRIES = {"max_retries": -1, "retry_exceptions": False}
RAY_DATA_RETRIES = {"task": {"max_retries": -1}, "actor": {"max_restarts": -1, "max_task_retries": -1}}
ACTOR_INIT_DEATHS = 3  # an actor killed with its node while loading its models is replaced

BIG_BLOCK_ROWS = 50_000


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


def start_ray(cfg: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` RAY_ADDRESS names the cluster; alone, start an embedded Ray
        # ("local") rather than silently joining some cluster this machine happens to run.
        address = cfg.ray.address or (None if os.environ.get("RAY_ADDRESS") else "local")
        ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None, log_to_driver=True)
    configure_data_context(cfg)


def rows_per_block(n_inputs: int, batch_size: int, models_run: bool = True) -> int:
    """Rows per block of the scoring pipeline. With models to feed: at least 64 blocks so every
    stage can work on a different block at once (streaming), at most 512 rows so a block's pixels
    stay small, and never fewer rows than a read batch (a million inputs make ~2,000 blocks, not
    125,000). Without (a threshold-only re-score): blocks of up to 50,000 rows, a few dozen cheap
    tasks per million rows instead of thousands."""
    if not models_run:
        return int(max(batch_size, min(BIG_BLOCK_ROWS, math.ceil(n_inputs / 8))))
    return int(min(512, max(batch_size, math.ceil(n_inputs / 64))))


def in_task(cfg: JobConfig, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a Ray task, its result back: for the whole-output scans (written keys,
    row counts, the report), whose reader buffers and URI strings cost tens of MiB per million rows
    and must not land on the driver, which holds the keys only."""
    import ray

    return ray.get(ray.remote(num_cpus=cfg.read.num_cpus, **TASK_RETRIES)(fn).remote(*args, **kwargs))
