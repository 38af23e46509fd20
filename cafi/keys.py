"""Key algebra of a run: every input URI as a 16-byte key (BLAKE2b, cafi.manifest.uri_keys), hashed where
the rows are; the driver holds sorted numpy arrays of keys only, never URIs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

EMPTY = np.array([], dtype="S16")


def uri_keys(uris: list[str]) -> np.ndarray:
    """16-byte BLAKE2b keys of URIs: what resume and reuse hold per row instead of the URI string."""
    return np.array([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in uris], dtype="S16")


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which `keys` are in `sorted_keys` (sorted, unique): a binary search each, O(n log m)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def not_done(keys: np.ndarray, done: np.ndarray) -> np.ndarray:
    """`keys` without those in `done` (both sorted, unique); `keys` itself when nothing is done."""
    return keys if len(done) == 0 else keys[~contains(done, keys)]


def is_blank(uri) -> bool:
    """A manifest row that names no input: a null or empty URI."""
    return uri is None or (isinstance(uri, str) and not uri.strip())


def keys_column(batch: pa.Table) -> pa.Table:
    """The 16-byte key of each URI, computed where the rows are (the driver only receives keys); null
    for a blank one."""
    return pa.table({"key": pa.array([None if is_blank(u) else hashlib.blake2b(u.encode(), digest_size=16).digest()
                                      for u in batch.column("uri").to_pylist()], pa.binary(16))})


def as_keys(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_binary(16) column as a numpy S16 array (one copy, no Python objects)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype="S16", count=len(c), offset=c.offset * 16) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else EMPTY.copy()


@dataclass
class InputKeys:
    keys: np.ndarray        # sorted unique 16-byte keys of every input URI
    duplicated: np.ndarray  # the keys listed more than once
    listed: int             # inputs as listed, duplicates included
    blank: int = 0          # manifest rows with a null or empty URI: no input, counted in the summary


def input_keys(ds) -> InputKeys:
    """Hash the input URIs in Ray tasks and stream only the keys to the driver: 16 bytes per input,
    sorted in place (the peak is about twice that, not the several copies np.unique makes)."""
    parts, blank = [], 0
    for b in ds.map_batches(keys_column, batch_format="pyarrow", batch_size=None).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        column = b.column("key")
        blank += column.null_count
        parts.append(as_keys(column.filter(column.is_valid()) if column.null_count else column))
    listed = np.concatenate(parts) if parts else EMPTY.copy()
    del parts
    listed.sort()
    first = np.ones(len(listed), dtype=bool)
    np.not_equal(listed[1:], listed[:-1], out=first[1:])
    again = np.unique(listed[~first])  # keys listed more than once (few)
    return InputKeys(listed[first], again, len(listed), blank)
