"""The shard index: every sample a run enumerated in one shard, written when the shard is done.

  <output>/runs/<run_id>/shards/<shard hash>-<state hash>.parquet

One row per uri the shard gave (sample rows, duplicate keys' rows, the shard's own error row: key
null), with what the read found (error, width, height, shard_offset, shard_size), and in the file's
metadata the shard uri, its state when listed (size and ETag / mtime), and counts: samples, rows
left to score, GETs, bytes.

The driver reads the indexes of this run at commit (every input key, for the exactly-once check and
the summary). On a later run of any model version, a shard whose state is unchanged and that has an
index is known without reading it: a resume skips it (no GET) when every sample is already written.
The state hash is in the name, so an index of an older state of the shard is never even opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cafi import manifest
from cafi.config import StorageConfig
from cafi.fetch import write_bytes
from cafi.inputs.uris import sample_uri
from cafi.storage import filesystem, join

SHARDS_DIR = "shards"
META = b"cafi.shard"
SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                    ("shard_offset", pa.int64()), ("shard_size", pa.int64())])


def _hash(text: str, n: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=n).hexdigest()


def shard_hash(shard: str) -> str:
    return _hash(shard, 16)


def file_name(shard: str, stamp: str | None, enumeration: str) -> str:
    """Named by the shard and by its state plus how samples were enumerated (format, key column)."""
    return f"{shard_hash(shard)}-{_hash(f'{stamp}|{enumeration}', 8)}.parquet"


def index_dir(output: str, run_id: str) -> str:
    return join(manifest.run_uri(output, run_id), SHARDS_DIR)


def stamp_of(info: dict) -> str | None:
    """An object's state from a listing or HEAD: its size and ETag (object stores) or mtime (files)."""
    if not info or info.get("size") is None:
        return None
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified")
                if info.get(k) is not None), "")
    return f"{info['size']}:{str(tag).strip(chr(34))}"


class IndexWriter:
    """The rows of one shard's index, gathered while it is read."""

    def __init__(self):
        self.cols: dict[str, list] = {n: [] for n in SCHEMA.names}

    def add(self, sample) -> None:
        for name, value in (("key", sample.key), ("error", sample.error), ("width", sample.width),
                            ("height", sample.height), ("shard_offset", sample.offset), ("shard_size", sample.size)):
            self.cols[name].append(value)

    def __len__(self) -> int:
        return len(self.cols["key"])

    def write(self, uri: str, meta: dict, storage: StorageConfig | None) -> None:
        table = pa.table(self.cols, schema=SCHEMA.with_metadata({META: json.dumps(meta, sort_keys=True).encode()}))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs, path = filesystem(uri, storage)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write_bytes(fs, path, buf.getvalue(), (storage or StorageConfig()).retry_budget_s)


def parse(data: bytes) -> tuple[pa.Table, dict]:
    """An index file's rows (key column) and metadata."""
    table = pq.read_table(io.BytesIO(data), columns=["key"])
    meta = json.loads((table.schema.metadata or {}).get(META, b"{}"))
    return table, meta


def uris(table: pa.Table, shard: str) -> list[str]:
    """The uris an index lists: `<shard>#<key>`, or the shard itself for its own row."""
    return [shard if k is None else sample_uri(shard, k) for k in table.column("key").to_pylist()]


def read_many(paths: list[str], fs, chunk: int = 256):
    """(path, bytes or exception) of many small files, fetched concurrently in chunks."""
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        got = fs.cat(part, on_error="return") if len(part) > 1 else {part[0]: _cat_one(fs, part[0])}
        for p in part:
            yield p, got.get(p, FileNotFoundError(p)) if isinstance(got, dict) else got


def _cat_one(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - reported per file
        return exc


def keys_of(table: pa.Table, shard: str) -> np.ndarray:
    return manifest.uri_keys(uris(table, shard))


def listing(output: str, storage: StorageConfig | None) -> dict[str, list[str]]:
    """Every index file under <output>/runs, by file name (the same shard state may have several)."""
    fs, root = filesystem(join(output, manifest.RUNS_DIR), storage)
    fs.invalidate_cache()  # indexes written since this process last listed
    if not fs.exists(root):
        return {}
    out: dict[str, list[str]] = {}
    for path in sorted(fs.find(root)):
        if path.endswith(".parquet") and posixpath.basename(posixpath.dirname(path)) == SHARDS_DIR:
            out.setdefault(posixpath.basename(path), []).append(path)
    return out
