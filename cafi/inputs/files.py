"""Files: one object per crop (`input.format: files`), listed under `input.uri` or named by
`input.manifest`. The URIs are hashed in Ray tasks; the driver holds their 16-byte keys only."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from cafi import keys as K
from cafi.config import JobConfig
from cafi.inputs import keep, listing
from cafi.inputs.source import describe
from cafi.ray_setup import rows_per_block
from cafi.stages.read import read_objects
from cafi.storage import list_files

log = logging.getLogger("cafi")


def uri_dataset(cfg: JobConfig):
    """The inputs as a dataset with a `uri` column (and the kept columns), in blocks as read."""
    import ray.data

    inp = cfg.input
    if inp.manifest:
        ds = listing.manifest_dataset(cfg)
        return ds.limit(inp.limit) if inp.limit else ds
    uris = list(list_files(inp.uri, inp.extensions, cfg.storage))
    if inp.limit:
        uris = uris[: inp.limit]
    step = rows_per_block(len(uris), cfg.read.batch_size)
    chunks = [pa.table({"uri": pa.array(uris[i:i + step], pa.string())}) for i in range(0, max(len(uris), 1), step)]
    return ray.data.from_arrow(chunks)


def kept_schema(cfg: JobConfig) -> pa.Schema:
    """The kept columns of a URI manifest: their Parquet types; CSV: strings."""
    names = list(cfg.input.keep_columns)
    if not names or listing.is_csv(cfg.input.manifest):
        return keep.string_schema(names)
    return listing.parquet_kept_schema(cfg, [cfg.input.manifest], "input.manifest")


def _keep_todo(batch: dict, todo: list, drop: list) -> dict:
    """Keep the rows still to score (resume), without the duplicated inputs: those join once each,
    from `duplicate_rows`."""
    import ray

    blank = np.array([K.is_blank(u) for u in batch["uri"]], dtype=bool)
    keys = K.uri_keys(["" if b else str(u) for u, b in zip(batch["uri"], blank, strict=True)])
    chosen = K.contains(ray.get(todo[0]), keys) & ~K.contains(ray.get(drop[0]), keys) & ~blank
    return {k: v[chosen] for k, v in batch.items()}


def duplicate_rows(ds, duplicated: np.ndarray):
    """One row per input listed more than once (their URIs, few, gathered on the driver)."""
    import ray.data

    def pick(batch: dict) -> dict:
        chosen = K.contains(duplicated, K.uri_keys(["" if K.is_blank(u) else str(u) for u in batch["uri"]]))
        return {k: v[chosen] for k, v in batch.items()}

    rows: dict[str, dict] = {}  # the first row of each URI (its kept columns, if any)
    for b in ds.map_batches(pick, batch_size=None).iter_batches(batch_format="numpy"):
        for i, u in enumerate(b["uri"]):
            rows.setdefault(str(u), {k: v[i] for k, v in b.items()})
    uris = sorted(rows)
    columns = list(next(iter(rows.values()))) if rows else ["uri"]
    return ray.data.from_arrow(pa.table({c: pa.array([str(rows[u][c]) for u in uris], pa.string())
                                         for c in columns}))


class FileSource:
    """input.format files (cafi/inputs/source.py's interface)."""

    read_step = staticmethod(read_objects)
    unread = 0  # every key is known before reading

    def __init__(self, cfg: JobConfig, run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.kept = kept_schema(cfg)
        self.keys = self.todo = self.duplicated = K.EMPTY
        self.listed = self.blank = 0
        self._ds = None

    def plan(self, done: np.ndarray) -> None:
        self._ds = uri_dataset(self.cfg)
        found = K.input_keys(self._ds)
        self.keys, self.duplicated, self.listed, self.blank = found.keys, found.duplicated, found.listed, found.blank
        self.todo = K.not_done(found.keys, done)
        if self.blank:
            log.warning("input.manifest: %d row(s) have a null or empty %s: they name no input (summary: "
                        "input.blank_uris)", self.blank, self.cfg.input.uri_column)

    def dataset(self, done: np.ndarray, todo_ref, models_run: bool):
        """The rows to score: inputs without a row yet, each once, in blocks sized for what runs."""
        import ray

        rows = rows_per_block(len(self.todo), self.cfg.read.batch_size, models_run)
        ds = self._ds.map_batches(_keep_todo, fn_kwargs={"todo": [todo_ref], "drop": [ray.put(self.duplicated)]},
                                  batch_size=None, num_cpus=self.cfg.read.num_cpus)
        if len(self.duplicated):
            once = duplicate_rows(self._ds, self.duplicated).map_batches(_keep_todo, fn_kwargs={
                "todo": [todo_ref], "drop": [ray.put(K.EMPTY)]}, batch_size=None)
            ds = ds.union(once)
        return ds.repartition(target_num_rows_per_block=rows)

    def commit_keys(self) -> np.ndarray:
        return self.keys

    @property
    def scored_now(self) -> int:
        return len(self.todo)

    def summary(self) -> dict:
        # manifest rows naming no input (null or empty uri): no row can carry them, so they are counted here
        return {**describe(self.cfg, self.kept), "blank_uris": self.blank}
