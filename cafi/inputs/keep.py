"""input.keep_columns: values copied from the input into the manifest untouched.

Sources: the fields of a WebDataset sample's `.json` (stored as strings: a JSON string as it is, any
other JSON value -- number, bool, list, object -- as its compact JSON text, so the column has one
type whatever the samples hold; a missing field or JSON null is null); the columns of Parquet shards
and of URI manifests (their own Arrow type; CSV manifest columns are strings).

In flight every kept column is a string column that is never null ("" = null, "=" + text = a value):
Ray Data turns an integer column with nulls into floats between stages, and a block whose values are
all null loses its type, so values travel as text and are cast back to their type when the rows are
written (`append`).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def as_text(arr: pa.Array | pa.ChunkedArray) -> list:
    typ = arr.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return arr.to_pylist()
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ):
        return [None if v is None else base64.b64encode(v).decode("ascii") for v in arr.to_pylist()]
    if pa.types.is_nested(typ) or pa.types.is_dictionary(typ):
        return [None if v is None else json.dumps(v, default=str, separators=(",", ":")) for v in arr.to_pylist()]
    return pc.cast(arr, pa.string()).to_pylist()


def unwire(values, typ: pa.DataType) -> pa.Array:
    """The in-flight column -> an Arrow array of the kept column's type."""
    text = [None if (v is None or v == NULL) else str(v)[1:] for v in values]
    strings = pa.array(text, pa.string())
    if pa.types.is_string(typ):
        return strings
    if pa.types.is_large_string(typ):
        return strings.cast(typ)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ):
        return pa.array([None if t is None else base64.b64decode(t) for t in text], typ)
    if pa.types.is_nested(typ) or pa.types.is_dictionary(typ):
        return pa.array([None if t is None else json.loads(t) for t in text], typ)
    return pc.cast(strings, typ)


def append(table: pa.Table, batch: dict, kept: pa.Schema | None) -> pa.Table:
    """The manifest rows of a batch with its kept columns after the cafi columns (decide's hook)."""
    if not kept:
        return table
    n = table.num_rows
    for field in kept:
        values = batch.get(field.name)
        arr = pa.nulls(n, field.type) if values is None else unwire(values, field.type)
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
