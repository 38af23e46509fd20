"""`cafi identities RUN_OR_OUTPUT (--identities IDS.csv | --identity-column COL) --out URI`.

Phases (each a Ray Data pass or parallel Ray tasks; the driver holds counts, the conflict pairs and
the merge pairs, never the rows):
  1. buckets     the run's rows with identity and bucket, written as hash buckets (Ray Data)
  2. cells       the conflict index's cells, learned from a sample (one task)
  3. analyse     per bucket: outliers, duplicates, ranks, identity statistics, cell rows (a task each)
  4. conflicts   per cell group: the exact search of its cells (a task each)
  5. merges      identity centroids closer than --merge-cos (one task)
  6. finish      per bucket: keep, reason, caps; its part of the outputs (a task each)
Outputs under --out: samples.parquet, identities.parquet, identities.html, summary.json (last: the
curation is complete when it is there). The work files (`_work/`) are removed at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cafi import columns, manifest, runs
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.eval_inputs import read_identities
from cafi.identities import ann, buckets, conflicts, merges
from cafi.identities.analyse import analyse_bucket, training_sample
from cafi.identities.finish import HIST_EDGES, IDENTITIES, SAMPLES, finish_bucket
from cafi.identities.options import REASONS, Options
from cafi.ray_setup import TASK_RETRIES
from cafi.redact import redact_uri
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

SAMPLES_FILE, IDENTITIES_FILE, SUMMARY_FILE, PAGE_FILE, WORK = (
    "samples.parquet", "identities.parquet", "summary.json", "identities.html", "_work")
TRAIN_ROWS = 64_000


def _tasks(fn, calls: list[tuple], num_cpus: float = 1.0) -> list:
    """fn(*args) for each call in Ray tasks, a bounded number in flight; results in call order."""
    import ray

    task = ray.remote(num_cpus=num_cpus, **TASK_RETRIES)(fn)  # a task lost with its node runs again
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending, results = [], []
    for args in calls:
        if len(pending) >= window:
            results.append(ray.get(pending.pop(0)))
        pending.append(task.remote(*args))
    return results + ray.get(pending)


def _train(root: str, files: dict, storage: StorageConfig, cells: int) -> ann.Cells:
    ann.threads(1)
    return ann.train_cells(training_sample(root, files, storage, min(TRAIN_ROWS, cells * ann.TRAIN_PER_CELL)), cells)


def _concat(work: str, kind: str, dest: str, schema: pa.Schema, n_buckets: int, storage: StorageConfig) -> int:
    """The buckets' parts as one Parquet file, a part at a time (bounded memory); rows written."""
    fs, path = filesystem(dest, storage)
    rows = 0
    with fs.open(path, "wb") as fh, pq.ParquetWriter(fh, schema) as writer:
        for b in range(n_buckets):
            wfs, part = filesystem(join(work, "final", kind, f"bucket={b}.parquet"), storage)
            if not wfs.exists(part):
                continue
            with wfs.open(part, "rb") as pf:
                t = pq.read_table(pf).cast(schema)
            writer.write_table(t, row_group_size=65_536)
            rows += t.num_rows
    return rows


def _prepare(out: str, storage: StorageConfig) -> str:
    fs, path = filesystem(out, storage)
    ours = {SAMPLES_FILE, IDENTITIES_FILE, SUMMARY_FILE, PAGE_FILE, WORK}
    if fs.exists(path):
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        if names - ours:
            raise CafiError(f"identities: --out {redact_uri(out)} holds other files ({sorted(names - ours)[0]}, ...); "
                            "write into an empty prefix or an earlier curation's")
        for name in names:  # an earlier curation is replaced: not complete until this one writes its summary
            fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path, exist_ok=True)
    return join(out, WORK)


def _quality(ref: runs.RunRef, options: Options) -> str:
    quality = options.quality or runs.scorers(ref.summary)[0]
    col = columns.BY_NAME.get(quality)
    if col is None or col.better is None:
        names = ", ".join(c.name for c in columns.QUALITY)
        raise CafiError(f"identities: --quality {quality!r} is not a quality column (one of: {names})")
    return quality


def identities(run_uri: str, out: str, ids_uri: str | None = None, identity_column: str | None = None,
               options: Options | None = None, storage: StorageConfig | None = None,
               image_storage: StorageConfig | None = None, page: bool = True) -> dict:
    """Curate a committed run's identities into `out`; returns the summary (also `out/summary.json`)."""
    import ray

    options = options or Options()
    options.check()
    if (ids_uri is None) == (identity_column is None):
        raise CafiError("identities: give either --identities IDS.csv or --identity-column COL")
    storage = storage if storage is not None else StorageConfig()
    started, clock = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    ref = runs.resolve_run(run_uri, storage)
    quality = _quality(ref, options)
    if identity_column is not None:
        kept = manifest.kept_columns([ref.summary])
        if identity_column not in kept.names:
            raise CafiError(f"identities: run {ref.run_id} keeps no column {identity_column!r} (its kept columns: "
                            f"{kept.names or 'none'}; score with input.keep_columns or give --identities IDS.csv)")
    ids = read_identities(ids_uri, storage) if ids_uri else None
    work = _prepare(out, storage)
    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    phases: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        phases[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    t = time.perf_counter()
    lookup_ref = ray.put(buckets.lookup(ids)) if ids is not None else None
    bk = buckets.write_buckets(ref, storage, work, lookup_ref, identity_column, quality, options.bucket_rows)
    del lookup_ref
    if not bk.files:
        what = f"the {ids.num_rows} URIs of {ids_uri}" if ids is not None else f"rows with a {identity_column!r}"
        raise CafiError(f"identities: none of {what} is in run {ref.run_id}")
    t = lap("buckets", t)
    cells = ann.cells_for(bk.run_rows)
    centroids = _tasks(_train, [(bk.root, bk.files, storage, cells)])[0] if cells > 1 else ann.train_cells(
        np.zeros((0, columns.EMBEDDING_DIM), np.float32), 1)
    t = lap("cells", t)
    groups = max(1, math.ceil(bk.run_rows * min(options.nprobe, centroids.count) / options.bucket_rows))
    analysed = _tasks(analyse_bucket, [(b, bk.root, f, work, storage, options, centroids, groups)
                                       for b, f in sorted(bk.files.items())])
    t = lap("analyse", t)
    by_group: dict[int, list[str]] = {}
    for a in analysed:
        for g, uri in a["cells"].items():
            by_group.setdefault(g, []).append(filesystem(uri, storage)[1])
    found = _tasks(conflicts.search_group, [(work, files, storage, options.conflict_cos)
                                            for _, files in sorted(by_group.items())])
    pairs = conflicts.unique_pairs(pa.concat_tables(found) if found else conflicts.PAIRS.empty_table())
    resolved = conflicts.resolve(pairs)
    t = lap("conflicts", t)
    id_files = [filesystem(join(work, "identities", f"bucket={a['bucket']}.parquet"), storage)[1] for a in analysed]
    merge_pairs = _tasks(merges.merge_pairs, [(work, id_files, storage, options.merge_cos, options.nprobe)])[0]
    cands = merges.candidates(merge_pairs)
    t = lap("merges", t)
    res_ref, cand_ref = ray.put(resolved), ray.put(cands)
    infos = _tasks(finish_bucket, [(a["bucket"], work, storage, options, res_ref, cand_ref) for a in analysed])
    del res_ref, cand_ref
    t = lap("finish", t)
    n_samples = _concat(work, "samples", join(out, SAMPLES_FILE), SAMPLES, bk.count, storage)
    n_ids = _concat(work, "identities", join(out, IDENTITIES_FILE), IDENTITIES, bk.count, storage)
    t = lap("write", t)
    removed = {r: sum(i["reasons"][r] for i in infos) for r in REASONS}
    summary = {
        "run_id": ref.run_id, "source_run": redact_uri(ref.uri), "model_version": ref.summary.get("model_version"),
        "identities_file": redact_uri(ids_uri) if ids_uri else None, "identity_column": identity_column,
        "listed": ids.num_rows if ids is not None else None, "quality": quality,
        "options": {k: v for k, v in dataclasses.asdict(options).items()},
        "samples": n_samples, "embedded": sum(a["embedded"] for a in analysed), "identities": n_ids,
        "kept": sum(i["kept"] for i in infos), "identities_kept": sum(i["identities_kept"] for i in infos),
        "removed": removed, "reasons_order": list(REASONS),
        "flagged": {k: sum(i["flagged"][k] for i in infos) for k in ("outlier", "duplicate", "conflict")},
        "conflict_pairs": pairs.num_rows, "merge_candidate_pairs": merge_pairs.num_rows,
        "index": {"cells": centroids.count, "nprobe": min(options.nprobe, centroids.count),
                  "cell_groups": len(by_group), "buckets": bk.count},
        "phases_seconds": phases, "started_at": started.isoformat(),
    }
    if page:
        from cafi.identities.page import write_page

        hist = {k: np.sum([i["hist"][k] for i in infos], axis=0) for k in ("kept", "outlier", "other")}
        examples = {k: sorted([e for i in infos for e in i["examples"][k]],
                              key=lambda e: (e["centroid_cos"] if e["centroid_cos"] is not None and
                                             math.isfinite(e["centroid_cos"]) else 9.0, e["uri"]))
                    for k in ("outlier", "duplicate", "conflict")}
        write_page(join(out, PAGE_FILE), summary, HIST_EDGES, hist, examples, merge_pairs, ref, storage, image_storage)
        t = lap("page", t)
    fs, path = filesystem(work, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    summary["wall_seconds"] = round(time.perf_counter() - clock, 3)
    summary["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    manifest.write_json(join(out, SUMMARY_FILE), summary, storage)
    return summary


def read_curation(uri: str, storage: StorageConfig | None = None) -> tuple[dict, pa.Table]:
    """A complete curation's summary and its samples (uri, keep, reason); refuses an incomplete one."""
    import json

    storage = storage if storage is not None else StorageConfig()
    fs, path = filesystem(join(uri, SUMMARY_FILE), storage)
    if not fs.exists(path):
        raise CafiError(f"--curation {redact_uri(uri)} is not a complete `cafi identities` output (no {SUMMARY_FILE})")
    with fs.open(path, "r") as fh:
        summary = json.load(fh)
    sfs, spath = filesystem(join(uri, SAMPLES_FILE), storage)
    with sfs.open(spath, "rb") as fh:
        samples = pq.read_table(fh, columns=["uri", "keep", "reason"])
    return summary, samples
