"""`cafi export`: a run's curated samples as shards -- original bytes, scores and kept columns;
deterministic; re-run after a crash; and valid input that scores to the same scores."""

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafi import export, manifest, pipeline
from cafi.config import ImageConfig, load_config
from cafi.errors import CafiError
from cafi.inputs import parquet
from cafi.samples import write_samples

from .shardkit import key_of, tar_bytes, webdataset_shards

pytestmark = pytest.mark.slow  # a scored run to export (and one scoring of the export)

MAX_BYTES = 128 * 1024  # the run's image.max_bytes: over every crop, under big.tar's member


@pytest.fixture(scope="module")
def scored(tmp_path_factory, fast_config, ray_local):
    """A committed run over two WebDataset shards (good and broken crops), with kept columns; and three
    hostile ones: bad.tar (not a tar: the shard's own error row), big.tar (a member one byte over
    image.max_bytes: a "file too large" row that records the member's size) and vanish.tar (a good
    crop, for a test to take away)."""
    tmp = tmp_path_factory.mktemp("export")
    paths = sorted(write_samples(str(tmp / "crops"), count=4, seed=23, unusual=False, broken=False))
    paths += sorted(write_samples(str(tmp / "broken"), count=0, unusual=False, broken=True))[:2]
    (tmp / "in").mkdir()
    for n, blob in enumerate(webdataset_shards(paths, per_shard=3)):
        (tmp / "in" / f"{n:06d}.tar").write_bytes(blob)
    (tmp / "in" / "bad.tar").write_bytes(b"not a tar archive\n" * 64)
    (tmp / "in" / "big.tar").write_bytes(tar_bytes([("big.png", b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES - 7))]))
    first = open(paths[0], "rb").read()
    (tmp / "in" / "vanish.tar").write_bytes(tar_bytes([("vanish.jpg", first)]))
    out = str(tmp / "out")
    summary = pipeline.run(load_config(fast_config, [f"input.uri={tmp / 'in'}", f"output.uri={out}",
                                                     "input.format=webdataset", "input.keep_columns=[identity]",
                                                     f"image.max_bytes={MAX_BYTES}"]))
    originals = {key_of(p): open(p, "rb").read() for p in paths}
    originals["vanish"] = first
    return tmp, out, summary, originals


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def test_export_writes_the_accepted_samples_bytes_and_rows_and_commits(scored):
    tmp, out, summary, originals = scored
    run = manifest.run_uri(out, summary["run_id"])
    dest = str(tmp / "curated")
    result = export.export(run, dest, samples_per_shard=2)
    accepted = sorted(r["uri"] for r in manifest.read(out).to_pylist() if r["decision"] == "accepted")
    assert accepted, "the reduced models accepted nothing: nothing to export"
    assert result["samples"] == len(accepted) and export.is_complete(dest)
    names = sorted(os.listdir(dest))
    shards = [n for n in names if n.endswith(".tar")]
    assert names == sorted([*shards, "_SUCCESS", "export.json"])
    assert shards == [f"{i:06d}.tar" for i in range(len(shards))] and len(shards) == -(-len(accepted) // 2)
    with open(os.path.join(dest, "export.json")) as fh:
        on_disk = json.load(fh)
    assert [s["samples"] for s in on_disk["shards"]] == [s["samples"] for s in result["shards"]]
    assert sum(s["bytes"] for s in on_disk["shards"]) == on_disk["bytes"] == sum(
        os.path.getsize(os.path.join(dest, n)) for n in shards)
    rows = {r["uri"]: r for r in manifest.read(out).to_pylist()}
    seen = []
    for name in shards:
        members = _members(os.path.join(dest, name))
        for member, data in members.items():
            if not member.endswith(".json"):
                continue
            doc = json.loads(data)
            key = member[:-5]
            image = next(v for k, v in members.items() if k.startswith(key + ".") and not k.endswith(".json"))
            source = rows[doc["source_uri"]]
            assert image == originals[doc["source_uri"].split("#")[1]]  # the original bytes, untouched
            assert doc["dbcnn"] == pytest.approx(source["dbcnn"]) and doc["decision"] == "accepted"
            assert doc["identity"] == source["identity"] and doc["key"] == key
            seen.append(doc["source_uri"])
    assert seen == accepted  # sorted by uri, each once


def test_the_same_run_exports_the_same_bytes_and_a_crashed_export_reruns_cleanly(scored):
    tmp, out, summary, _ = scored
    run = manifest.run_uri(out, summary["run_id"])
    a, b = str(tmp / "a"), str(tmp / "b")
    export.export(run, a, decision="all", samples_per_shard=2)
    # what a crash leaves: no marker, a torn shard, and a shard of an earlier, larger export
    os.makedirs(b)
    for name, data in (("_STARTED", b""), ("000000.tar", b"torn"), ("000009.tar", b"old")):
        with open(os.path.join(b, name), "wb") as fh:
            fh.write(data)
    export.export(run, b, decision="all", samples_per_shard=2)
    shards = sorted(n for n in os.listdir(a) if n.endswith(".tar"))
    assert sorted(n for n in os.listdir(b) if n.endswith(".tar")) == shards and export.is_complete(b)
    assert "_STARTED" not in os.listdir(b)
    for name in shards:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    other = tmp / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CafiError, match="holds other files"):
        export.export(run, str(other))


def test_parquet_export_is_valid_parquet_input(scored):
    tmp, out, summary, originals = scored
    dest = str(tmp / "pq")
    export.export(manifest.run_uri(out, summary["run_id"]), dest, fmt="parquet", samples_per_shard=3)
    table = pa.concat_tables([pq.read_table(os.path.join(dest, n)) for n in sorted(os.listdir(dest))
                              if n.endswith(".parquet")])
    assert table.column_names[:3] == ["key", "jpg", "source_uri"] and "identity" in table.column_names
    for row in table.to_pylist():
        assert row["jpg"] == originals[row["source_uri"].split("#")[1]] and row["decision"] == "accepted"
    first = open(os.path.join(dest, "000000.parquet"), "rb").read()
    samples = list(parquet.samples(first, "x.parquet", ImageConfig(), "jpg", "key", pa.schema([])))
    assert [s.error for s in samples] == [None] * len(samples) and samples[0].uri == "x.parquet#000000000"


def test_cli_export_then_scoring_the_export_gives_the_same_scores(scored, fast_config, capsys):
    from cafi.cli import main

    tmp, out, summary, _ = scored
    dest = str(tmp / "cli")
    assert main(["export", manifest.run_uri(out, summary["run_id"]), "--to", dest, "--samples-per-shard", "2"]) == 0
    assert "exported" in capsys.readouterr().out
    again = str(tmp / "rescored")
    pipeline.run(load_config(fast_config, [f"input.uri={dest}", f"output.uri={again}", "input.format=webdataset",
                                           "input.keep_columns=[source_uri,identity]"]))
    before = {r["uri"]: r for r in manifest.read(out).to_pylist()}
    after = manifest.read(again).to_pylist()
    assert len(after) == sum(r["decision"] == "accepted" for r in before.values())
    for row in after:
        src = before[row["source_uri"]]
        assert row["identity"] == src["identity"]
        for col in ("status", "width", "height", "decision", "reject_reason"):
            assert row[col] == src[col], col
        for col in ("det_score", "serfiq", "dbcnn", "mask_fraction", "cafi"):
            assert row[col] == pytest.approx(src[col], rel=1e-5, abs=1e-6), col


def test_export_refuses_bad_arguments(scored):
    tmp, out, _, _ = scored
    with pytest.raises(CafiError, match="--format"):
        export.export(out, str(tmp / "x"), fmt="zip")
    with pytest.raises(CafiError, match="--samples-per-shard"):
        export.export(out, str(tmp / "x"), samples_per_shard=0)



def _exported(dest: str) -> list[tuple[str, bytes]]:
    """(source_uri, image bytes) of every sample of an export's WebDataset shards, read by cafi's own
    shard reader (the shards are valid input: no shard error row)."""
    import fsspec

    from cafi.inputs import webdataset
    from cafi.inputs.stream import BlockStream

    got = []
    for name in sorted(n for n in os.listdir(dest) if n.endswith(".tar")):
        path = os.path.join(dest, name)
        stream = BlockStream(fsspec.filesystem("file"), path, 1 << 20, budget_s=1)
        samples = list(webdataset.samples(stream, path, ImageConfig(min_side=1), ["png", "jpg", "bin"], ["source_uri"]))
        assert all(s.key is not None for s in samples), [s.error for s in samples if s.key is None]
        members = _members(path)
        for s in samples:
            image = next(v for k, v in members.items() if k.startswith(s.key + ".") and not k.endswith(".json"))
            got.append((s.kept["source_uri"], image))
    return got


def test_export_of_all_rows_writes_what_it_can_and_counts_what_it_cannot(scored, capsys):
    """A shard's own error row, a vanished shard and an oversized member are skipped and counted per
    reason (export.json, the CLI's output); every other row is exported once, as valid input."""
    from cafi.cli import main

    from .faults import check_exactly_once

    tmp, out, summary, originals = scored
    rows = manifest.read(out).to_pylist()
    by_uri = check_exactly_once(out, [r["uri"] for r in rows])
    bad, big = by_uri[str(tmp / "in" / "bad.tar")], by_uri[f"{tmp / 'in' / 'big.tar'}#big"]
    assert "not a tar archive" in bad["error"] and bad["shard_size"] is None
    assert "file too large" in big["error"] and big["shard_size"] == MAX_BYTES + 1  # recorded, never read again
    vanish = tmp / "in" / "vanish.tar"
    dest = str(tmp / "all")
    os.rename(vanish, tmp / "vanished")  # gone since the run
    try:
        assert main(["export", manifest.run_uri(out, summary["run_id"]), "--to", dest, "--decision", "all",
                     "--samples-per-shard", "2"]) == 0
    finally:
        os.rename(tmp / "vanished", vanish)
    printed = capsys.readouterr().out
    assert "skipped 3 sample(s) that could not be read (not_found: 1, shard_row: 1, too_large: 1)" in printed
    with open(os.path.join(dest, "export.json")) as fh:
        doc = json.load(fh)
    assert doc["skipped"] == {"not_found": 1, "shard_row": 1, "too_large": 1} and export.is_complete(dest)
    assert doc["selected"] == len(rows) and doc["samples"] == len(rows) - 3
    assert sum(s["samples"] for s in doc["shards"]) == doc["samples"]
    assert any(s["samples"] == 0 for s in doc["shards"])  # bad.tar and big.tar#big: a shard of neither, written
    got = _exported(dest)
    skipped = {bad["uri"], big["uri"], f"{vanish}#vanish"}
    assert [u for u, _ in got] == sorted(set(by_uri) - skipped)  # every readable row once, in uri order
    for uri, image in got:
        assert image == originals[uri.split("#")[1]]
    pq_dest = str(tmp / "rejected-pq")  # Parquet, the rejected rows (the error rows among them), vanish.tar back
    result = export.export(manifest.run_uri(out, summary["run_id"]), pq_dest, decision="rejected", fmt="parquet",
                           samples_per_shard=2)
    assert result["skipped"] == {"shard_row": 1, "too_large": 1}
    table = pa.concat_tables([pq.read_table(os.path.join(pq_dest, n)) for n in sorted(os.listdir(pq_dest))
                              if n.endswith(".parquet")])
    rejected = sorted(u for u, r in by_uri.items() if r["decision"] == "rejected")
    assert table.column("source_uri").to_pylist() == sorted(set(rejected) - {bad["uri"], big["uri"]})
    for n in sorted(os.listdir(pq_dest)):
        if n.endswith(".parquet"):
            content = open(os.path.join(pq_dest, n), "rb").read()
            read = list(parquet.samples(content, n, ImageConfig(), "jpg", "key", pa.schema([])))
            assert all(s.key is not None for s in read)  # valid input: no file-level error row
