"""The scoring job end to end on a real local Ray: local files, moto S3 on loopback, manifests."""

import json
import os

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.errors import StorageError, WeightsError
from cafi.samples import broken_inputs, hostile_images, unusual_inputs, write_samples

pytestmark = pytest.mark.slow  # end-to-end runs of the job

GOOD = 4
BROKEN_REASONS = {
    "truncated.jpg": "cannot decode image",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "corrupt.jpg": "cannot decode image",
    "tiny.png": "image too small",
    "bomb.png": "image too large",
}


def _cfg(fast_config, *overrides):
    return load_config(fast_config, list(overrides))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, fast_config, ray_local):
    """Good, unusual, broken and hostile crops, scored once for the module's tests, with its report."""
    tmp = tmp_path_factory.mktemp("local")
    paths = write_samples(str(tmp / "in"), count=GOOD, seed=5)
    (tmp / "in" / "hostile").mkdir()
    for name, data in hostile_images().items():
        (tmp / "in" / "hostile" / name).write_bytes(data)
        paths.append(str(tmp / "in" / "hostile" / name))
    out = str(tmp / "out")
    # the suite's one run with a separate actor pool per model (ray.fuse_models=false); the others fuse them
    summary = pipeline.run(_cfg(fast_config, f"input.uri={tmp / 'in'}", f"output.uri={out}", "ray.fuse_models=false",
                                "output.report=true"))
    return paths, out, summary


def _by_name(table: pa.Table) -> dict:
    return {os.path.basename(r["uri"]): r for r in table.to_pylist()}


def test_every_input_leaves_exactly_one_row(local_run):
    paths, out, summary = local_run
    rows = manifest.read(out)
    assert sorted(rows["uri"].to_pylist()) == sorted(paths)
    made = GOOD + len(unusual_inputs()) + len(broken_inputs()) + len(hostile_images())
    assert summary["inputs"] == len(paths) == made
    counts = summary["counts"]
    assert counts["rows"] == counts["distinct_uris"] == len(paths)
    assert sum(counts["status"].values()) == len(paths)
    assert counts["accepted"] + sum(counts["reject_reason"].values()) == len(paths)


def test_bad_inputs_are_error_rows_with_reasons_and_unusual_ones_are_scored(local_run):
    _, out, _ = local_run
    rows = _by_name(manifest.read(out))
    for name, reason in BROKEN_REASONS.items():
        row = rows[name]
        assert row["status"] == "error" and row["reject_reason"] == "error" and not row["accepted"]
        assert reason in row["error"]
        assert row["serfiq"] is None or row["serfiq"] != row["serfiq"]  # NaN/None: never scored
    for name in unusual_inputs():
        row = rows[name]
        assert row["status"] in ("scored", "no_face"), (name, row["error"])
        assert row["error"] is None
        assert row["width"] > 0 and row["height"] > 0
        if row["status"] == "scored":
            assert 0 <= row["serfiq"] <= 1 and row["dbcnn"] == row["dbcnn"] and 0 < row["mask_fraction"] <= 1


def test_decision_columns_are_consistent(local_run):
    _, out, _ = local_run
    for row in manifest.read(out).to_pylist():
        assert row["decision"] == ("accepted" if row["accepted"] else "rejected")
        assert (row["reject_reason"] is None) == row["accepted"]
        if row["accepted"]:
            assert row["cafi"] == pytest.approx(row["dbcnn"])
            assert row["serfiq"] >= 0.5  # fast_config's decision.min_serfiq
        elif row["reject_reason"] == "unrecognisable":
            assert row["serfiq"] < 0.5
        assert row["model_version"].startswith("synthetic-")


def test_output_layout_schema_summary_and_marker(local_run):
    _, out, summary = local_run
    run_dir = os.path.join(out, "runs", summary["run_id"])
    assert os.path.isfile(os.path.join(run_dir, "_SUCCESS"))
    with open(os.path.join(run_dir, "summary.json")) as fh:
        on_disk = json.load(fh)
    assert on_disk["counts"] == summary["counts"] and on_disk["model_version"] == summary["model_version"]
    assert on_disk["config"]["models"]["serfiq"]["samples"] == 8
    assert {op["operator"] for op in on_disk["stages"]["operators"]} >= {
        "MapBatches(detect)", "MapBatches(parse)", "MapBatches(serfiq)", "MapBatches(dbcnn)"}
    # hive layout: model_version=.../decision=.../<run_id>_*.parquet
    mroot = os.path.join(out, "manifest")
    version_dirs = os.listdir(mroot)
    assert version_dirs == [f"model_version={summary['model_version']}"]
    decisions = sorted(os.listdir(os.path.join(mroot, version_dirs[0])))
    assert set(decisions) <= {"decision=accepted", "decision=rejected"} and "decision=rejected" in decisions
    for d in decisions:
        for f in os.listdir(os.path.join(mroot, version_dirs[0], d)):
            assert f.startswith(summary["run_id"]) and f.endswith(".parquet")
    # one table, same schema, through pyarrow, pandas and DuckDB
    table = pds.dataset(mroot, format="parquet", partitioning="hive").to_table()
    assert set(table.column_names) == set(manifest.SCHEMA.names)
    assert table.num_rows == summary["inputs"]
    frame = pd.read_parquet(mroot)
    assert len(frame) == summary["inputs"]
    n = duckdb.sql(f"select count(*), count(distinct uri) from read_parquet('{mroot}/**/*.parquet', "
                   "hive_partitioning=true)").fetchall()[0]
    assert n == (summary["inputs"], summary["inputs"])
    typed = manifest.dataset(out).schema
    assert typed.field("serfiq").type == pa.float32() and typed.field("scored_at").type == pa.timestamp("us")


def test_manifest_input_gives_the_same_rows_as_prefix_input(local_run, fast_config, tmp_path):
    paths, out, _ = local_run
    listing = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"path": sorted(paths)}), listing)
    out2 = str(tmp_path / "out")
    pipeline.run(_cfg(fast_config, f"input.manifest={listing}", "input.uri_column=path", f"output.uri={out2}"))
    cols = ["uri", "status", "error", "width", "height", "serfiq", "dbcnn", "decision", "reject_reason"]
    a = manifest.read(out, columns=cols).sort_by("uri").to_pandas()
    b = manifest.read(out2, columns=cols).sort_by("uri").to_pandas()
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4)


def test_s3_to_s3_with_a_csv_manifest_that_names_a_vanished_object(s3, fast_config, ray_local, tmp_path):
    s3.mkdir("crops")
    local = write_samples(str(tmp_path / "in"), count=2, seed=9, unusual=False, broken=True)
    for p in local:
        s3.put(p, "crops/batch1/" + os.path.relpath(p, tmp_path / "in"))
    uris = sorted("s3://" + k for k in s3.find("crops/batch1"))
    # prefix input: s3:// to s3://
    summary = pipeline.run(_cfg(fast_config, "input.uri=s3://crops/batch1/", "output.uri=s3://crops/out1"))
    rows = manifest.read("s3://crops/out1")
    assert sorted(rows["uri"].to_pylist()) == uris
    assert summary["counts"]["rows"] == len(uris)
    assert s3.exists(f"crops/out1/runs/{summary['run_id']}/_SUCCESS")
    # manifest input (CSV) that names an object which is gone by the time it is read
    csv = tmp_path / "list.csv"
    vanished = "s3://crops/batch1/vanished.jpg"
    pd.DataFrame({"uri": uris + [vanished]}).to_csv(csv, index=False)
    s3.put(str(csv), "crops/lists/list.csv")
    pipeline.run(_cfg(fast_config, "input.manifest=s3://crops/lists/list.csv", "output.uri=s3://crops/out2"))
    rows2 = _by_name(manifest.read("s3://crops/out2"))
    assert len(rows2) == len(uris) + 1
    assert rows2["vanished.jpg"]["status"] == "error" and "not found" in rows2["vanished.jpg"]["error"]
    first = _by_name(rows)
    for name, row in first.items():
        assert rows2[name]["status"] == row["status"]
    # credentials come from the environment chain and are never written anywhere
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    written = s3.find("crops/out1") + s3.find("crops/out2")
    assert any(p.endswith("summary.json") for p in written) and any(p.endswith(".parquet") for p in written)
    for path in written:
        data = s3.cat_file(path)
        assert secret not in data and os.environ["AWS_ACCESS_KEY_ID"].encode() not in data, path


def test_systemic_faults_fail_the_run_without_a_marker(fast_config, ray_local, tmp_path):
    write_samples(str(tmp_path / "in"), count=1, unusual=False, broken=False)
    out = str(tmp_path / "out")
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=f"dbcnn: checkpoint not found: {missing}"):
        pipeline.run(_cfg(fast_config, f"input.uri={tmp_path / 'in'}", f"output.uri={out}",
                          f"models.dbcnn.weights.uri={missing}"))
    assert manifest.committed_runs(out) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="output.uri"):
        pipeline.run(_cfg(fast_config, f"input.uri={tmp_path / 'in'}", f"output.uri={blocker}/out"))
    with pytest.raises(StorageError, match="input.uri"):
        pipeline.run(_cfg(fast_config, f"input.uri={tmp_path / 'absent'}", f"output.uri={out}"))


def test_hostile_images_are_error_rows_or_scored_and_never_fail_the_run(local_run):
    """Each crafted file leaves one row, the run commits, and its report is written."""
    from .faults import check_exactly_once

    paths, out, summary = local_run
    rows = {os.path.basename(uri): row for uri, row in check_exactly_once(out, paths).items()}
    assert rows["long.png"]["status"] in ("scored", "no_face") and rows["long.png"]["error"] is None
    assert (rows["long.png"]["width"], rows["long.png"]["height"]) == (1_250_000, 32)
    assert rows["line.png"]["status"] == "error" and "image too small: 4000000x1" in rows["line.png"]["error"]
    assert rows["eps.jpg"]["status"] == "error" and "unsupported image format: EPS" in rows["eps.jpg"]["error"]
    page = open(os.path.join(manifest.run_uri(out, summary["run_id"]), "report.html"), encoding="utf-8").read()
    assert "line.png" in page and "unsupported image format: EPS" in page
