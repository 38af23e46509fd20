"""The input kind of a run, chosen once from `input.format` (the rest of the job never asks which)."""

from __future__ import annotations

from cafi.config import JobConfig
from cafi.inputs.files import FileSource
from cafi.inputs.shards import ShardSource
from cafi.inputs.source import InputSource

SOURCES = {"files": FileSource, "webdataset": ShardSource, "parquet": ShardSource}


def open_source(cfg: JobConfig, run_id: str) -> InputSource:
    return SOURCES[cfg.input.format](cfg, run_id)
