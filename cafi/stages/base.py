"""What every model stage shares: its columns, its reuse of earlier results, its resources.

A stage is built from its spec (cafi/stages/spec.py) and loads its model once in `__init__` (Ray runs it
inside a model actor); it works only on the rows still in flight (status "ok") and passes every other
row through untouched, so each input leaves exactly one row. A stage whose results an earlier model
version already holds copies them over (`take_over`) instead of running; built with `load=False` it
loads no model at all.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from cafi.columns import BY_NAME
from cafi.config import JobConfig, StageConfig
from cafi.decision import OK


def blank(column: str, n: int) -> np.ndarray:
    """A column of n NaNs shaped as the manifest column (fixed-size lists are 2-D)."""
    typ = BY_NAME[column].type
    if pa.types.is_fixed_size_list(typ):
        dtype = np.float16 if typ.value_type == pa.float16() else np.float32
        return np.full((n, typ.list_size), np.nan, dtype=dtype)
    return np.full(n, np.nan, dtype=np.float32)


def torch_threads(st: StageConfig) -> int:
    """0: the CPUs Ray reserved for the actor (at least 1); -1: every CPU this process may run on."""
    if st.torch_threads == -1:
        return len(os.sched_getaffinity(0))
    return st.torch_threads or max(1, round(st.num_cpus))


def image_settings(cfg: JobConfig) -> dict:
    """Settings every pixel-reading stage's results depend on: the image limits decide which inputs are
    error rows; crop size and precision change every score."""
    return {"crop_size": cfg.image.crop_size, "precision": cfg.models.precision, "min_side": cfg.image.min_side,
            "max_pixels": cfg.image.max_pixels, "max_bytes": cfg.image.max_bytes}


def reused(batch: dict, stage: str) -> np.ndarray:
    """Rows whose `stage` results come from an earlier version (flags set by cafi/reuse.py)."""
    flag = batch.get(f"prev_{stage}_reused")
    if flag is None:
        return np.zeros(len(batch["uri"]), dtype=bool)
    return flag.astype(bool)


class ModelStage:
    """Base of the model stages: subclasses implement `load` and `process`."""

    def __init__(self, spec, cfg: JobConfig, load: bool = True, outputs: tuple[str, ...] | None = None):
        self.spec = spec
        self.cfg = cfg
        self.outputs = spec.outputs if outputs is None else outputs  # + `embedding` where it is the source
        self.loaded = load
        self.device = None
        if load:  # torch is imported only where a model is loaded
            from cafi.models.runtime import pick_device

            self.device = pick_device(cfg.models.device, spec.resources(cfg).num_gpus)
            self.load()

    @property
    def section(self):
        """Its config section (models.<section>): settings and resources."""
        return self.spec.resources(self.cfg)

    def load(self) -> None:
        raise NotImplementedError

    def process(self, batch: dict, rows: np.ndarray) -> None:
        raise NotImplementedError

    def init_columns(self, batch: dict, n: int) -> None:
        for col in self.outputs:
            batch[col] = blank(col, n)

    def take_over(self, batch: dict, rows: np.ndarray) -> None:
        """Copy this stage's results of an earlier version into `rows`."""
        for col in self.outputs:
            batch[col][rows] = batch[f"prev_{col}"][rows]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        self.init_columns(batch, n)
        live = batch["status"] == OK
        taken = live & reused(batch, self.spec.name)
        if taken.any():
            self.take_over(batch, np.flatnonzero(taken))
        rows = np.flatnonzero(live & ~taken & (batch["status"] == OK))
        if len(rows):
            if not self.loaded:
                raise RuntimeError(f"stage {self.spec.name}: rows need its model, but it was planned as reused")
            self.process(batch, rows)
        return batch

    def _common(self) -> dict:
        m = self.cfg.models
        return {"cache_dir": m.cache_dir, "device": self.device, "precision": m.precision,
                "storage": self.cfg.storage, "compile": m.compile}

    def _checkpoint(self):
        return self.spec.checkpoint(self.cfg)
