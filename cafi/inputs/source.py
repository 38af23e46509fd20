"""One interface for every kind of input (`input.format`), chosen once per run by `open_source`.

A source plans against what is already written (`plan`), gives the dataset of items to score
(`dataset`) and the read step that turns them into read rows (`read_step`), knows every input key at
commit (`commit_keys`) and describes itself in the summary (`summary`). The pipeline never asks which
kind it has: files (one object per crop, cafi/inputs/files.py) or shards (WebDataset tars and Parquet
files, cafi/inputs/shards.py); cafi/inputs/sources.py picks one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from cafi.config import JobConfig
from cafi.inputs import keep


class InputSource(Protocol):
    kept: pa.Schema  # input.keep_columns and the Arrow types the manifest stores them with
    keys: np.ndarray  # every input key known so far (sorted, unique 16-byte keys)
    todo: np.ndarray  # the known keys without a row of this version yet
    listed: int       # inputs as listed, duplicates included
    unread: int       # inputs whose keys are known only once read (shards without an index)

    def plan(self, done: np.ndarray) -> None:
        """Learn the keys known before reading and those of them still to score (`done`: written)."""

    def dataset(self, done: np.ndarray, todo_ref, models_run: bool):
        """The items still to score as a Ray dataset (lazy), before `read_step`."""

    def read_step(self, batch: dict, cfg: JobConfig, run_id: str | None = None) -> dict:
        """Ray Data UDF: the items of `dataset` -> read rows (uri, status, error, width, height, data, ...)."""

    def commit_keys(self) -> np.ndarray:
        """Every input key of the run, once the data is written (the exactly-once check)."""

    @property
    def scored_now(self) -> int:
        """Rows this run scored (known after `commit_keys`)."""

    def summary(self) -> dict:
        """The run summary's `input` section."""


def describe(cfg: JobConfig, kept: pa.Schema) -> dict:
    """What every source's summary section starts with: the format and the kept columns' types."""
    return {"format": cfg.input.format, "keep_columns": {f.name: str(f.type) for f in kept},
            "keep_schema": keep.schema_to_text(kept) if len(kept) else None}
