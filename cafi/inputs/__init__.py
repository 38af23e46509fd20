"""Inputs that hold many crops per object: WebDataset tar shards and Parquet files with an image-bytes
column (`input.format: webdataset | parquet`; `files`, one object per crop, is cafi/pipeline.py's own).

  uris.py        a sample's uri: `<shard uri>#<key>`, and splitting it again
  stream.py      a shard as a byte stream, fetched in `input.shard_buffer_mb` blocks (one GET per block)
  tar.py         reading and writing tar archives member by member (never the whole archive)
  webdataset.py  tar members grouped into samples by key; the image member; the .json fields
  parquet.py     Parquet rows: key column, image column, kept columns
  rows.py        what a shard yields: the pipeline's read rows (uri, status, error, width, height, data,
                 shard_offset, shard_size, kept columns)
  index.py       the per-shard index: every sample a run enumerated in a shard (resume, exactly-once)
  shards.py      planning on the driver (listing, prior indexes) and the shard read task
  keep.py        input.keep_columns: how kept values travel the pipeline and reach the manifest
  samples.py     read_samples: the bytes of a few samples by ranged reads (report thumbnails, export)
"""

from cafi.inputs.samples import read_samples
from cafi.inputs.uris import sample_uri, split_sample_uri


def is_sharded(cfg) -> bool:
    """True when the input is shards (webdataset | parquet), not one object per crop."""
    return cfg.input.format != "files"


__all__ = ["is_sharded", "read_samples", "sample_uri", "split_sample_uri"]
