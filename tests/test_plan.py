"""Planning a run: the input keys reach the driver as 16-byte keys, duplicates are found, the
to-do set leaves out what is written, and block sizes follow whether any model runs."""

import numpy as np
import pyarrow as pa

from cafi import keys as K
from cafi import manifest, ray_setup


def test_input_keys_are_sorted_unique_and_name_the_duplicates(ray_local):
    import ray.data

    uris = [f"s3://b/crops/{i:04d}.jpg" for i in range(300)] + ["s3://b/crops/0007.jpg"] * 2 + [
        "s3://b/crops/0100.jpg", "s3://b/a#b ?c%d+e/얼굴.jpg"]
    ds = ray.data.from_arrow([pa.table({"uri": uris[i:i + 64]}) for i in range(0, len(uris), 64)])
    found = K.input_keys(ds)

    assert found.listed == len(uris) == 304
    assert len(found.keys) == 301
    assert np.array_equal(found.keys, np.unique(manifest.uri_keys(uris)))  # sorted, unique, the same hash
    assert set(found.duplicated) == set(manifest.uri_keys(["s3://b/crops/0007.jpg", "s3://b/crops/0100.jpg"]))


def test_input_keys_of_an_empty_input(ray_local):
    import ray.data

    found = K.input_keys(ray.data.from_arrow([pa.table({"uri": pa.array([], pa.string())})]))
    assert found.listed == 0 and len(found.keys) == 0 and len(found.duplicated) == 0


def test_not_done_leaves_out_written_keys():
    keys = np.unique(manifest.uri_keys([f"u{i}" for i in range(100)]))
    done = np.unique(manifest.uri_keys([f"u{i}" for i in range(0, 100, 3)] + ["elsewhere"]))
    left = K.not_done(keys, done)
    assert len(left) == 100 - 34
    assert not np.isin(left, done).any() and np.isin(left, keys).all()
    assert K.not_done(keys, np.array([], dtype="S16")) is keys  # nothing written: no copy


def test_blocks_are_small_with_models_and_big_without():
    assert ray_setup.rows_per_block(1_000_000, 8) == 512
    assert ray_setup.rows_per_block(100, 8) == 8
    assert ray_setup.rows_per_block(1_000_000, 8, models_run=False) == ray_setup.BIG_BLOCK_ROWS
    assert ray_setup.rows_per_block(80_000, 8, models_run=False) == 10_000  # still 8 blocks to share out
