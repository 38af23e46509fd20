"""input.keep_columns: values copied from the input into the manifest untouched.

Sources: the fields of a WebDataset sample's `.json` (stored as strings: a JSON string as it is, any
other JSON value -- number, bool, list, object -- as its compact JSON text, so the column has one
type whatever the samples hold; a missing field or JSON null is null); the columns of Parquet shards
and of URI manifests (CSV manifest columns are strings).

A Parquet column is stored with its own Arrow type where its values survive the trip through text
exactly (`stored_type`): strings, binary, integers, floats, booleans, decimals, dates, timestamps, and
lists and structs of numbers, booleans and strings. Any other type is stored as a string column holding
each value's text form (`as_text`): JSON for nested values, with binary as base64, dates, times and
timestamps as ISO 8601 text, durations as seconds and decimals as their digits; a time of day or a
duration alone as Arrow prints it (`12:30:00.000000`, `5500000` with its unit in the summary's
`keep_columns` type). A column of the null type (all null where its type was read) is a string column.

In flight every kept column is a string column that is never null ("" = null, "=" + text = a value):
Ray Data turns an integer column with nulls into floats between stages, and a block whose values are
all null loses its type, so values travel as text and are cast back to their type when the rows are
written (`append`).
"""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger("cafi")

NULL, VALUE = "", "="


def json_text(value) -> str | None:
    """A .json field as the manifest stores it: strings as they are, other values as JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def wire(values: list) -> np.ndarray:
    """Python strings (or None) -> the in-flight column."""
    return np.array([NULL if v is None else VALUE + v for v in values], dtype=object)


def wire_arrow(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column of any type -> the in-flight column (its values as text, exactly)."""
    return wire(as_text(arr))


def _is_binary(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)


def _is_json_leaf(typ: pa.DataType) -> bool:
    """Values JSON carries exactly: numbers, booleans, strings."""
    return (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
            or pa.types.is_string(typ) or pa.types.is_large_string(typ))


def _is_json_nested(typ: pa.DataType) -> bool:
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _is_json_leaf(typ.value_type) or _is_json_nested(typ.value_type)
    if pa.types.is_struct(typ):
        return all(_is_json_leaf(f.type) or _is_json_nested(f.type) for f in typ)
    return False


def stored_type(typ: pa.DataType) -> pa.DataType:
    """The type the manifest stores a kept column of type `typ` with (the module's docstring)."""
    if pa.types.is_dictionary(typ):
        return stored_type(typ.value_type)
    exact = (_is_json_leaf(typ) or _is_binary(typ) or pa.types.is_decimal(typ) or pa.types.is_date(typ)
             or pa.types.is_timestamp(typ) or _is_json_nested(typ))
    return typ if exact else pa.string()


def _json_value(value):
    """A value inside a nested kept value, as JSON holds it (the module's docstring)."""
    import datetime as _dt
    import decimal

    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return str(value)


def _json_text(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], tuple):  # a map's (key, value) pairs
        value = [list(kv) for kv in value]
    return json.dumps(value, default=_json_value, separators=(",", ":"), ensure_ascii=False)


def as_text(arr: pa.Array | pa.ChunkedArray) -> list:
    """Each value's text: exact for the stored types, the documented text form for the others."""
    typ = arr.type
    if pa.types.is_dictionary(typ):
        return as_text(arr.cast(typ.value_type))
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return arr.to_pylist()
    if pa.types.is_null(typ):
        return [None] * len(arr)
    if _is_binary(typ):
        return [None if v is None else base64.b64encode(v).decode("ascii") for v in arr.to_pylist()]
    if pa.types.is_nested(typ):
        return [None if v is None else _json_text(v) for v in arr.to_pylist()]
    try:
        return pc.cast(arr, pa.string()).to_pylist()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # a type Arrow cannot print: Python's text of it
        return [None if v is None else _json_value(v) if not isinstance(v, (int, float)) else str(v)
                for v in arr.to_pylist()]


def unwire(values, typ: pa.DataType) -> pa.Array:
    """The in-flight column -> an Arrow array of the stored type `typ` (cafi/inputs/keep.py's docstring)."""
    text = [None if (v is None or v == NULL) else str(v)[1:] for v in values]
    strings = pa.array(text, pa.string())
    if pa.types.is_string(typ):
        return strings
    if pa.types.is_large_string(typ):
        return strings.cast(typ)
    if _is_binary(typ):
        return pa.array([None if t is None else base64.b64decode(t) for t in text], typ)
    if pa.types.is_nested(typ):
        return pa.array([None if t is None else json.loads(t) for t in text], typ)
    return pc.cast(strings, typ)


def append(table: pa.Table, batch: dict, kept: pa.Schema | None) -> pa.Table:
    """The manifest rows of a batch with its kept columns after the cafi columns (decide's hook)."""
    if not kept:
        return table
    n = table.num_rows
    for field in kept:
        values = batch.get(field.name)
        try:
            arr = pa.nulls(n, field.type) if values is None else unwire(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as exc:
            # Values read as another type than the stored one (a shard whose column differs from the first
            # shard's): they stay out of this column rather than fail the rows; said in the log.
            log.warning("input.keep_columns: %s values of this block do not convert to %s (%s); stored as null",
                        field.name, field.type, exc)
            arr = pa.nulls(n, field.type)
        table = table.append_column(field, arr)
    return table


def schema_to_text(kept: pa.Schema) -> str:
    """The kept columns' exact Arrow schema, for the run summary (manifest readers rebuild it)."""
    return base64.b64encode(kept.serialize().to_pybytes()).decode("ascii")


def schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def string_schema(names: list[str]) -> pa.Schema:
    return pa.schema([pa.field(n, pa.string()) for n in names])


def to_wire_batch(table: pa.Table, names: list[str]) -> pa.Table:
    """Ray Data UDF (pyarrow batches): the kept columns of a URI manifest as in-flight text."""
    for name in names:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pa.array(wire_arrow(table.column(name)).tolist(), pa.string()))
    return table
