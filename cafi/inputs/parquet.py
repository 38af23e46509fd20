"""Samples from a Parquet file with an image-bytes column (img2dataset's parquet output, Hugging
Face datasets).

The image column (`input.image_column`) holds the encoded bytes, either as a binary column or as a
struct with a `bytes` field (the Hugging Face `Image` feature). The key is `input.key_column`
(img2dataset's `key`), or the row index when it is null. A sample's uri is `<file uri>#<key>`;
`shard_offset` is its row index in the file.

Error rows: a row whose image is null; a null key (its uri then carries `row<index>`); a key seen
earlier in the file (`#2`, `#3`, ...: only the first one is scored; linear however often a key
repeats); plus the header checks. A file that is not Parquet, or lacks the image or key column,
gives one row for the file; so does one that breaks part-way (after the rows before the break):
"cannot read the Parquet file past row N" for corrupt bytes, "cannot read object" when the storage
under it failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cafi.config import ImageConfig
from cafi.fetch import read_error
from cafi.inputs import keep
from cafi.inputs.rows import Sample
from cafi.inputs.uris import sample_uri
from cafi.inputs.webdataset import Keys

ROWS_PER_BATCH = 256


def image_values(column: pa.Array | pa.ChunkedArray, name: str) -> list:
    """bytes (or None) per row of a binary column or of a struct column's `bytes` field."""
    typ = column.type
    if pa.types.is_struct(typ):
        if typ.get_field_index("bytes") < 0:
            raise TypeError(f"input.image_column {name!r} is a struct without a `bytes` field ({typ})")
        column = pa.chunked_array([c.field("bytes") for c in column.chunks]) \
            if isinstance(column, pa.ChunkedArray) else column.field("bytes")
        typ = column.type
    if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)):
        raise TypeError(f"input.image_column {name!r} holds {typ}, not image bytes")
    return column.to_pylist()


def check_columns(schema: pa.Schema, image_column: str, key_column: str | None) -> str | None:
    """Why a file cannot give samples (missing columns), or None."""
    missing = [c for c in (image_column, key_column) if c is not None and c not in schema.names]
    if missing:
        which = "input.image_column" if missing[0] == image_column else "input.key_column"
        return f"{which} {missing[0]!r} is not a column of this Parquet file (columns: {', '.join(schema.names)})"
    return None


def _image_bytes(md: pq.RowGroupMetaData, image_column: str) -> int:
    """Decoded bytes of a row group's image column (every leaf of it: `jpg`, or `jpg.bytes` of a struct)."""
    return sum(md.column(c).total_uncompressed_size for c in range(md.num_columns)
               if md.column(c).path_in_schema.split(".")[0] == image_column)


def samples(source, shard: str, image_cfg: ImageConfig, image_column: str, key_column: str | None,
            kept: pa.Schema, max_group_bytes: int | None = None) -> Iterator[Sample]:
    """Every row of a Parquet file as a sample, then (if the file breaks part-way) the file's own row.
    `source`: the file's bytes, or a seekable file object. `kept`: the kept columns with the types the
    manifest stores (a column missing here is null; one whose values do not cast to that type, too).
    `max_group_bytes`: a row group whose image column is bigger decoded is not read (pyarrow holds a
    row group's column about twice while it reads it); its rows are error rows that say so."""
    keys = Keys(shard)
    watched = None if isinstance(source, bytes) else _Watched(source)
    try:
        # pre_buffer off: pyarrow would otherwise fetch and hold every column chunk of a row group at once
        pf = pq.ParquetFile(pa.BufferReader(source) if watched is None else watched, pre_buffer=False,
                            buffer_size=1 << 20)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - whatever pyarrow says, the file gives one error row
        storage = watched is not None and watched.error is not None
        yield Sample(shard, None, error=read_error(watched.error) if storage
                     else f"not a readable Parquet file: {_first_line(exc)}")
        return
    why = check_columns(schema, image_column, key_column)
    if why is not None:
        yield Sample(shard, None, error=why)
        return
    present = [k for k in kept.names if k in schema.names]
    columns = list(dict.fromkeys([image_column, *([key_column] if key_column else []), *present]))
    row = 0
    try:
        for group in range(pf.num_row_groups):
            size = _image_bytes(pf.metadata.row_group(group), image_column)
            too_big = max_group_bytes is not None and size > max_group_bytes
            why = (f"Parquet row group {group} holds {size / 2**20:.0f} MiB of images, over the "
                   f"{max_group_bytes / 2**20:.0f} MiB a shard task reads at once (half of input.shard_buffer_mb); "
                   "not read") if too_big else None
            for batch in _batches(pf, group, [c for c in columns if c != image_column] if too_big else columns):
                images = [None] * batch.num_rows if too_big else image_values(batch.column(image_column), image_column)
                names = [None if k is None else str(k) for k in batch.column(key_column).to_pylist()] \
                    if key_column else [str(row + i) for i in range(batch.num_rows)]
                values = {k: _kept_text(batch.column(k), kept.field(k).type) for k in present}
                for i, (data, key) in enumerate(zip(images, names, strict=True)):
                    yield _sample(keys, key, data, row + i, {k: v[i] for k, v in values.items()}, image_column,
                                  key_column, image_cfg, why)
                row += batch.num_rows
    except TypeError as exc:
        yield Sample(shard, None, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a corrupt row group, or storage gone: the rows before it stand
        if watched is not None and watched.error is not None:
            yield Sample(shard, None, error=f"{read_error(watched.error)} (past row {row}; rows from there on are "
                                            "missing)")
        else:
            yield Sample(shard, None, error=f"cannot read the Parquet file past row {row}: {_first_line(exc)}")


def _batches(pf: pq.ParquetFile, group: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """One row group's columns in batches of ROWS_PER_BATCH rows (no column: its row count alone)."""
    if not columns:
        yield pa.record_batch({"rows": pa.nulls(pf.metadata.row_group(group).num_rows)})
        return
    yield from pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group], columns=columns)


class _Watched:
    """A file object that remembers the last error its calls raised. pyarrow re-raises such an error
    as it is, but raises plain OSError for corrupt bytes too: this tells a failure of the storage under
    the file ("cannot read object": tried again by a later run) from a fault of the file's bytes."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def __getattr__(self, name: str):
        attr = getattr(self.raw, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self.error = exc
                raise

        return call


def _sample(keys: Keys, key: str | None, data: bytes | None, row: int, kept: dict, image_column: str,
            key_column: str | None, image_cfg: ImageConfig, error: str | None = None) -> Sample:
    if key is None:
        key, error = f"row{row}", f"input.key_column {key_column!r} is null in row {row}"
    key, dup = keys.unique(key)  # the key its uri and the shard's index carry (`a#2` for a repeated `a`)
    uri = sample_uri(keys.shard, key)
    error = error or dup
    if error is None and data is None:
        error = f"input.image_column {image_column!r} is null in row {row}"
    return Sample(uri, key, error=error, data=data or b"", offset=row, kept=kept).check(image_cfg)


def _kept_text(column: pa.Array, typ: pa.DataType) -> list:
    """The in-flight text of a kept column stored as `typ`: a string column takes any type's text form;
    another type takes the values that cast to it (the others are null)."""
    if pa.types.is_string(typ) or column.type == typ:
        return keep.as_text(column)
    try:
        return keep.as_text(column.cast(typ))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return [None] * len(column)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
