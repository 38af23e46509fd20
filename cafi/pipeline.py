"""Wires a run: plan against what is written, build one streaming Ray Data pipeline, write, commit.

  input source (cafi/inputs/source.py) -> [reuse.attach] -> read step (tasks) -> model actor(s):
  decode, detect, FIQA scorers, parse, components, IQA scorers (cafi/stages/, in spec order) ->
  decide (tasks) -> hive-partitioned Parquet -> summary.json -> _SUCCESS -> report.html
"""

from __future__ import annotations

import datetime as _dt
import logging
import secrets

import numpy as np
import pyarrow as pa

from cafi import autoscale, manifest, preflight, reuse, telemetry
from cafi.config import JobConfig
from cafi.errors import CafiError
from cafi.inputs.source import InputSource
from cafi.inputs.sources import open_source
from cafi.operator_stats import stage_stats
from cafi.ray_setup import in_task, start_ray
from cafi.redact import redact_text
from cafi.stages import specs
from cafi.stages.actor import FusedModels, take_over_only
from cafi.stages.decide import decide
from cafi.stages.read import read_objects
from cafi.summary import Phases, run_summary
from cafi.version import is_synthetic, model_version, stage_fingerprints

log = logging.getLogger("cafi")


def make_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _pool_class(name: str) -> type:
    """A FusedModels subclass named after its first stage: Ray Data names the operator by it
    (MapBatches(detect), MapBatches(parse), ...)."""
    return type(name, (FusedModels,), {"__module__": FusedModels.__module__})


def build(ds, cfg: JobConfig, version: str, run_id: str, plan: reuse.ReusePlan | None = None,
          omit: tuple[str, ...] = (), read=read_objects, kept: pa.Schema | None = None):
    """The scoring pipeline over a dataset of items to read (lazy; nothing runs until written).

    `read` is the input source's read step. With a reuse plan, earlier results are attached first;
    stages named in `omit` (every row reuses them) load no model: their results are copied over.
    """
    groups = specs.actor_groups(cfg)
    running = [s.name for g in groups for s in g if s.name not in omit]
    # Without a model to feed, the CPU steps take whole blocks: a threshold-only re-score of a
    # million rows is then a few thousand cheap calls, not a hundred thousand.
    small = {"batch_size": cfg.read.batch_size if running else None, "num_cpus": cfg.read.num_cpus}
    if plan is not None:
        ds = ds.map_batches(reuse.attach, fn_kwargs={"table_ref": [plan.table_ref], "stages": plan.stages},
                            **small)
    ds = ds.map_batches(read, fn_kwargs={"cfg": cfg, "run_id": run_id}, **small)
    live = [g for g in groups if any(s.name not in omit for s in g)]
    if not live:  # a threshold-only re-score: no image was read, no model runs
        groups = [[s for g in groups for s in g]]
    for group in groups:
        names = [s.name for s in group]
        if group not in live:  # every row reuses these stages' results: copied over in a CPU task
            ds = ds.map_batches(take_over_only, fn_kwargs={"cfg": cfg, "stages": names}, **small)
            continue
        kwargs = {"cfg": cfg, "stages": [n for n in names if n not in omit],
                  "take_over": [n for n in names if n in omit], "decode": group is live[0],
                  "last": group is live[-1], "run_id": run_id}
        cls = FusedModels if cfg.ray.fuse_models else _pool_class(names[0])
        ds = ds.map_batches(cls, fn_constructor_kwargs=kwargs, **FusedModels.resources(cfg, group))
    # One block at a time (batch_size=None): rows reach storage as their block finishes, so a
    # crash loses only what was in flight.
    return ds.map_batches(decide, fn_kwargs={"cfg": cfg, "model_version": version, "run_id": run_id, "kept": kept},
                          batch_size=None, num_cpus=cfg.read.num_cpus)


def _covers(table: dict, todo: np.ndarray) -> bool:
    return len(table) > 0 and bool(np.isin(todo, table["key"]).all())


def omitted_stages(cfg: JobConfig, plan: reuse.ReusePlan | None, todo_ref, n_todo: int) -> tuple[str, ...]:
    """Model stages no row needs: every row to score has earlier results they can take over."""
    import ray

    if plan is None or n_todo == 0 or not ray.get(ray.remote(num_cpus=0)(_covers).remote(plan.table_ref, todo_ref)):
        return ()
    return tuple(s.name for s in specs.specs_for(cfg) if plan.stages.get(s.name))


def score(cfg: JobConfig, source: InputSource, done: np.ndarray, todo_ref, version: str, run_id: str, reuse_plan,
          omit: tuple[str, ...]) -> dict:
    """Run the pipeline into the manifest (files written as blocks finish); its operator stats."""
    from ray.data.datasource import FilenameProvider

    models_run = any(s.name not in omit for s in specs.specs_for(cfg))
    todo_ds = source.dataset(done, todo_ref, models_run)
    sized = autoscale.sized(cfg, rows=None if source.unread else len(source.todo))
    scored = build(todo_ds, sized, version, run_id, reuse_plan, omit, read=source.read_step, kept=source.kept)
    fs, path = manifest.arrow_filesystem(manifest.manifest_uri(cfg.output.uri), cfg.storage, run_id)
    files = FilenameProvider(dataset_uuid=run_id, file_format="parquet")  # every file name starts with the run id
    scored.write_parquet(path, filesystem=fs, partition_cols=list(cfg.output.partition_by),
                         filename_provider=files,
                         schema=manifest.with_embedding_model(manifest.with_kept(source.kept),
                                                              specs.embedding_model(cfg)),
                         min_rows_per_file=cfg.output.min_rows_per_file)
    return stage_stats(scored)


def run(cfg: JobConfig) -> dict:
    """Score the input and commit the run; returns the run summary. Raises CafiError on systemic faults.

    Resumes: URIs already written for this model version (by a committed run or a crashed
    attempt) are not scored again; the committed result takes the attempt's rows over.
    """
    import ray

    specs.validate(cfg)
    start_ray(cfg)
    out, storage = cfg.output.uri, cfg.storage
    run_id = cfg.run_id or make_run_id()
    version, fingerprints = model_version(cfg), stage_fingerprints(cfg)
    preflight.check(cfg, run_id)
    phases = Phases()
    done, prior_runs = scan_written(cfg, version)
    source = open_source(cfg, run_id)
    source.plan(done)
    phases.mark("plan")
    committed = manifest.committed_run_ids(out, version, storage)
    if len(source.todo) == 0 and not source.unread and committed and set(prior_runs) <= set(committed):
        latest = [r for r in manifest.committed_runs(out, storage) if r["model_version"] == version][-1]
        log.info("nothing to do: all %d inputs are committed for model version %s (run %s)",
                 len(source.keys), version, latest["run_id"])
        manifest.abandon(out, run_id, storage)
        return {**latest, "noop": True}
    log.info("cafi run %s: %d inputs (%d already written), model version %s", run_id, len(source.keys),
             len(source.keys) - len(source.todo), version)

    work = len(source.todo) or source.unread
    reuse_plan = reuse.plan(out, version, fingerprints, cfg, storage) if cfg.incremental and work else None
    todo_ref = ray.put(source.todo)
    omit = omitted_stages(cfg, reuse_plan, todo_ref, len(source.todo)) if not source.unread else ()
    phases.mark("reuse_plan")
    stats: dict = {}
    collector = telemetry.start(run_id)
    if work:
        stats = score(cfg, source, done, todo_ref, version, run_id, reuse_plan, omit)
    # else: a crashed attempt wrote every row but did not commit; this run commits its rows.
    del done
    phases.mark("score_and_write")
    elapsed = phases.elapsed
    observed = telemetry.collect(collector)
    ray.kill(collector)

    keys = source.commit_keys()
    includes = [r for r in prior_runs if r != run_id]
    counts = count_rows(cfg, [run_id, *includes], version, keys)
    missing = len(keys) - counts["distinct_uris"]
    if missing:
        raise CafiError(f"run {run_id}: {missing} of {len(keys)} inputs have no row; not committed")
    phases.mark("count")
    scored_now = source.scored_now
    summary = run_summary(
        run_id=run_id, version=version, synthetic=is_synthetic(cfg), fingerprints=fingerprints, inputs=len(keys),
        listed=source.listed, scored_now=scored_now, includes=includes,
        reuse=reuse_plan.describe() if reuse_plan else None,
        stages_run=[s.name for s in specs.specs_for(cfg) if s.name not in omit] if scored_now else [],
        observed=observed, counts=counts, phases=phases, elapsed=elapsed, input_section=source.summary(),
        stats=stats, output={"manifest": manifest.manifest_uri(out), "run": manifest.run_uri(out, run_id)},
        embedding_model=specs.embedding_model(cfg),
        config=cfg)  # written redacted: URIs without userinfo or query, interpolations as their text
    manifest.commit(out, run_id, summary, storage)
    if cfg.output.report:
        try:  # the report only views the committed run: its failure must never fail the run
            write_report(cfg, manifest.run_uri(out, run_id))
        except Exception as exc:  # noqa: BLE001 - logged, never raised
            log.warning("cafi run %s is committed, but its report was not written: %s", run_id,
                        redact_text(str(exc)))
    phases.mark("report")
    return summary


def write_report(cfg: JobConfig, run: str) -> None:
    """The run's report (cafi/report.py), written in a Ray task: it streams every row of the run."""
    from cafi import report

    in_task(cfg, report.write_report, run, storage=cfg.storage)


def scan_written(cfg: JobConfig, version: str) -> tuple[np.ndarray, list[str]]:
    """The keys already written for this version and the runs that wrote them (manifest.scan_version)."""
    return in_task(cfg, manifest.scan_version, cfg.output.uri, version, cfg.storage)


def count_rows(cfg: JobConfig, run_ids: list[str], version: str, keys: np.ndarray) -> dict:
    """The written rows' counts per status and reason (manifest.run_counts), each input once."""
    return in_task(cfg, manifest.run_counts, cfg.output.uri, run_ids, version, cfg.storage, only=keys)
