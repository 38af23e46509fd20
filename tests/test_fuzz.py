"""Seeded, bounded fuzz of the read and decode code: mutated JPEG, PNG, WebP, WebDataset and Parquet
inputs (tests/fuzzkit.py) each leave one row per input -- ok or an error with its reason -- never an
exception, within a memory bound per case derived from image.max_pixels and image.max_bytes.

The fast tier runs a few hundred cases in-process, without Ray (the read task of files, the shard
task of shards, then the model actor's decode); the slow tier runs more seeds and one real pipeline
run over mutated images packed in shards plus a few mutated shards, checked exactly once.
"""

import os

import pyarrow as pa
import pytest

from . import fuzzkit
from .shardkit import parquet_bytes, tar_bytes

FAST = {"jpg": 50, "png": 50, "webp": 40, "tar": 35, "parquet": 35}  # 210 cases


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A folder for the cases and the job configs that read them (loaded once), warmed up."""
    tmp = str(tmp_path_factory.mktemp("fuzz"))
    cfgs = fuzzkit.configs(tmp)
    fuzzkit.warm_up(tmp, cfgs)
    return tmp, cfgs


def _fuzz(env, counts: dict, seed: int) -> int:
    tmp, cfgs = env
    n = 0
    for kind, count in counts.items():
        for case, blob in fuzzkit.corpus(kind, count, seed):
            outcome = fuzzkit.run_case(kind, case, blob, tmp, cfgs)
            fuzzkit.check(outcome, kind, os.path.join(tmp, case))
            n += 1
    return n


def test_the_corpus_is_seeded_and_mutates_every_kind():
    for kind in fuzzkit.KINDS:
        a, b = fuzzkit.corpus(kind, 10, seed=1), fuzzkit.corpus(kind, 10, seed=1)
        assert a == b and a != fuzzkit.corpus(kind, 10, seed=2)
        base = fuzzkit.bases()[kind]
        assert all(blob != base for _, blob in a), kind
        assert {case.rsplit("-", 1)[1] for case, _ in a} == set(fuzzkit.MUTATIONS)


def test_fuzzed_inputs_each_leave_one_row_within_the_memory_bound(env):
    assert _fuzz(env, FAST, seed=20) == sum(FAST.values())


def _repeated_keys(env, kind: str) -> list[dict]:
    tmp, cfgs = env
    images = fuzzkit.bases()
    path = os.path.join(tmp, f"dup.{kind}")
    if kind == "tar":
        blob = tar_bytes([("a.jpg", images["jpg"]), ("b.png", images["png"]), ("a.webp", images["webp"])])
    else:
        blob = parquet_bytes(pa.table({"key": ["a", "b", "a"], "jpg": [images["jpg"], images["png"], images["webp"]]}))
    with open(path, "wb") as fh:
        fh.write(blob)
    # read_shard_case asserts that the shard's index lists exactly the rows' uris
    rows = fuzzkit.read_shard_case(path, cfgs["webdataset" if kind == "tar" else "parquet"])
    assert sorted(r["uri"] for r in rows) == [f"{path}#a", f"{path}#a#2", f"{path}#b"]
    return rows


def test_a_repeated_tar_key_is_indexed_under_its_own_uri(env):
    """Found by this fuzz: the index listed a repeated key's sample as `key` (not `key#2`), so the run's
    input keys missed it and its row was outside the summary's counts."""
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in _repeated_keys(env, "tar")}
    assert rows["dup.tar#a#2"]["status"] == "error" and "duplicate key" in rows["dup.tar#a#2"]["error"]


def test_a_repeated_parquet_key_is_indexed_under_its_own_uri(env):
    _repeated_keys(env, "parquet")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22])
def test_more_fuzzed_inputs_each_leave_one_row(env, seed):
    counts = {k: 3 * v for k, v in FAST.items()}
    assert _fuzz(env, counts, seed=seed) == sum(counts.values())


@pytest.mark.slow
def test_a_run_over_fuzzed_images_and_shards_commits_every_input_once(tmp_path, fast_config, ray_local):
    """~50 mutated images as members of four shards, plus mutated tar shards: one real run, exactly once
    (the fast tier's few hundred cases run the same readers without Ray)."""
    from cafi import pipeline
    from cafi.config import load_config

    from .faults import check_exactly_once
    from .shardkit import tar_bytes

    (tmp_path / "in").mkdir()
    images = [(case, blob) for kind in fuzzkit.IMAGE_KINDS for case, blob in fuzzkit.corpus(kind, 16, seed=30)]
    expected = []
    for n in range(4):
        part = images[n::4]
        shard = str(tmp_path / "in" / f"images-{n}.tar")
        with open(shard, "wb") as fh:
            fh.write(tar_bytes([(f"{case}.{case.split('-')[0]}", blob) for case, blob in part]))
        expected += [f"{shard}#{case}" for case, _ in part]
    cfgs = fuzzkit.configs(str(tmp_path / "local"))  # the same reader, for the shards' expected rows
    for case, blob in fuzzkit.corpus("tar", 6, seed=31):
        shard = str(tmp_path / "in" / f"{case}.tar")
        with open(shard, "wb") as fh:
            fh.write(blob)
        # the samples (and the shard's own row) its reader gives, read here the same way
        expected += [r["uri"] for r in fuzzkit.read_shard_case(shard, cfgs["webdataset"])]
    out = str(tmp_path / "out")
    limits = [o for o in fuzzkit.OVERRIDES if not o.startswith("image.crop_size")]  # the run's own crop size
    summary = pipeline.run(load_config(fast_config, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}",
                                                     "input.format=webdataset", "input.keep_columns=[identity]",
                                                     *limits]))
    rows = check_exactly_once(out, expected)
    assert summary["inputs"] == len(expected) >= 50
    for row in rows.values():
        assert row["status"] in ("scored", "no_face", "error")
        assert (row["status"] == "error") == bool(row["error"]), row


def test_the_memory_measure_sees_an_allocation_of_a_case_bound_even_in_reused_heap():
    """The bound above is only as good as its measure: a case that allocates CASE_BYTES must show it, also
    when an earlier case freed that much (freed heap that stayed resident would hide it)."""
    import numpy as np

    from .peak_rss import PeakRSS

    for _ in range(2):
        with PeakRSS() as memory:
            block = np.ones(fuzzkit.CASE_BYTES, np.uint8)
            del block
        # (a page or two less is the kernel's accounting: other pages of the process were given back meanwhile)
        assert memory.bytes >= 0.95 * fuzzkit.CASE_BYTES, memory.bytes
    with PeakRSS() as idle:
        pass
    assert idle.bytes < fuzzkit.CASE_BYTES // 4, idle.bytes
