"""Shard inputs (input.format webdataset | parquet): the tar reader, samples and their error rows,
one GET per shard, kept columns, the per-shard index and resume; end to end on the loopback S3."""

import datetime
import io
import json
import os
import tarfile
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafi import manifest
from cafi.config import ImageConfig, JobConfig, load_config
from cafi.errors import ConfigError
from cafi.inputs import index, keep, parquet, tar, webdataset
from cafi.inputs.samples import read_samples
from cafi.inputs.shards import ShardSource, read_shard
from cafi.inputs.stream import BlockStream
from cafi.inputs.uris import split_sample_uri
from cafi.samples import draw_face, encode

from .shardkit import parquet_bytes, tar_bytes

JPEG = encode(draw_face(64, seed=1), "JPEG")
PNG = encode(draw_face(64, seed=2), "PNG")
EXTS = ["jpg", "jpeg", "png", "webp"]


class CountingFS:
    """A local filesystem that counts the ranged reads made through it (what a GET is on S3)."""

    def __init__(self):
        self.fs, self.gets = fsspec.filesystem("file"), 0

    def cat_file(self, path, start=None, end=None):
        self.gets += 1
        return self.fs.cat_file(path, start=start, end=end)


def _stream(data: bytes, tmp_path, block: int = 1 << 20, name: str = "s.tar") -> BlockStream:
    path = tmp_path / name
    path.write_bytes(data)
    return BlockStream(CountingFS(), str(path), block, budget_s=1)


def _samples(data: bytes, tmp_path, kept=(), block: int = 1 << 20):
    stream = _stream(data, tmp_path, block)
    return list(webdataset.samples(stream, "s3://b/s.tar", ImageConfig(), EXTS, list(kept))), stream


# ---------------------------------------------------------------- the tar reader

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_agrees_with_tarfile_on_names_offsets_and_bytes(tmp_path, fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "sub/dir"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        tf.addfile(_dir("folder"))
        for name, data in (("folder/a.jpg", JPEG), (f"{long_dir}/b.face.png", PNG), ("c.txt", b"x" * 700)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("folder/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    data = buf.getvalue()
    expected = [(m.name, m.offset_data, m.size) for m in tarfile.open(fileobj=io.BytesIO(data)) if m.isreg()]
    got = [m for m in tar.members(_stream(data, tmp_path, block=1000), lambda n, s: True)]
    assert [(m.name, m.offset, m.size) for m in got if m.regular] == expected
    for m in got:
        if m.regular:
            assert m.data == data[m.offset:m.offset + m.size]
    assert [m.name.rstrip("/") for m in got if not m.regular] == ["folder", "folder/link.jpg"]


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_our_tar_writer_is_read_by_tarfile_and_is_deterministic(tmp_path):
    def write():
        buf = io.BytesIO()
        w = tar.TarWriter(buf, mtime=1_700_000_000)
        offsets = [w.add("000000001.jpg", JPEG), w.add("x" * 150 + ".json", b"{}")]
        w.close()
        return buf.getvalue(), offsets

    data, offsets = write()
    assert write()[0] == data and len(data) % tar.RECORD == 0
    members = [m for m in tarfile.open(fileobj=io.BytesIO(data)) if m.isreg()]
    assert [m.name for m in members] == ["000000001.jpg", "x" * 150 + ".json"]
    assert [m.offset_data for m in members] == offsets
    assert data[offsets[0]:offsets[0] + len(JPEG)] == JPEG


# ---------------------------------------------------------------- samples and their rows

def test_members_are_grouped_by_key_and_every_sample_leaves_one_row(tmp_path):
    members = [
        ("a/s0.jpg", JPEG), ("a/s0.json", json.dumps({"identity": "ann", "frame": 3, "box": [1, 2]}).encode()),
        ("s1.face.png", PNG),                       # key s1, suffix face.png: not in the extensions
        ("s2.txt", b"no image here"),               # no image member
        ("s3.jpg", b""),                            # an empty member
        ("s4.jpg", b"plain text, not a picture"),   # not an image
        ("s5.jpg", JPEG), ("s5.jpg", JPEG),         # the same member twice in a row
        ("s6.png", PNG), ("s6.json", b"{not json"),
        ("README", b"a member without a suffix is not a sample"),
        ("s1.jpg", JPEG),                           # key s1 again, after other keys
    ]
    got, stream = _samples(tar_bytes(members), tmp_path, kept=["identity", "frame", "box", "absent"])
    rows = {s.uri.split("#", 1)[1]: s for s in got}
    assert list(rows) == ["a/s0", "s1", "s2", "s3", "s4", "s5", "s6", "s1#2"]
    assert all(s.uri.startswith("s3://b/s.tar#") for s in got)
    assert rows["a/s0"].error is None and rows["a/s0"].data == JPEG and rows["a/s0"].width == 64
    assert rows["a/s0"].kept == {"identity": "ann", "frame": "3", "box": "[1,2]", "absent": None}
    assert "no image member" in rows["s1"].error and ".face.png" in rows["s1"].error
    assert "no image member" in rows["s2"].error and ".txt" in rows["s2"].error
    assert rows["s3"].error == "empty file (0 bytes)"
    assert rows["s4"].error.startswith("not an image")
    assert "duplicate member" in rows["s5"].error
    assert rows["s6"].error is None and rows["s6"].bad_json and rows["s6"].kept == {}
    assert "duplicate key" in rows["s1#2"].error and rows["s1#2"].data == b""
    for s in got:  # the offsets address the image member's bytes in the shard
        if s.error is None:
            assert stream.fs.fs.cat_file(stream.path, start=s.offset, end=s.offset + s.size) == s.data
    assert stream.gets == 1


def _good_shard() -> tuple[bytes, list[tarfile.TarInfo]]:
    data = tar_bytes([("s0.jpg", JPEG), ("s0.json", b"{}"), ("s1.jpg", JPEG), ("s2.png", PNG)])
    infos = [m for m in tarfile.open(fileobj=io.BytesIO(data)) if m.isreg()]
    return data, infos


def test_a_tar_cut_inside_a_member_scores_the_samples_before_and_errors_the_cut_one(tmp_path):
    data, infos = _good_shard()
    s1 = next(m for m in infos if m.name == "s1.jpg")
    got, _ = _samples(data[:s1.offset_data + 100], tmp_path)
    assert [(s.uri.split("#")[-1], s.error is None) for s in got] == [("s0", True), ("s1", False)]
    assert "truncated" in got[1].error and "s1.jpg is cut off" in got[1].error


def test_a_tar_cut_between_members_or_inside_a_header_gives_a_row_for_the_shard(tmp_path):
    data, infos = _good_shard()
    s2 = next(m for m in infos if m.name == "s2.png")
    for cut, words in ((s2.offset, "without its end-of-archive block"), (s2.offset + 100, "inside a member header")):
        got, _ = _samples(data[:cut], tmp_path)
        assert [s.uri for s in got] == ["s3://b/s.tar#s0", "s3://b/s.tar#s1", "s3://b/s.tar"]
        assert got[0].error is None and got[1].error is None
        assert got[2].key is None and "truncated" in got[2].error and words in got[2].error


@pytest.mark.parametrize("content,words", [
    (b"", "empty shard"), (b"\x1f\x8b\x08" + bytes(600), "gzip-compressed"), (b"garbage" * 200, "not a tar archive")])
def test_a_shard_that_cannot_be_opened_gives_one_row_with_the_reason(tmp_path, content, words):
    got, _ = _samples(content, tmp_path)
    assert len(got) == 1 and got[0].uri == "s3://b/s.tar" and words in got[0].error


def test_a_corrupt_header_mid_shard_keeps_the_samples_before_it(tmp_path):
    data, infos = _good_shard()
    s2 = next(m for m in infos if m.name == "s2.png")
    broken = bytearray(data)
    broken[s2.offset + 10] ^= 0xFF
    got, _ = _samples(bytes(broken), tmp_path)
    assert [s.error is None for s in got] == [True, True, False] and "corrupt tar" in got[2].error


def test_one_get_per_shard_up_to_the_buffer_and_one_per_block_beyond(tmp_path):
    data, _ = _good_shard()
    assert _samples(data, tmp_path, block=len(data) + 1)[1].gets == 1
    got, stream = _samples(data, tmp_path, block=4096)
    # a block per 4 KiB (less the byte each later request repeats), up to the end-of-archive block
    assert 1 < stream.gets <= -(-len(data) // 4095) and [s.error for s in got] == [None, None, None]


# ---------------------------------------------------------------- parquet

def test_parquet_rows_keys_and_error_rows(tmp_path):
    table = pa.table({"key": ["k0", None, "k2", "k0", "k4"], "jpg": pa.array([JPEG, PNG, None, JPEG, b"text"]),
                      "identity": ["a", "b", None, "d", "e"], "frame": pa.array([1, 2, 3, 4, 2**60], pa.int64())})
    kept = pa.schema([("identity", pa.string()), ("frame", pa.int64())])
    got = list(parquet.samples(parquet_bytes(table), "s3://b/p.parquet", ImageConfig(), "jpg", "key", kept))
    assert [s.uri.split("#", 1)[1] for s in got] == ["k0", "row1", "k2", "k0#2", "k4"]
    assert [s.offset for s in got] == [0, 1, 2, 3, 4] and all(s.size is None for s in got)
    assert got[0].error is None and got[0].data == JPEG and got[0].kept == {"identity": "a", "frame": "1"}
    assert "key_column 'key' is null" in got[1].error
    assert "image_column 'jpg' is null" in got[2].error
    assert "duplicate key" in got[3].error
    assert got[4].error.startswith("not an image") and got[4].kept["frame"] == str(2**60)


def test_parquet_struct_image_column_and_row_index_keys(tmp_path):
    images = pa.array([{"bytes": JPEG, "path": "a.jpg"}, {"bytes": PNG, "path": "b.png"}])
    got = list(parquet.samples(parquet_bytes(pa.table({"image": images})), "p.parquet", ImageConfig(), "image", None,
                               pa.schema([])))
    assert [s.uri for s in got] == ["p.parquet#0", "p.parquet#1"] and [s.data for s in got] == [JPEG, PNG]


@pytest.mark.parametrize("content,words", [
    (b"not parquet at all", "not a readable Parquet file"), (None, "input.image_column 'jpg' is not a column")])
def test_a_parquet_file_that_cannot_give_samples_gives_one_row(content, words):
    content = content if content is not None else parquet_bytes(pa.table({"key": ["a"], "img": [JPEG]}))
    got = list(parquet.samples(content, "p.parquet", ImageConfig(), "jpg", "key", pa.schema([])))
    assert len(got) == 1 and got[0].uri == "p.parquet" and words in got[0].error


# ---------------------------------------------------------------- uris, kept values, ranged reads

def test_sample_uris_split_at_the_shard_name():
    assert split_sample_uri("s3://b/x/000001.tar#a/b#c") == ("s3://b/x/000001.tar", "a/b#c")
    assert split_sample_uri("gs://b/p.parquet#12") == ("gs://b/p.parquet", "12")
    assert split_sample_uri("s3://b/plain.jpg") is None
    assert split_sample_uri("s3://b/odd#name.jpg") is None


@pytest.mark.parametrize("shard,key", [
    ("s3://b/x.tar#y.tar", "k"), ("s3://b/x.tar", "y.tar#k"), ("s3://b/a%23b.tar", "k"), ("s3://b/a#b.tar", "k"),
    ("/in/100%.parquet", "3"), ("s3://b/x.tar#y.tar", "z.tar#k")])
def test_a_sample_uri_names_one_shard_and_key_whatever_the_names_hold(shard, key):
    """Before, `x.tar#y.tar` + `k` and `x.tar` + `y.tar#k` gave the same uri (and `a#b.tar` read as `a%23b.tar`)."""
    from cafi.inputs.uris import sample_uri

    assert split_sample_uri(sample_uri(shard, key)) == (shard, key)
    others = [("s3://b/x.tar#y.tar", "k"), ("s3://b/x.tar", "y.tar#k"), ("s3://b/a%23b.tar", "k"),
              ("s3://b/a#b.tar", "k"), ("s3://b/x.tar#y.tar", "z.tar#k"), ("s3://b/x.tar", "y.tar#z.tar#k")]
    assert sum(sample_uri(*o) == sample_uri(shard, key) for o in others) <= 1


@pytest.mark.parametrize("arr", [
    pa.array([1, None, 2**62], pa.int64()), pa.array([0.1, None, 1e300]), pa.array([True, None, False]),
    pa.array([0, None, 1_700_000_000_000_000], pa.timestamp("us")), pa.array(["x", None, ""]),
    pa.array([[1, 2], None, []], pa.list_(pa.int32())), pa.array([b"\x00\xff", None, b""])])
def test_kept_values_travel_as_text_and_come_back_exactly(arr):
    assert keep.unwire(keep.wire_arrow(arr), arr.type).equals(arr)


def test_read_samples_reads_tar_members_parquet_rows_and_files(tmp_path):
    data, infos = _good_shard()
    (tmp_path / "s.tar").write_bytes(data)
    (tmp_path / "p.parquet").write_bytes(parquet_bytes(pa.table({"key": ["a", "b", "c"], "jpg": [PNG, JPEG, PNG]}),
                                                       row_group_size=2))
    (tmp_path / "f.jpg").write_bytes(JPEG)
    s1 = next(m for m in infos if m.name == "s1.jpg")
    got = read_samples([f"{tmp_path}/s.tar#s1", f"{tmp_path}/p.parquet#c", f"{tmp_path}/f.jpg",
                        f"{tmp_path}/p.parquet#b", f"{tmp_path}/s.tar#s9"],
                       [s1.offset_data, 2, None, 1, 10**9], [s1.size, None, None, float("nan"), 10], None,
                       max_bytes=ImageConfig().max_bytes)
    assert got[:4] == [JPEG, PNG, JPEG, JPEG]
    assert isinstance(got[4], Exception)


# ---------------------------------------------------------------- the shard task, its index, planning

def _cfg(tmp_path, *extra) -> JobConfig:
    return load_config([], [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}",
                            "input.format=webdataset", "read.batch_size=2", *extra])


def test_a_shard_task_leaves_out_written_samples_and_indexes_them_all(tmp_path):
    (tmp_path / "in").mkdir()
    shard = str(tmp_path / "in" / "000000.tar")
    with open(shard, "wb") as fh:
        fh.write(tar_bytes([(f"s{i}.jpg", JPEG) for i in range(5)] + [("s5.jpg", b"bad")]))
    cfg = _cfg(tmp_path)
    written = np.sort(manifest.uri_keys([f"{shard}#s1", f"{shard}#s3"]))
    batches = list(read_shard(cfg, shard, "stamp", written, keep.string_schema([]), "run-a"))
    assert [len(b["uri"]) for b in batches] == [2, 2]  # blocks of read.batch_size rows
    uris = [u for b in batches for u in b["uri"]]
    assert uris == [f"{shard}#s{i}" for i in (0, 2, 4, 5)]
    assert batches[1]["status"].tolist() == ["ok", "error"] and batches[1]["data"][1] == b""
    assert all(b["shard_offset"][0] > 0 for b in batches)
    files = os.listdir(tmp_path / "out" / "runs" / "run-a" / "shards")
    assert files == [index.file_name(shard, "stamp", "webdataset/1")]
    table, meta = index.parse((tmp_path / "out" / "runs" / "run-a" / "shards" / files[0]).read_bytes())
    assert table.column("key").to_pylist() == [f"s{i}" for i in range(6)]
    assert meta["samples"] == 6 and meta["to_score"] == 4 and meta["already_written"] == 2 and meta["gets"] == 1


def test_planning_skips_unchanged_shards_whose_samples_are_written_and_reads_the_others(tmp_path):
    (tmp_path / "in").mkdir()
    for n in range(3):
        (tmp_path / "in" / f"{n:06d}.tar").write_bytes(tar_bytes([(f"s{i}.jpg", JPEG) for i in range(2)]))
    cfg = _cfg(tmp_path)
    first = ShardSource(cfg, "run-a")
    first.plan(np.array([], dtype="S16"))
    assert first.keys.size == 0 and first.unread == 3
    for s in first.shards[:2]:  # a crashed run got through two shards
        list(read_shard(cfg, s.uri, s.stamp, np.array([], dtype="S16"), keep.string_schema([]), "run-a"))
    done = np.sort(manifest.uri_keys([f"{first.shards[0].uri}#s0", f"{first.shards[0].uri}#s1",
                                      f"{first.shards[1].uri}#s0"]))
    (tmp_path / "in" / "000001.tar").write_bytes(tar_bytes([(f"s{i}.jpg", JPEG) for i in range(3)]))  # changed
    again = ShardSource(_cfg(tmp_path), "run-b")
    again.plan(done)
    known, todo = again.keys, again.todo
    assert again.unread == 2  # 000001 changed since its index, 000002 was never read
    assert [s.uri.rsplit("/", 1)[1] for s in again.to_read] == ["000001.tar", "000002.tar"]  # 000000: no GET
    assert sorted(known) == sorted(done[np.isin(done, manifest.uri_keys(
        [f"{first.shards[0].uri}#s0", f"{first.shards[0].uri}#s1"]))]) and len(todo) == 0


def test_settle_takes_over_the_read_outcome_of_rows_that_reuse_every_result():
    from cafi.stages.read import settle

    batch = {"uri": np.array(["a", "b", "c"], dtype=object), "status": np.array(["ok", "ok", "error"], dtype=object),
             "error": np.array(["", "", "cut off"], dtype=object), "width": np.array([64, 64, 0], np.int32),
             "height": np.array([64, 64, 0], np.int32), "data": np.array([JPEG, PNG, b""], dtype=object),
             "prev_needs_pixels": np.array([False, True, False]), "prev_width": np.array([60, 0, 10]),
             "prev_height": np.array([61, 0, 11]), "prev_status": np.array(["scored", "", "error"], dtype=object),
             "prev_error": np.array(["", "", "not an image"], dtype=object)}
    out = settle(batch)
    assert out["data"].tolist() == [b"", PNG, b""] and out["status"].tolist() == ["ok", "ok", "error"]
    assert out["error"].tolist() == ["", "", "not an image"] and out["width"].tolist() == [60, 64, 10]


def test_input_config_keys_are_checked_with_their_names():
    base = ["input.uri=/in", "output.uri=/out"]
    for overrides, key in ((["input.format=zip"], "input.format"), (["input.keep_columns=[uri]"], "input.keep_columns"),
                           (["input.keep_columns=[a,a]", "input.format=parquet"], "input.keep_columns"),
                           (["input.keep_columns=[a]"], "input.keep_columns"),
                           (["input.shard_buffer_mb=0"], "input.shard_buffer_mb"),
                           (["input.image_extensions=[]"], "input.image_extensions")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([], base + overrides)
    cfg = load_config([], base + ["input.format=parquet", "input.keep_columns=[identity]", "input.key_column=null"])
    assert cfg.input.key_column is None and cfg.input.keep_columns == ["identity"]


# ---------------------------------------------------------------- end to end (Ray, loopback S3)

class GetCounter:
    """Counts object GETs per path through the request-counting proxy (tests/faults.py, no faults)."""

    def __init__(self, proxy):
        self.gets: list[str] = []
        fault = proxy._fault

        def counted(method, path):
            if method == "GET" and "?" not in path:
                self.gets.append(path)
            return fault(method, path)

        proxy._fault = counted

    def under(self, prefix: str) -> list[str]:
        return [p for p in self.gets if p.startswith(prefix)]


COMPARED = ["status", "error", "width", "height", "det_score", "serfiq", "dbcnn", "mask_fraction", "decision",
            "reject_reason"]


def _by_key(rows: list[dict], files: bool = False) -> dict:
    from .shardkit import key_of

    return {(key_of(r["uri"]) if files else r["uri"].split("#", 1)[1]): r for r in rows}


def _same(a: dict, b: dict) -> None:
    for col in COMPARED:
        x, y = a[col], b[col]
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6, nan_ok=True), col
        else:
            assert x == y, (col, x, y)


@pytest.mark.slow  # three pipeline runs on the reduced models (about 3 minutes on the reference box)
def test_the_same_crops_as_files_webdataset_and_parquet_give_the_same_rows(s3, s3_endpoint, fast_config, ray_local,
                                                                            tmp_path, monkeypatch):
    from cafi import pipeline
    from cafi.samples import write_samples

    from .faults import FlakyProxy, check_exactly_once
    from .shardkit import key_of, meta_of, parquet_shards, webdataset_shards

    paths = sorted(write_samples(str(tmp_path / "in"), count=3, seed=17, unusual=False, broken=True))
    s3.mkdir("shards")
    for p in paths:
        s3.put(p, "shards/files/" + os.path.basename(p))
    for n, blob in enumerate(webdataset_shards(paths, per_shard=5)):
        s3.pipe(f"shards/wds/{n:06d}.tar", blob)
    good = webdataset_shards(paths[:3], per_shard=3)[0]
    cut = next(m for m in tarfile.open(fileobj=io.BytesIO(good)) if m.name.startswith(key_of(paths[1])))
    s3.pipe("shards/wds/bad-000.tar", good[:cut.offset_data + 10])  # cut inside the second sample's image
    s3.pipe("shards/wds/bad-001.tar", b"not a tar at all" * 64)
    s3.pipe("shards/wds/bad-002.tar", b"")  # S3 answers any range of an empty object with 416
    # Parquet kept columns of types text cannot carry (they failed every decide block, every rerun): a
    # time of day, binary in a list, and a column all null in the first shard (the null type) with
    # numbers in the second; and a row group too big to hold (image.max_bytes is no bound on it).
    pq_keys = []
    for n, blob in enumerate(parquet_shards(paths, per_shard=5)):
        table = pq.read_table(io.BytesIO(blob))
        rows = table.num_rows
        table = table.append_column("later", pa.nulls(rows) if n == 0 else pa.array([7] * rows, pa.int64()))
        table = table.append_column("clock", pa.array([datetime.time(1, 2, 3)] * rows, pa.time64("us")))
        table = table.append_column("tags", pa.array([[b"\x00\xff"]] * rows, pa.list_(pa.binary())))
        s3.pipe(f"shards/pq/{n:06d}.parquet", parquet_bytes(table))
        pq_keys += [(n, k) for k in table.column("key").to_pylist()]
    s3.pipe("shards/pq/big-group.parquet", parquet_bytes(pa.table({
        "key": ["x0", "x1"], "jpg": [os.urandom(400_000), os.urandom(400_000)], "identity": ["p", "q"],
        "frame": pa.array([1, 2], pa.int64()), "later": pa.array([1, 2], pa.int64()),
        "clock": pa.array([datetime.time(0)] * 2, pa.time64("us")),
        "tags": pa.array([[]] * 2, pa.list_(pa.binary()))})))

    def run(*overrides):
        return pipeline.run(load_config(fast_config, [*overrides]))

    listing = pa.table({"path": ["s3://shards/files/" + os.path.basename(p) for p in paths],
                        "identity": [meta_of(p)["identity"] for p in paths],
                        "frame": pa.array([meta_of(p)["frame"] for p in paths], pa.int64())})
    s3.pipe("shards/list.parquet", parquet_bytes(listing))
    run("input.manifest=s3://shards/list.parquet", "input.uri_column=path", "output.uri=s3://shards/out-files",
        "input.keep_columns=[identity,frame]")
    with FlakyProxy(s3_endpoint, every=10**9) as proxy, monkeypatch.context() as m:
        m.setattr(pipeline, "write_report", lambda *a, **k: None)  # count the job's reads, not the report's
        counter = GetCounter(proxy)
        wds = run("input.uri=s3://shards/wds/", "output.uri=s3://shards/out-wds", "input.format=webdataset",
                  "input.keep_columns=[identity,frame,box]", f"storage.endpoint_url={proxy.url}")
    pq_run = run("input.uri=s3://shards/pq/", "output.uri=s3://shards/out-pq", "input.format=parquet",
                 "input.keep_columns=[identity,frame,later,clock,tags]", "input.shard_buffer_mb=1")
    pq_all = check_exactly_once("s3://shards/out-pq", [f"s3://shards/pq/{n:06d}.parquet#{k}" for n, k in pq_keys]
                                + ["s3://shards/pq/big-group.parquet#x0", "s3://shards/pq/big-group.parquet#x1"])
    pq_all = {r["uri"]: r for r in manifest.read("s3://shards/out-pq").to_pylist()}  # with the kept columns
    for key in ("x0", "x1"):  # the row group is not read; its rows say why, with their kept values
        row = pq_all[f"s3://shards/pq/big-group.parquet#{key}"]
        assert row["status"] == "error" and "row group 0 holds 1 MiB of images" in row["error"], row["error"]
        assert row["later"] == str(int(key[1]) + 1) and row["clock"] == "00:00:00.000000"
    for n, key in pq_keys:
        row = pq_all[f"s3://shards/pq/{n:06d}.parquet#{key}"]
        assert row["later"] == (None if n == 0 else "7") and row["clock"] == "01:02:03.000000"
        assert row["tags"] == '["AP8="]'

    # one GET per shard (every shard here is smaller than input.shard_buffer_mb), none of the driver
    assert sorted(set(counter.under("/shards/wds/"))) == sorted(counter.under("/shards/wds/"))
    assert len(counter.under("/shards/wds/")) == 5 and wds["input"]["gets"] == 5

    files = _by_key(manifest.read("s3://shards/out-files").to_pylist(), files=True)
    wds_rows = manifest.read("s3://shards/out-wds").to_pylist()
    pq_rows = [r for r in manifest.read("s3://shards/out-pq").to_pylist() if "big-group" not in r["uri"]]
    by_shard = {}
    for r in wds_rows:
        by_shard.setdefault(r["uri"].split("#")[0].rsplit("/", 1)[1], []).append(r)
    assert {k: len(v) for k, v in by_shard.items()} == {"000000.tar": 5, "000001.tar": 4, "bad-000.tar": 2,
                                                        "bad-001.tar": 1, "bad-002.tar": 1}
    for name, rows in (("000000.tar", by_shard["000000.tar"] + by_shard["000001.tar"]), ("parquet", pq_rows)):
        got = _by_key(rows)
        assert sorted(got) == sorted(files), name
        for key, row in files.items():
            _same(row, got[key])
            assert got[key]["shard_offset"] is not None and got[key]["identity"] == f"person-{len(key) % 3}"
    for row in by_shard["000000.tar"]:  # tar members: offset and size address the image bytes
        key = row["uri"].split("#")[1]
        assert row["shard_size"] == os.path.getsize(next(p for p in paths if key_of(p) == key))
        assert row["frame"] == str(len(key))
        assert row["box"] == "[1,2]"
    assert all(r["shard_size"] is None and isinstance(r["frame"], int) for r in pq_rows)
    bad = {r["uri"].rsplit("/", 1)[1]: r for n in ("bad-000.tar", "bad-001.tar", "bad-002.tar") for r in by_shard[n]}
    first, second = (f"bad-000.tar#{key_of(p)}" for p in paths[:2])
    _same(bad[first], files[key_of(paths[0])])  # the sample before the cut is scored
    assert bad[second]["status"] == "error" and "is cut off" in bad[second]["error"]
    assert bad["bad-001.tar"]["status"] == "error" and "not a tar archive" in bad["bad-001.tar"]["error"]
    assert bad["bad-002.tar"]["status"] == "error" and "empty shard" in bad["bad-002.tar"]["error"]
    for summary, n in ((wds, len(paths) + 4), (pq_run, len(paths) + 2)):
        counts = summary["counts"]
        assert summary["inputs"] == counts["rows"] == counts["distinct_uris"] == n
        assert sum(counts["status"].values()) == n == counts["accepted"] + sum(counts["reject_reason"].values())
    assert wds["input"]["shard_errors"] == 2 and wds["input"]["shards"] == 5
    # the bytes of any row, by ranged reads (what the report's thumbnails do)
    sample = next(r for r in by_shard["000000.tar"] + by_shard["000001.tar"] if r["status"] == "scored")
    with FlakyProxy(s3_endpoint, every=10**9) as proxy:
        counter = GetCounter(proxy)
        storage = load_config([], ["input.uri=x", "output.uri=y", f"storage.endpoint_url={proxy.url}"]).storage
        got = read_samples([sample["uri"], pq_rows[0]["uri"], bad["bad-001.tar"]["uri"]],
                           [sample["shard_offset"], pq_rows[0]["shard_offset"], None],
                           [sample["shard_size"], None, None], storage, max_bytes=ImageConfig().max_bytes)
    assert got[0] == open(next(p for p in paths if key_of(p) == sample["uri"].split("#")[1]), "rb").read()
    assert got[1] == open(next(p for p in paths if key_of(p) == pq_rows[0]["uri"].split("#")[1]), "rb").read()
    assert isinstance(got[2], ValueError)  # a shard's own row: the shard is not downloaded for a thumbnail
    assert counter.under("/shards/wds/") == [sample["uri"].split("#")[0].replace("s3:/", "")]  # one ranged GET
    with FlakyProxy(s3_endpoint, every=10**9) as proxy:  # a re-run: every shard is known, nothing is read
        counter = GetCounter(proxy)
        again = run("input.uri=s3://shards/wds/", "output.uri=s3://shards/out-wds", "input.format=webdataset",
                    "input.keep_columns=[identity,frame,box]", f"storage.endpoint_url={proxy.url}")
    assert again.get("noop") and again["run_id"] == wds["run_id"] and counter.under("/shards/wds/") == []
    for out in ("s3://shards/out-pq", "s3://shards/out-files"):  # kept columns keep their Parquet types
        kept = manifest.dataset(out, kept=manifest.kept_columns(manifest.committed_runs(out))).schema
        assert kept.field("frame").type == pa.int64() and kept.field("identity").type == pa.string()
        if out.endswith("-pq"):  # a type text cannot carry is stored as its text form (cafi/inputs/keep.py)
            assert all(kept.field(c).type == pa.string() for c in ("later", "clock", "tags"))
    assert all(r["frame"] == len(k) and r["identity"] == f"person-{len(k) % 3}" for k, r in files.items())


@pytest.mark.slow  # a driver killed mid-run, then the resume (about 2 minutes)
def test_a_killed_driver_on_shard_input_is_resumed_and_every_sample_is_written_once(tmp_path, fast_config,
                                                                                    ray_local):
    from cafi import pipeline
    from cafi.samples import write_samples

    from .faults import kill_tree
    from .shardkit import key_of, webdataset_shards
    from .test_faults import SMALL_BLOCKS, _data_files, _exactly_once, _job

    paths = sorted(write_samples(str(tmp_path / "crops"), count=8, seed=43, unusual=False, broken=False))
    (tmp_path / "in").mkdir()
    shards = webdataset_shards(paths, per_shard=2)
    for n, blob in enumerate(shards):
        (tmp_path / "in" / f"{n:06d}.tar").write_bytes(blob)
    expected = [f"{tmp_path / 'in' / f'{i // 2:06d}.tar'}#{key_of(p)}" for i, p in enumerate(paths)]
    out = tmp_path / "out"
    args = [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", "input.format=webdataset", "ray.num_cpus=2",
            "ray.progress_bars=false", *SMALL_BLOCKS]
    proc = _job(fast_config, args, tmp_path)
    deadline = time.time() + 400
    while proc.poll() is None and not _data_files(out) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    crashed = os.listdir(out / "runs")
    assert len(crashed) == 1 and not (out / "runs" / crashed[0] / "_SUCCESS").exists()

    summary = pipeline.run(load_config(fast_config, args[:3]))
    assert summary["includes_runs"] == crashed
    assert summary["scored_now"] < len(paths) and summary["counts"]["rows"] == len(paths)
    assert summary["input"]["shards_read"] + summary["input"]["shards_skipped"] == len(shards)
    _exactly_once(out, expected)
    again = pipeline.run(load_config(fast_config, args[:3]))
    assert again.get("noop") and again["run_id"] == summary["run_id"]  # every shard known and written: no read
