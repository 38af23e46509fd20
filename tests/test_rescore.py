"""Re-scoring after a model update: versions side by side, unchanged stages reused, no-op re-runs."""

import os

import numpy as np
import pytest

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.models.registry import PUBLISHED
from cafi.samples import write_samples
from cafi.synth import write_checkpoint
from cafi.version import model_version, stage_fingerprints
from cafi.weights import sha256_of

COLS = ["uri", "status", "error", "det_score", "mask_fraction", "serfiq_raw", "serfiq", "dbcnn", "decision"]


@pytest.fixture(scope="module")
def first(tmp_path_factory, fast_config, ray_local):
    tmp = tmp_path_factory.mktemp("rescore")
    write_samples(str(tmp / "in"), count=3, seed=21, unusual=False, broken=True)
    base = [f"input.uri={tmp / 'in'}", f"output.uri={tmp / 'out'}"]
    summary = pipeline.run(load_config(fast_config, base))
    return tmp, base, summary


def _rows(out, version):
    return {r["uri"]: r for r in manifest.read(str(out), version=version, columns=COLS).to_pylist()}


def test_rerunning_a_committed_version_is_a_noop(first, fast_config):
    tmp, base, summary = first
    again = pipeline.run(load_config(fast_config, base))
    assert again["noop"] is True and again["run_id"] == summary["run_id"]
    assert sorted(os.listdir(tmp / "out" / "runs")) == [summary["run_id"]]  # no new run left behind


def test_threshold_change_is_a_new_version_that_runs_no_model(first, fast_config):
    tmp, base, summary = first
    cfg = load_config(fast_config, base + ["decision.min_serfiq=0.05", "models.serfiq.alpha=60"])
    new = pipeline.run(cfg)
    assert new["model_version"] != summary["model_version"]
    assert new["stages_run"] == []  # no model loaded, no image read
    assert set(new["reuse"]["reused_stages"]) == {"detect", "parse", "serfiq", "dbcnn"}
    assert new["reuse"]["source_version"] == summary["model_version"]
    old, cur = _rows(tmp / "out", summary["model_version"]), _rows(tmp / "out", new["model_version"])
    assert old.keys() == cur.keys() and len(cur) == summary["inputs"]
    for uri, row in cur.items():
        assert row["status"] == old[uri]["status"] and row["error"] == old[uri]["error"]
        if row["status"] == "scored":
            assert row["serfiq_raw"] == old[uri]["serfiq_raw"] and row["dbcnn"] == old[uri]["dbcnn"]
            assert row["serfiq"] == pytest.approx(1 / (1 + np.exp(-60 * (row["serfiq_raw"] - 0.54))), rel=1e-4)
    # the old version stays committed and readable, untouched
    assert manifest.read(str(tmp / "out"), version=summary["model_version"]).num_rows == summary["inputs"]
    assert manifest.read(str(tmp / "out"))["model_version"][0].as_py() == new["model_version"]  # latest


def test_new_dbcnn_weights_rerun_only_parsing_and_dbcnn(first, fast_config, tmp_path):
    tmp, base, summary = first
    path = write_checkpoint("dbcnn", str(tmp_path), seed=7)
    assert os.path.basename(path) == PUBLISHED["dbcnn"].file_name
    cfg = load_config(fast_config, base + [f"models.dbcnn.weights.uri={path}",
                                           f"models.dbcnn.weights.sha256={sha256_of(path)}",
                                           "models.dbcnn.weights.synthetic=true"])
    before = stage_fingerprints(load_config(fast_config, base))
    after = stage_fingerprints(cfg)
    assert [s for s in before if before[s] != after[s]] == ["dbcnn", "decide"]
    new = pipeline.run(cfg)
    assert new["stages_run"] == ["Mask", "DbcnnStage"]
    assert new["model_version"] == model_version(cfg)
    old, cur = _rows(tmp / "out", summary["model_version"]), _rows(tmp / "out", new["model_version"])
    scored = [u for u, r in cur.items() if r["status"] == "scored"]
    assert scored
    for uri in scored:
        assert cur[uri]["serfiq_raw"] == old[uri]["serfiq_raw"]  # reused
        assert cur[uri]["det_score"] == old[uri]["det_score"]
        assert cur[uri]["mask_fraction"] == pytest.approx(old[uri]["mask_fraction"])  # same parser, recomputed
        assert cur[uri]["dbcnn"] != old[uri]["dbcnn"]  # new weights
