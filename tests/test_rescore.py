"""Re-scoring after a model update: versions side by side, unchanged stages reused, no-op re-runs."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.models.registry import published
from cafi.samples import write_samples
from cafi.synth import write_checkpoint
from cafi.version import model_version, stage_fingerprints
from cafi.weights import sha256_of

pytestmark = pytest.mark.slow  # end-to-end runs and re-scores

COLS = ["uri", "status", "error", "det_score", "mask_fraction", "serfiq_raw", "serfiq", "dbcnn", "decision"]


@pytest.fixture(scope="module")
def first(tmp_path_factory, fast_config, ray_local):
    tmp = tmp_path_factory.mktemp("rescore")
    write_samples(str(tmp / "in"), count=3, seed=21, unusual=False, broken=True)
    # embeddings stored (SER-FIQ's): `cafi eval --identities` of a later version compares its scorers
    base = [f"input.uri={tmp / 'in'}", f"output.uri={tmp / 'out'}", "output.embeddings=true"]
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
    assert set(new["reuse"]["reused_stages"]) == {"detect", "parse", "components", "serfiq", "dbcnn"}
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


def test_sddfiqa_trained_weights_are_a_new_version_that_runs_only_sddfiqa(first, fast_config, tmp_path, capsys):
    """Re-scoring with what `cafi train sddfiqa` writes to its DIR -- the weights in the published layout,
    DIR/sddfiqa.yaml naming them, DIR/heldout.csv -- and `models.fiqa.kind=sddfiqa` (SER-FIQ kept beside
    it) is a new model version that runs the SDD-FIQA stage alone; `cafi eval --identities DIR/heldout.csv`
    then compares the two. (This run's three crops are too few to label -- SDD-FIQA draws 24 samples of
    other identities -- so the outputs are written by the functions training writes them with, from an
    IR-50 with random weights; the training itself is tests/test_sdd_train.py's.)"""
    import json

    import torch

    from cafi.cli import main
    from cafi.models import sddfiqa
    from cafi.train import outputs
    from cafi.train.sddfiqa import published_state

    tmp, base, summary = first
    trained = tmp_path / "trained"
    torch.manual_seed(5)
    pth = str(trained / "sddfiqa.pth")
    digest = outputs.write_checkpoint(published_state(sddfiqa.build().state_dict()), pth, None)
    outputs.write_weights_block(str(trained / "sddfiqa.yaml"), "sddfiqa", pth, digest, None)
    scored = sorted(u for u, r in _rows(tmp / "out", summary["model_version"]).items() if r["status"] == "scored")
    assert len(scored) >= 3
    outputs.write_identities_csv(str(trained / "heldout.csv"), scored, ["a", "a"] + ["b"] * (len(scored) - 2), None)

    cfg = load_config([*fast_config, str(trained / "sddfiqa.yaml")],
                      base + ["models.fiqa.kind=sddfiqa", "models.fiqa.also=[serfiq]"])
    assert cfg.models.sddfiqa.weights.sha256 == digest
    versions = {r["model_version"] for r in manifest.committed_runs(str(tmp / "out"))}
    new = pipeline.run(cfg)
    assert new["model_version"] not in versions
    assert new["stages_run"] == ["sddfiqa"]
    assert set(new["reuse"]["reused_stages"]) == {"detect", "parse", "components", "serfiq", "dbcnn"}
    old, cur = _rows(tmp / "out", summary["model_version"]), _rows(tmp / "out", new["model_version"])
    sdd = {r["uri"]: r["sddfiqa"] for r in manifest.read(str(tmp / "out"), version=new["model_version"],
                                                          columns=["uri", "sddfiqa"]).to_pylist()}
    for uri in scored:
        assert cur[uri]["serfiq_raw"] == old[uri]["serfiq_raw"] and np.isfinite(sdd[uri])

    run = manifest.run_uri(str(tmp / "out"), new["run_id"])
    capsys.readouterr()
    assert main(["eval", run, "--identities", str(trained / "heldout.csv"), "--min-mated", "1", "--json"]) == 0
    edc = json.loads(capsys.readouterr().out)["edc"]
    assert edc["samples"] == len(scored) and edc["mated_pairs"] == 1
    assert {"sddfiqa", "serfiq"} <= {p["score"] for p in edc["pauc"]}


def test_new_dbcnn_weights_rerun_only_parsing_and_dbcnn(first, fast_config, tmp_path):
    tmp, base, summary = first
    arch = load_config(fast_config, base).models.dbcnn.arch  # the run's (toy widths: tests/conftest.py)
    path = write_checkpoint(arch, str(tmp_path), seed=7)
    assert os.path.basename(path) == published(arch).file_name
    cfg = load_config(fast_config, base + [f"models.dbcnn.weights.uri={path}",
                                           f"models.dbcnn.weights.sha256={sha256_of(path)}",
                                           "models.dbcnn.weights.synthetic=true"])
    before = stage_fingerprints(load_config(fast_config, base))
    after = stage_fingerprints(cfg)
    assert [s for s in before if before[s] != after[s]] == ["dbcnn", "decide"]
    new = pipeline.run(cfg)
    assert new["stages_run"] == ["parse", "dbcnn"]
    assert new["model_version"] == model_version(cfg)
    old, cur = _rows(tmp / "out", summary["model_version"]), _rows(tmp / "out", new["model_version"])
    scored = [u for u, r in cur.items() if r["status"] == "scored"]
    assert scored
    for uri in scored:
        assert cur[uri]["serfiq_raw"] == old[uri]["serfiq_raw"]  # reused
        assert cur[uri]["det_score"] == old[uri]["det_score"]
        assert cur[uri]["mask_fraction"] == pytest.approx(old[uri]["mask_fraction"])  # same parser, recomputed
        assert cur[uri]["dbcnn"] != old[uri]["dbcnn"]  # new weights


@pytest.fixture(scope="module")
def by_manifest(tmp_path_factory, fast_config, ray_local):
    """A committed run over a manifest of URIs (so the images can be taken away afterwards)."""
    import pandas as pd

    tmp = tmp_path_factory.mktemp("components")
    paths = write_samples(str(tmp / "in"), count=3, seed=33, unusual=False, broken=True)
    pd.DataFrame({"uri": paths}).to_csv(tmp / "list.csv", index=False)
    base = [f"input.manifest={tmp / 'list.csv'}", f"output.uri={tmp / 'out'}"]
    summary = pipeline.run(load_config(fast_config, base))
    return tmp, base, summary, paths


def test_component_rules_are_a_threshold_only_rescore_that_reads_no_image(by_manifest, fast_config):
    tmp, base, summary, paths = by_manifest
    old = _rows(tmp / "out", summary["model_version"])
    scored = {r["uri"]: r for r in manifest.read(str(tmp / "out")).to_pylist() if r["status"] == "scored"}
    assert scored and all(r["yaw"] is not None and r["sharpness"] is not None for r in scored.values())
    # thresholds between the rows' own values: some rows must fail each new rule
    yaws = sorted(abs(r["yaw"]) for r in scored.values())
    sharp = sorted(r["sharpness"] for r in scored.values())
    os.rename(tmp / "in", tmp / "gone")  # any image read now would be an error row
    try:
        rules = [f"decision.max_yaw={(yaws[0] + yaws[-1]) / 2}", f"decision.min_sharpness={sharp[-1] + 1}",
                 "decision.min_serfiq=0.0", "decision.min_mask_fraction=0.0",
                 # the fused score is made at decide time too: no model, no read
                 "decision.fusion.weights.yaw=1", "decision.fusion.weights.serfiq=3"]
        new = pipeline.run(load_config(fast_config, base + rules))
    finally:
        os.rename(tmp / "gone", tmp / "in")
    assert new["stages_run"] == [] and "components" in new["reuse"]["reused_stages"]
    cur = {r["uri"]: r for r in manifest.read(str(tmp / "out"), version=new["model_version"]).to_pylist()}
    assert cur.keys() == old.keys()
    for uri, row in cur.items():
        assert row["status"] == old[uri]["status"]  # no read failure: nothing was read
        if row["status"] != "scored":
            continue
        assert row["yaw"] == scored[uri]["yaw"] and row["sharpness"] == scored[uri]["sharpness"]
        facing = max(0.0, 1 - abs(row["yaw"]) / 90)  # an angle past 90 degrees counts as 0
        assert row["fused"] == pytest.approx((facing + 3 * row["serfiq"]) / 4, abs=1e-5)
        want = "pose" if abs(row["yaw"]) > (yaws[0] + yaws[-1]) / 2 else "blur"
        assert row["reject_reason"] == want, (uri, row["reject_reason"], row["yaw"], row["sharpness"])
    assert {"pose", "blur"} <= set(new["counts"]["reject_reason"])


def test_adding_components_to_a_version_without_them_reruns_only_parsing_and_components(by_manifest,
                                                                                      fast_config):
    """A version scored before the components existed: its summary has no components fingerprint.
    Adding them re-runs the parser (the measures read its live mask) and the measures, nothing else."""
    import json

    tmp, base, _, paths = by_manifest
    latest = manifest.committed_runs(str(tmp / "out"))[-1]  # the version a new one takes results from
    path = tmp / "out" / "runs" / latest["run_id"] / "summary.json"
    record = json.loads(path.read_text())
    del record["stage_fingerprints"]["components"]  # as written by a cafi without components
    path.write_text(json.dumps(record))
    new = pipeline.run(load_config(fast_config, base + ["decision.min_serfiq=0.45"]))
    assert new["stages_run"] == ["parse", "components"]
    assert set(new["reuse"]["reused_stages"]) == {"detect", "serfiq", "dbcnn"}
    old = _rows(tmp / "out", latest["model_version"])
    cur = {r["uri"]: r for r in manifest.read(str(tmp / "out"), version=new["model_version"]).to_pylist()}
    for uri, row in cur.items():
        if row["status"] == "scored":
            assert row["dbcnn"] == old[uri]["dbcnn"] and row["serfiq_raw"] == old[uri]["serfiq_raw"]
            assert row["sharpness"] is not None


def test_switching_scorers_reruns_only_the_new_scorer(first, fast_config):
    """DBCNN -> TOPIQ-face: detection, alignment, mask, components and SER-FIQ are taken over and
    only the IQA scorer runs (TOPIQ-face reads the unmasked, FFHQ-aligned face). SER-FIQ -> MagFace:
    only MagFace runs, on faces aligned from the stored landmarks."""
    tmp, base, summary = first
    before = _rows(tmp / "out", summary["model_version"])
    topiq = pipeline.run(load_config(fast_config, base + ["models.iqa.kind=topiq_face"]))
    assert topiq["stages_run"] == ["topiq_face"]
    assert set(topiq["reuse"]["reused_stages"]) == {"detect", "parse", "components", "serfiq"}
    rows = {r["uri"]: r for r in manifest.read(str(tmp / "out"), version=topiq["model_version"]).to_pylist()}
    for uri, row in rows.items():
        assert row["status"] == before[uri]["status"]
        if row["status"] == "scored":
            assert row["serfiq_raw"] == before[uri]["serfiq_raw"] and row["dbcnn"] is None
            assert np.isfinite(row["topiq_face"]) and row["cafi"] in (None, row["topiq_face"])

    magface = pipeline.run(load_config(fast_config, base + ["models.iqa.kind=topiq_face",
                                                            "models.fiqa.kind=magface"]))
    assert magface["stages_run"] == ["magface"]
    assert set(magface["reuse"]["reused_stages"]) == {"detect", "parse", "components", "topiq_face"}
    assert magface["reuse"]["source_version"] == topiq["model_version"]
    rows = {r["uri"]: r for r in manifest.read(str(tmp / "out"), version=magface["model_version"]).to_pylist()}
    scored = [r for r in rows.values() if r["status"] == "scored"]
    assert scored and all(r["magface_raw"] > 0 and r["magface"] == r["magface_raw"] and r["serfiq"] is None
                          for r in scored)
    # CR-FIQA with embeddings: only CR-FIQA runs, and its one pass gives the embedding, which the run
    # records as coming from it (summary and the column's Parquet field metadata); the classic classifier
    # beside it reads that embedding in the same batch (it runs after CR-FIQA whatever the order given)
    cr = pipeline.run(load_config(fast_config, base + ["models.iqa.kind=topiq_face", "models.fiqa.kind=classic",
                                                       "models.fiqa.also=[crfiqa]", "decision.min_classic=0.0",
                                                       "output.embeddings=true"]))
    assert cr["stages_run"] == ["crfiqa", "classic"], cr["stages_run"]
    assert cr["embedding_model"]["stage"] == "crfiqa" and cr["embedding_model"]["arch"].startswith("crfiqa")
    ds = manifest.dataset(str(tmp / "out"))
    files = [f for f in ds.files if cr["run_id"] in f]
    assert files and all(manifest.embedding_model_of(pq.read_schema(f)) == cr["embedding_model"] for f in files)
    rows = manifest.read(str(tmp / "out"), version=cr["model_version"]).to_pylist()
    scored = [r for r in rows if r["status"] == "scored"]
    assert scored and all(r["embedding"] is not None and np.isfinite(r["crfiqa"]) for r in scored)
    assert all(0.0 <= r["classic"] <= 1.0 for r in scored) and len({r["classic"] for r in scored}) > 1
    # the versions stay side by side: four committed model versions of the same inputs
    assert len({r["model_version"] for r in manifest.committed_runs(str(tmp / "out"))}) >= 4
