"""Building shards for the tests: tar files written by Python's own tarfile (an implementation
independent of cafi's reader) and Parquet files written by pyarrow."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def key_of(path: str) -> str:
    """The sample key of a crop file: its name up to the first '.' (as WebDataset would group it)."""
    return os.path.basename(path).split(".", 1)[0]


def meta_of(path: str) -> dict:
    """Per-crop metadata the tests keep: a string, an integer and a nested value."""
    key = key_of(path)
    return {"identity": f"person-{len(key) % 3}", "frame": len(key), "box": [1, 2]}


def webdataset_shards(paths: list[str], per_shard: int) -> list[bytes]:
    """`<key>.<ext>` + `<key>.json` per crop, `per_shard` crops per tar, in the order given."""
    shards = []
    for start in range(0, len(paths), per_shard):
        members = []
        for p in paths[start:start + per_shard]:
            key, ext = key_of(p), os.path.basename(p).split(".", 1)[1]
            with open(p, "rb") as fh:
                members.append((f"{key}.{ext}", fh.read()))
            members.append((f"{key}.json", json.dumps(meta_of(p)).encode()))
        shards.append(tar_bytes(members))
    return shards


def parquet_bytes(table: pa.Table, row_group_size: int = 2) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def parquet_shards(paths: list[str], per_shard: int) -> list[bytes]:
    """img2dataset's layout: `key`, `jpg` (bytes) and metadata columns."""
    shards = []
    for start in range(0, len(paths), per_shard):
        part = paths[start:start + per_shard]
        images = []
        for p in part:
            with open(p, "rb") as fh:
                images.append(fh.read())
        shards.append(parquet_bytes(pa.table({
            "key": [key_of(p) for p in part], "jpg": pa.array(images, pa.binary()),
            "identity": [meta_of(p)["identity"] for p in part],
            "frame": pa.array([meta_of(p)["frame"] for p in part], pa.int64())})))
    return shards
