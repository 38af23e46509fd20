"""read_samples (the report's thumbnails, `cafi export`) never reads past image.max_bytes: whole objects,
tar members and Parquet row groups, on real local files; what it cannot read is that sample's error."""

import pyarrow as pa
import pytest

from cafi.config import ImageConfig
from cafi.inputs.samples import SKIP_REASONS, TooLarge, chunk_size, read_samples, skip_reason
from cafi.samples import encode, good_crops

from .shardkit import parquet_bytes, tar_bytes

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def crops() -> list[bytes]:
    """Real JPEGs under LIMIT, and one over it."""
    small = list(good_crops(3, seed=7).values())
    assert all(len(d) <= LIMIT for d in small), [len(d) for d in small]
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    big = encode(noise, "PNG")
    assert len(big) > LIMIT
    return [*small, big]


def _exactly_once(got: list, inputs: list[str], readable: dict[str, bytes]) -> None:
    """One answer per input, in order: the original bytes of every readable one, an exception otherwise."""
    assert len(got) == len(inputs)
    for uri, answer in zip(inputs, got, strict=True):
        if uri in readable:
            assert answer == readable[uri], uri
        else:
            assert isinstance(answer, Exception), uri
            assert skip_reason(answer) in SKIP_REASONS


def test_a_whole_object_over_max_bytes_is_refused_by_one_capped_read(tmp_path, crops):
    *small, big = crops
    paths = []
    for n, data in enumerate([small[0], big, small[1]]):
        (tmp_path / f"{n}.img").write_bytes(data)
        paths.append(str(tmp_path / f"{n}.img"))
    exact = tmp_path / "exact.img"  # exactly at the limit: read
    exact.write_bytes(small[2] + bytes(LIMIT - len(small[2])))
    paths.append(str(exact))
    got = read_samples(paths, [None] * 4, [None] * 4, None, max_bytes=LIMIT)
    assert isinstance(got[1], TooLarge) and f"image.max_bytes={LIMIT}" in str(got[1])
    assert skip_reason(got[1]) == "too_large"
    _exactly_once(got, paths, {paths[0]: small[0], paths[2]: small[1], paths[3]: exact.read_bytes()})


def test_a_tar_member_recorded_over_max_bytes_is_not_read(tmp_path, crops):
    import tarfile

    *small, big = crops
    blob = tar_bytes([("a.jpg", small[0]), ("b.png", big), ("c.jpg", small[1])])
    (tmp_path / "s.tar").write_bytes(blob)
    with tarfile.open(tmp_path / "s.tar") as tf:
        info = {m.name: m for m in tf}
    shard = str(tmp_path / "s.tar")
    uris = [f"{shard}#a", f"{shard}#b", f"{shard}#c", f"{shard}#x", shard]
    # x: a crafted manifest row claiming a 10 GiB member; shard: the shard's own (error) row
    offsets = [info["a.jpg"].offset_data, info["b.png"].offset_data, info["c.jpg"].offset_data, 0, None]
    sizes = [info["a.jpg"].size, info["b.png"].size, info["c.jpg"].size, 10 * 2**30, None]
    got = read_samples(uris, offsets, sizes, None, max_bytes=LIMIT)
    assert isinstance(got[1], TooLarge) and f"image.max_bytes={LIMIT}" in str(got[1]) and "not read" in str(got[1])
    assert isinstance(got[3], TooLarge) and str(10 * 2**30) in str(got[3])
    assert [skip_reason(g) for g in got[1:] if isinstance(g, Exception)] == ["too_large", "too_large", "shard_row"]
    with pytest.raises(TypeError):  # no default: every caller names its bound
        read_samples(uris, offsets, sizes, None)
    _exactly_once(got, uris, {uris[0]: small[0], uris[2]: small[1]})


def test_a_parquet_row_group_over_the_chunk_bound_and_a_cell_over_max_bytes_are_not_kept(tmp_path, crops):
    import pyarrow.parquet as pq

    *small, big = crops
    images = [small[1], small[2], big, small[0], small[1]]
    (tmp_path / "p.parquet").write_bytes(parquet_bytes(pa.table({"key": list("abcde"), "jpg": pa.array(
        images, pa.binary())}), row_group_size=1))
    path = str(tmp_path / "p.parquet")
    meta = pq.ParquetFile(path).metadata
    sizes = [chunk_size(meta.row_group(g), "jpg") for g in range(5)]
    bound = max(sizes[0], sizes[1], sizes[4]) + 1
    assert sizes[3] > bound and sizes[3] < LIMIT  # row 3: a chunk over the bound, its image under max_bytes
    uris = [f"{path}#{k}" for k in "abcde"]
    got = read_samples(uris, list(range(5)), [None] * 5, None, max_bytes=LIMIT, max_chunk_bytes=max(
        bound, sizes[2] + 1))  # row 2's chunk is read, but its cell is over max_bytes
    got3 = read_samples([uris[3]], [3], [None], None, max_bytes=LIMIT, max_chunk_bytes=bound)
    assert isinstance(got[2], TooLarge) and f"image.max_bytes={LIMIT}" in str(got[2])
    assert isinstance(got3[0], TooLarge) and f"{bound}-byte limit" in str(got3[0])
    assert skip_reason(got3[0]) == "too_large"
    _exactly_once(got, uris, {uris[i]: images[i] for i in (0, 1, 3, 4)})


def test_vanished_objects_and_rows_without_bytes_are_named_reasons(tmp_path, crops):
    (tmp_path / "p.parquet").write_bytes(parquet_bytes(pa.table({"key": ["a", "b"], "jpg": pa.array(
        [crops[0], None], pa.binary())})))
    uris = [str(tmp_path / "gone.jpg"), f"{tmp_path}/gone.tar#k", f"{tmp_path}/p.parquet#a", f"{tmp_path}/p.parquet#b"]
    got = read_samples(uris, [None, 0, 0, 1], [None, 10, None, None], None, max_bytes=LIMIT)
    assert [skip_reason(g) for g in got if isinstance(g, Exception)] == ["not_found", "not_found", "no_image"]
    _exactly_once(got, uris, {uris[2]: crops[0]})


def test_a_shard_sample_without_an_image_is_no_image_and_never_fetched_as_an_object(tmp_path, crops):
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("a.jpg", crops[0])]))
    (tmp_path / "s.tar#b").write_bytes(crops[1])  # an object named like the sample: must not be read for it
    uris = [f"{shard}#a", f"{shard}#b"]  # b: a sample without an image member (null offset and size)
    got = read_samples(uris, [512, None], [len(crops[0]), None], None, max_bytes=LIMIT, input_format="webdataset")
    assert skip_reason(got[1]) == "no_image"
    files = read_samples([uris[1]], [None], [None], None, max_bytes=LIMIT, input_format="files")
    assert files == [crops[1]]  # a files input: a '#' is part of the object's name
    _exactly_once(got, uris, {uris[0]: crops[0]})


def test_report_thumbnails_do_not_read_an_oversized_member(tmp_path, crops):
    from cafi.report import thumbnails

    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("a.jpg", crops[0])]))
    rows = [{"uri": f"{shard}#a", "shard_offset": 512, "shard_size": len(crops[0])},  # after its header
            {"uri": f"{shard}#z", "shard_offset": 0, "shard_size": 2**40}]  # a crafted 1 TiB member
    thumbs = thumbnails(rows, None, ImageConfig(max_bytes=LIMIT))
    assert isinstance(thumbs[rows[1]["uri"]], TooLarge)
    assert thumbs[rows[0]["uri"]].startswith("data:image/jpeg;base64,")  # the readable one, once
    assert len(thumbs) == 2


def test_a_uri_the_run_could_not_name_is_never_read(tmp_path):
    """`file:///etc/hostname` in an S3 manifest was an error row of the run, but export read it."""
    from cafi.inputs.samples import NotAllowed, skip_reason

    (tmp_path / "secret.txt").write_bytes(b"do not export")
    got = read_samples([f"file://{tmp_path}/secret.txt", "s3://b/s.tar#k"], [None, 0], [None, 10], None,
                       max_bytes=LIMIT, schemes=("s3",))
    assert isinstance(got[0], NotAllowed) and skip_reason(got[0]) == "not_allowed"
    assert "scheme 'file' is not allowed" in str(got[0])
    assert not isinstance(got[1], NotAllowed)  # an allowed one is read (and fails here: no such bucket)
