"""What every input kind reads before scoring: an input manifest (`input.manifest`, Parquet or CSV, one
URI per row) and the Arrow types of kept Parquet columns."""

from __future__ import annotations

import logging

import pyarrow as pa

from cafi.config import JobConfig
from cafi.errors import ConfigError, StorageError
from cafi.inputs import keep
from cafi.manifest import arrow_filesystem
from cafi.redact import redact_text, redact_uri

log = logging.getLogger("cafi")


def is_csv(uri: str) -> bool:
    return uri.lower().endswith(".csv")


def _cannot_read(cfg: JobConfig, exc: Exception) -> StorageError:
    return StorageError(f"input.manifest: cannot read {redact_uri(cfg.input.manifest)}: {redact_text(str(exc))}")


def _check_uri_column(cfg: JobConfig, columns: list[str]) -> None:
    inp = cfg.input
    if inp.uri_column not in columns:
        raise StorageError(f"input.uri_column: {inp.uri_column!r} is not a column of {redact_uri(inp.manifest)} "
                           f"(columns: {columns})")


def manifest_dataset(cfg: JobConfig):
    """The input manifest as a Ray dataset (read in tasks: it may list millions of URIs), with the
    URI column named `uri` and the kept columns (as their text in flight, cafi/inputs/keep.py)."""
    import ray.data

    inp = cfg.input
    fs, path = arrow_filesystem(inp.manifest, cfg.storage)
    extra: dict = {}
    if is_csv(path):  # CSV values are kept as the text they are
        import pyarrow.csv as pacsv

        text = {c: pa.string() for c in (inp.uri_column, *inp.keep_columns)}
        extra["convert_options"] = pacsv.ConvertOptions(column_types=text)
    reader = ray.data.read_csv if is_csv(path) else ray.data.read_parquet
    try:
        ds = reader(path, filesystem=fs, **extra)
    except Exception as exc:  # noqa: BLE001 - surfaced as one clear line
        raise _cannot_read(cfg, exc) from None
    _check_uri_column(cfg, ds.columns())
    ds = ds.select_columns([inp.uri_column, *inp.keep_columns])
    if inp.uri_column != "uri":
        ds = ds.rename_columns({inp.uri_column: "uri"})
    if inp.keep_columns:
        ds = ds.map_batches(keep.to_wire_batch, fn_kwargs={"names": list(inp.keep_columns)},
                            batch_format="pyarrow", batch_size=None)
    return ds


def manifest_uris(cfg: JobConfig) -> list[str]:
    """The URIs an input manifest lists, in order (shard manifests: a few thousand at most)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    inp = cfg.input
    fs, path = arrow_filesystem(inp.manifest, cfg.storage)
    try:
        if is_csv(path):
            with fs.open_input_stream(path) as fh:
                table = pacsv.read_csv(fh, convert_options=pacsv.ConvertOptions(
                    column_types={inp.uri_column: pa.string()}))
        else:
            table = pq.read_table(path, filesystem=fs)
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise _cannot_read(cfg, exc) from None
    _check_uri_column(cfg, table.column_names)
    return [u for u in table.column(inp.uri_column).to_pylist() if u]


def parquet_kept_schema(cfg: JobConfig, uris: list[str], what: str) -> pa.Schema:
    """The kept columns' types, from the first readable Parquet file of `uris` (the others are cast to
    them); strings when none can be read (each bad file gets its error when it is read)."""
    import pyarrow.parquet as pq

    names = list(cfg.input.keep_columns)
    for uri in uris[:5]:
        fs, path = arrow_filesystem(uri, cfg.storage)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - a bad shard gets its error row when it is read
            if what == "input.manifest":
                raise _cannot_read(cfg, exc) from None
            log.warning("input.keep_columns: cannot read the schema of %s: %s", uri, exc)
            continue
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise ConfigError(f"input.keep_columns: {missing[0]!r} is not a column of {redact_uri(uri)} "
                              f"(columns: {', '.join(schema.names)})")
        return pa.schema([pa.field(n, keep.stored_type(schema.field(n).type)) for n in names])
    return keep.string_schema(names)
