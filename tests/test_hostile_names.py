"""Hostile names, schemes, kept-column types and Parquet layouts, at the unit level (no Ray): each case
failed, hung or misread before (issue "Hostile inputs"). The end-to-end runs that commit such inputs are
in tests/test_reliability.py (names and schemes) and tests/test_shards.py (kept types, row groups)."""

from __future__ import annotations

import datetime as dt
import decimal
import os

import numpy as np
import pyarrow as pa
import pytest

from cafi.config import ImageConfig, load_config
from cafi.fetch import read_bytes
from cafi.inputs import keep, parquet
from cafi.samples import draw_face, encode
from cafi.stages.read import read_objects
from cafi.storage import filesystem

from .faults import ServerIgnoringRange
from .peak_rss import PeakRSS
from .shardkit import parquet_bytes

JPEG = encode(draw_face(64, seed=3), "JPEG")


def _read(uris: list[str], *overrides) -> dict:
    cfg = load_config([], ["input.uri=/in", "output.uri=/out", *overrides])
    return read_objects({"uri": np.array(uris, dtype=object)}, cfg)


def test_an_object_named_with_a_double_colon_is_that_object_not_a_chained_url(tmp_path):
    """`/in/a::b.jpg` was opened by fsspec as the chained URL `a` read through `b.jpg`'s filesystem."""
    (tmp_path / "a").write_bytes(b"another object")
    (tmp_path / "a::b.jpg").write_bytes(JPEG)
    fs, path = filesystem(f"{tmp_path}/a::b.jpg")
    assert path.endswith("a::b.jpg") and fs.cat_file(path) == JPEG
    batch = _read([f"{tmp_path}/a::b.jpg"])
    assert batch["status"][0] == "ok" and batch["data"][0] == JPEG


@pytest.mark.parametrize("uri,words", [
    ("foo://b/x.jpg", "scheme 'foo' is not allowed"), ("sftp://host/x.jpg", "scheme 'sftp' is not allowed"),
    ("s3://bucket/x.jpg", "scheme 's3' is not allowed"), ("HTTP://host/x.jpg", "scheme 'http' is not allowed")])
def test_a_uri_of_another_scheme_than_the_input_is_an_error_row_and_never_read(tmp_path, uri, words):
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    batch = _read([uri, f"{tmp_path}/ok.jpg"])
    assert list(batch["status"]) == ["error", "ok"]
    assert words in batch["error"][0] and "input.schemes" in batch["error"][0] and batch["data"][0] == b""


@pytest.mark.parametrize("uri,words", [("foo://b/x.jpg", "Protocol not known"), ("sftp://host/x.jpg", "paramiko")])
def test_an_allowed_scheme_that_cannot_be_opened_is_an_error_row_not_a_failed_task(tmp_path, uri, words):
    """An unknown scheme (ValueError) or one whose package is missing (ImportError) failed the whole read task."""
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    batch = _read([uri, f"{tmp_path}/ok.jpg"], "input.schemes=[file,foo,sftp]")
    assert list(batch["status"]) == ["error", "ok"]
    assert batch["error"][0].startswith("cannot read object:") and words in batch["error"][0]


def test_input_schemes_is_checked_naming_the_key():
    from cafi.errors import ConfigError

    with pytest.raises(ConfigError, match="input.schemes"):
        load_config([], ["input.uri=/in", "output.uri=/out", "input.schemes=['s3://']"])
    with pytest.raises(ConfigError, match="input.schemes"):
        load_config([], ["input.uri=/in", "output.uri=/out", "input.schemes=[]"])


@pytest.fixture
def ignores_range(tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(24 << 20))
    (tmp_path / "small.jpg").write_bytes(JPEG)
    with ServerIgnoringRange(tmp_path) as url:
        yield url


def test_max_bytes_holds_when_the_server_ignores_range(ignores_range):
    """Before, an http(s) read pulled the whole 24 MiB body for a 1 MiB limit."""
    with PeakRSS() as memory:
        got = read_bytes([f"{ignores_range}/big.bin", f"{ignores_range}/small.jpg"], None, max_bytes=1 << 20)
    assert len(got[0]) == (1 << 20) + 1 and got[1] == JPEG
    assert memory.bytes < 12 << 20, f"{memory.bytes / 2**20:.1f} MiB held for a 1 MiB limit"


# ---------------------------------------------------------------- kept columns of any Arrow type

EXOTIC = {
    "time64": (pa.array([dt.time(1, 2, 3, 4), None], pa.time64("us")), ["01:02:03.000004", None]),
    "duration": (pa.array([dt.timedelta(seconds=5.5), None], pa.duration("ms")), ["5500", None]),
    "map": (pa.array([[("a", 1)], None], pa.map_(pa.string(), pa.int32())), ['[["a",1]]', None]),
    "null": (pa.nulls(2), [None, None]),
    "list_date": (pa.array([[dt.date(2020, 1, 2)], None], pa.list_(pa.date32())), ['["2020-01-02"]', None]),
    "struct_ts": (pa.array([{"t": dt.datetime(2020, 1, 1, 1)}, None], pa.struct([("t", pa.timestamp("us"))])),
                  ['{"t":"2020-01-01T01:00:00"}', None]),
    "list_binary": (pa.array([[b"\x00\xff"], None], pa.list_(pa.binary())), ['["AP8="]', None]),
    "struct_binary": (pa.array([{"b": b"\x01"}, None], pa.struct([("b", pa.binary())])), ['{"b":"AQ=="}', None]),
    "dictionary": (pa.array(["x", None]).dictionary_encode(), ["x", None]),
}
EXACT = [pa.array([{"a": 1, "s": "q"}, None], pa.struct([("a", pa.int8()), ("s", pa.string())])),
         pa.array([decimal.Decimal("1.23"), None], pa.decimal128(5, 2)), pa.array([0, None], pa.timestamp("ns", "UTC")),
         pa.array([[1.5, None]], pa.list_(pa.float32())), pa.array([1, None], pa.date32())]


def _through_a_parquet_shard(arr: pa.Array) -> pa.Array:
    """A kept column as a run stores it: its stored type, read from a Parquet shard, carried as text."""
    stored = keep.stored_type(arr.type)
    data = parquet_bytes(pa.table({"key": [str(i) for i in range(len(arr))], "jpg": [JPEG] * len(arr), "k": arr}))
    got = list(parquet.samples(data, "p.parquet", ImageConfig(), "jpg", "key", pa.schema([("k", stored)])))
    table = keep.append(pa.table({"uri": [s.uri for s in got]}),
                        {"k": keep.wire([s.kept["k"] for s in got])}, pa.schema([("k", stored)]))
    return table.column("k").combine_chunks()


@pytest.mark.parametrize("name", list(EXOTIC))
def test_a_kept_column_of_a_type_text_cannot_carry_is_stored_as_its_documented_text(name):
    """time64, duration, map, null, list<date32>, struct<timestamp> raised in decide (every block, every
    rerun); list<binary> and struct<binary> came back silently rewritten."""
    arr, text = EXOTIC[name]
    assert keep.stored_type(arr.type) == pa.string()
    assert _through_a_parquet_shard(arr).to_pylist() == text


@pytest.mark.parametrize("arr", EXACT, ids=lambda a: str(a.type))
def test_a_kept_column_of_a_type_text_carries_keeps_its_type_and_values(arr):
    assert keep.stored_type(arr.type) == arr.type
    assert _through_a_parquet_shard(arr).equals(arr)


# ---------------------------------------------------------------- Parquet row groups

def test_a_parquet_row_group_too_big_to_hold_gives_error_rows_and_the_others_are_read():
    """Before, a row group's image column was loaded whole (about twice its size) before any check."""
    table = pa.table({"key": ["a", "b", "c"], "jpg": [os.urandom(300_000), os.urandom(300_000), JPEG]})
    data = parquet_bytes(table, row_group_size=2)
    got = list(parquet.samples(data, "p.parquet", ImageConfig(), "jpg", "key", pa.schema([]),
                               max_group_bytes=512 * 1024))
    assert [s.key for s in got] == ["a", "b", "c"]
    assert all("row group 0 holds 1 MiB of images" in s.error and "not read" in s.error for s in got[:2])
    assert got[2].error is None and got[2].data == JPEG
