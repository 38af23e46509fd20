"""Inputs that hold many crops per object: WebDataset tar shards and Parquet files with an image-bytes
column (`input.format: webdataset | parquet`) and one object per crop (`files`), behind one interface.

  source.py      the interface every input kind implements (plan, dataset, read step, keys, summary)
  sources.py     the kind of a run, chosen once from input.format
  files.py       files: one object per crop, listed or named by a manifest
  listing.py     reading an input manifest; the Arrow types of kept Parquet columns

  uris.py        a sample's uri: `<shard uri>#<key>`, and splitting it again
  stream.py      a shard as a byte stream, fetched in `input.shard_buffer_mb` blocks (one GET per block)
  tar.py         reading and writing tar archives member by member (never the whole archive)
  webdataset.py  tar members grouped into samples by key; the image member; the .json fields
  parquet.py     Parquet rows: key column, image column, kept columns
  rows.py        what a shard yields: the pipeline's read rows (uri, status, error, width, height, data,
                 shard_offset, shard_size, kept columns)
  index.py       the per-shard index: every sample a run enumerated in a shard (resume, exactly-once)
  shards.py      shards: planning on the driver (listing, prior indexes) and the shard read task
  keep.py        input.keep_columns: how kept values travel the pipeline and reach the manifest
  samples.py     read_samples: the bytes of a few samples by ranged reads (report thumbnails, export)
"""
