"""Hostile shards (issue 20): repeated keys cost linear work; a sidecar or header fault never loses the
samples around it nor blames storage; extended tar headers are read only up to a bound. All without
Ray: the readers on in-memory tar and Parquet bytes, and the shard task (read_shard) on a local file."""

from __future__ import annotations

import io
import os
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from cafi import keys as K
from cafi.config import ImageConfig, load_config
from cafi.inputs import index, keep, parquet, shards, webdataset
from cafi.inputs.shards import read_shard
from cafi.inputs.stream import BlockStream
from cafi.samples import draw_face, encode

from .shardkit import parquet_bytes, tar_bytes

JPEG = encode(draw_face(64, seed=1), "JPEG")
EXTS = ["jpg", "png"]
SHARD = "s3://b/s.tar"


def _stream(data: bytes, tmp_path, block: int = 1 << 20, fs=None) -> BlockStream:
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    return BlockStream(fs or fsspec.filesystem("file"), str(path), block, budget_s=1)


def _samples(data: bytes, tmp_path, kept=(), block: int = 1 << 20):
    stream = _stream(data, tmp_path, block)
    return list(webdataset.samples(stream, SHARD, ImageConfig(), EXTS, list(kept))), stream


def _tail(uris) -> list[str]:
    return [u.split("#", 1)[1] if "#" in u else u for u in uris]


# ---------------------------------------------------------------- 1. repeated keys: linear

class _TooManyProbes(BaseException):  # not an Exception: no reader's guard turns it into a row
    pass


class _ProbeCountingSet(set):
    """A set that counts membership probes and stops the test once they exceed `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.probes, self.limit = 0, limit

    def __contains__(self, item) -> bool:
        self.probes += 1
        if self.probes > self.limit:
            raise _TooManyProbes(f"{self.probes} membership probes")
        return super().__contains__(item)


def _naive_names(keys: list[str]) -> list[str]:
    """The names the quadratic loop gave: the smallest `#n` (n >= 2) not taken yet."""
    seen, out = set(), []
    for k in keys:
        name, n = k, 2
        while name in seen:
            name, n = f"{k}#{n}", n + 1
        seen.add(name)
        out.append(name)
    return out


def test_a_key_on_20000_parquet_rows_gets_its_uris_in_linear_probes(monkeypatch):
    n = 20_000
    sets: list[_ProbeCountingSet] = []

    class CountingKeys(webdataset.Keys):
        def __init__(self, shard: str):
            super().__init__(shard)
            self.seen = _ProbeCountingSet(limit=3 * n)  # the quadratic loop passes it after ~350 repeats
            sets.append(self.seen)

    monkeypatch.setattr(parquet, "Keys", CountingKeys)
    data = parquet_bytes(pa.table({"key": ["k"] * n, "jpg": pa.array([None] * n, pa.binary())}), row_group_size=4096)
    got = list(parquet.samples(data, "p.parquet", ImageConfig(), "jpg", "key", pa.schema([])))
    assert [s.uri for s in got] == ["p.parquet#k"] + [f"p.parquet#k#{i}" for i in range(2, n + 1)]
    assert "image_column 'jpg' is null" in got[0].error
    assert all("duplicate key" in s.error and f"occurrence {i}" in s.error for i, s in enumerate(got[1:], 2))
    assert sets[0].probes <= 2 * n


def test_repeated_keys_get_the_same_names_as_before_even_beside_keys_named_like_them():
    keys = ["a", "a#3", "a", "a", "a", "a#2", "b", "a", "a#2", "a#2", "b#2", "b", "b", "a"]
    rng = np.random.default_rng(7)
    keys += [str(rng.choice(["c", "c#2", "c#4", "c#2#2", "d", "d#3"])) for _ in range(400)]
    k = webdataset.Keys("s")
    got = [k.uri(key) for key in keys]
    assert [u for u, _ in got] == [f"s#{name}" for name in _naive_names(keys)]
    assert [dup is None for _, dup in got] == [name == key for name, key in zip(_naive_names(keys), keys, strict=True)]


# ---------------------------------------------------------------- 2. a sidecar is its sample's fault

def test_a_json_sidecar_nested_too_deep_is_bad_json_of_its_sample_and_the_shard_goes_on(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    members = [("a.jpg", JPEG), ("a.json", b'{"identity": "ann"}'), ("b.jpg", JPEG), ("b.json", deep),
               ("c.jpg", JPEG), ("c.json", b'{"identity": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
               ("d.jpg", JPEG), ("d.json", b'{"identity": "dee"}')]
    got, _ = _samples(tar_bytes(members), tmp_path, kept=["identity"])
    assert _tail(s.uri for s in got) == ["a", "b", "c", "d"]
    assert [s.error for s in got] == [None] * 4 and all(s.data == JPEG for s in got)
    assert [s.bad_json for s in got] == [False, True, True, False]
    assert [s.kept for s in got] == [{"identity": "ann"}, {}, {}, {"identity": "dee"}]


# ---------------------------------------------------------------- 2. a corrupt header ends the shard, not the samples

def _block_header(name: bytes, size_field: bytes, kind: bytes) -> bytes:
    """A ustar header with the size field as given (any bytes) and a valid checksum."""
    head = bytearray(512)
    head[0:len(name)] = name
    head[100:108] = b"0000644\0"
    head[124:136] = size_field.ljust(12, b"\0")[:12]
    head[136:148] = b"00000000000\0"
    head[156:157] = kind
    head[257:263] = b"ustar\0"
    head[263:265] = b"00"
    head[148:156] = b" " * 8
    head[148:156] = f"{sum(head):06o}".encode() + b"\0 "
    return bytes(head)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _pax_member(records: bytes, name: str = "c.jpg", data: bytes = JPEG) -> bytes:
    """A pax header with the records given (unchecked), then a regular member."""
    return (_block_header(b"././@PaxHeader", f"{len(records):011o}".encode(), b"x") + _pad(records)
            + _block_header(name.encode(), f"{len(data):011o}".encode(), b"0") + _pad(data))


def _without_end(data: bytes) -> bytes:
    """A tar's members without its end-of-archive blocks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.getmembers()
        return data[:tf.offset]


def _two_then(tail: bytes) -> tuple[bytes, int]:
    """Two good samples (a, b), then `tail`, then what follows it (d) and the end blocks; and where
    `tail` starts."""
    head = _without_end(tar_bytes([("a.jpg", JPEG), ("b.jpg", JPEG)]))
    after = _block_header(b"d.jpg", f"{len(JPEG):011o}".encode(), b"0") + _pad(JPEG) + bytes(1024)
    return head + tail + after, len(head)


HEADER_FAULTS = {
    "pax size not a number": (lambda: _pax_member(b"12 size=abc\n"), "bad pax size 'abc'"),
    "negative pax size": (lambda: _pax_member(b"11 size=-5\n"), "bad pax size '-5'"),
    "pax record length not a number": (lambda: _pax_member(b"1x path=c.jpg\n"), "bad pax record length '1x "),
    "pax record length past the body": (lambda: _pax_member(b"99 path=c.jpg\n"), "bad pax record length '99 "),
    "pax record without newline": (lambda: _pax_member(b"14 path=c.jpgX"), "bad pax record"),
    "size field not octal": (lambda: _block_header(b"c.jpg", b"zz", b"0") + _pad(JPEG), "bad size field 'zz"),
    "negative size field": (lambda: _block_header(b"c.jpg", b"\xc0" + bytes(10) + b"\x05", b"0") + _pad(JPEG),
                            "negative size field"),
}


@pytest.mark.parametrize("fault", list(HEADER_FAULTS))
def test_a_corrupt_header_keeps_the_samples_before_it_and_says_why_and_how_many(tmp_path, fault):
    make, words = HEADER_FAULTS[fault]
    data, at = _two_then(make())
    got, _ = _samples(data, tmp_path)
    assert [s.uri for s in got] == [f"{SHARD}#a", f"{SHARD}#b", SHARD]
    assert got[0].error is None and got[1].error is None and got[1].data == JPEG
    row = got[2]
    assert row.key is None and row.error.startswith(f"corrupt tar header at byte {at}: ")
    assert words in row.error and row.error.endswith("(2 samples read before it)")


def test_a_bad_pax_size_in_the_shard_task_keeps_the_samples_before_and_is_counted_as_a_shard_error(tmp_path):
    (tmp_path / "in").mkdir()
    shard = str(tmp_path / "in" / "000000.tar")
    good = tar_bytes([("a.jpg", JPEG), ("a.json", b'{"identity": "ann"}'), ("b.jpg", JPEG),
                      ("b.json", b"[" * 100_000)])
    with open(shard, "wb") as fh:  # b (its .json unparsable) is still open when the bad header comes
        fh.write(_without_end(good) + _pax_member(b"12 size=abc\n") + bytes(1024))
    cfg = load_config([], [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}",
                           "input.format=webdataset", "input.keep_columns=[identity]"])
    batches = list(read_shard(cfg, shard, "stamp", K.EMPTY, keep.string_schema(["identity"]),
                              "run-a"))
    rows = {u: (st, e) for b in batches for u, st, e in zip(b["uri"], b["status"], b["error"], strict=True)}
    assert list(rows) == [f"{shard}#a", f"{shard}#b", shard]
    assert rows[f"{shard}#a"][0] == rows[f"{shard}#b"][0] == "ok"
    assert rows[shard][0] == "error" and "bad pax size 'abc'" in rows[shard][1]
    assert not rows[shard][1].startswith("cannot read object") and "2 samples read before it" in rows[shard][1]
    folder = tmp_path / "out" / "runs" / "run-a" / "shards"
    table, meta = index.parse((folder / os.listdir(folder)[0]).read_bytes())
    assert table.column("key").to_pylist() == ["a", "b", None]
    assert meta["samples"] == 3 and meta["shard_errors"] == 1 and meta["bad_json"] == 1 and meta["to_score"] == 3
    assert "bad pax size" in meta["shard_error"]


class _FailingFS:
    """A local filesystem whose reads past the first `good` GETs fail for good."""

    def __init__(self, good: int):
        self.fs, self.good = fsspec.filesystem("file"), good

    def cat_file(self, path, start=None, end=None):
        self.good -= 1
        if self.good < 0:
            raise PermissionError("access denied")
        return self.fs.cat_file(path, start=start, end=end)


def test_storage_failing_mid_shard_is_cannot_read_object_with_the_samples_read_before_it(tmp_path):
    data = tar_bytes([(f"s{i}.jpg", JPEG) for i in range(4)])
    first = 2 * (512 + len(_pad(JPEG))) + 512 + 100  # s0, s1 and the header of s2: s0 is complete, s1 open
    stream = _stream(data, tmp_path, block=first, fs=_FailingFS(good=1))
    got = list(shards._guarded(webdataset.samples(stream, SHARD, ImageConfig(), EXTS, []), stream, SHARD))
    assert [s.uri for s in got] == [f"{SHARD}#s0", SHARD] and got[0].error is None
    assert got[1].error.startswith("cannot read object: PermissionError: access denied (at byte ")
    assert "1 sample read before it; samples from there on are missing" in got[1].error


def test_parquet_storage_failing_mid_file_is_cannot_read_object_and_corrupt_bytes_are_not():
    n = 40
    data = parquet_bytes(pa.table({"key": [f"k{i}" for i in range(n)], "jpg": pa.array([os.urandom(300)] * n)}),
                         row_group_size=10)
    chunk = parquet.pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0).column(0)
    first = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)

    class Dropping(io.BytesIO):  # the footer is read, then the connection drops (past the retries)
        reads = 0

        def read(self, *args):
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("connection reset by peer")
            return super().read(*args)

    got = list(parquet.samples(Dropping(data), "p.parquet", ImageConfig(), "jpg", "key", pa.schema([])))
    assert [(s.uri, s.error) for s in got] == [("p.parquet", "cannot read object: ConnectionResetError: connection "
                                                "reset by peer (past row 0; rows from there on are missing)")]
    broken = bytearray(data)
    broken[first:first + 24] = b"\xff" * 24  # the first page header: not thrift (pyarrow: OSError as well)
    for source in (bytes(broken), io.BytesIO(bytes(broken))):
        got = list(parquet.samples(source, "p.parquet", ImageConfig(), "jpg", "key", pa.schema([])))
        assert len(got) == 1 and got[0].error.startswith("cannot read the Parquet file past row 0: OSError")


# ---------------------------------------------------------------- 3. extended headers: bounded reads

def _with_extended(size: int, fmt: int) -> bytes:
    """a, b, then c whose pax (comment) or GNU long-name header body is about `size` bytes, then d."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
            info = tarfile.TarInfo(name if name != "c.jpg" or fmt == tarfile.PAX_FORMAT else "c" * size + ".jpg")
            if name == "c.jpg" and fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "x" * size}
            info.size = len(JPEG)
            tf.addfile(info, io.BytesIO(JPEG))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu-long-name"])
def test_an_extended_header_over_the_limit_is_a_corrupt_header_and_nothing_past_it_is_read(tmp_path, fmt):
    block = 64 * 1024
    got, stream = _samples(_with_extended(2 * 2**20, fmt), tmp_path, block=block)
    assert _tail(s.uri for s in got) == ["a", "b", SHARD] and got[0].error is None and got[1].error is None
    at = 2 * (512 + len(_pad(JPEG)))
    assert got[2].error.startswith(f"corrupt tar header at byte {at}: an extended header (type ")
    assert "over the 1048576-byte limit" in got[2].error and got[2].error.endswith("(2 samples read before it)")
    assert stream.bytes <= at + 512 + block  # the header's body was never fetched

    got, _ = _samples(_with_extended(200_000, fmt), tmp_path, block=block)  # a big one within the limit is read
    assert [s.error for s in got] == [None] * 4 and len(got) == 4
