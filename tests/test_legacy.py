"""Nothing a user has changes across the stage-spec reshape: an output committed by cafi at dd0c163
(tests/fixtures/legacy_dd0c163, made by tests/fixtures/make_legacy.py) is a no-op to re-run, and a
threshold change on it is a threshold-only re-score of the old rows; configs keep their model versions."""

from __future__ import annotations

import json
import os
import sys

import pytest
from omegaconf import OmegaConf

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.version import model_version, stage_fingerprints

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LEGACY = os.path.join(FIXTURES, "legacy_dd0c163")


def test_every_recorded_config_keeps_its_model_version_and_stage_fingerprints():
    sys.path.insert(0, FIXTURES)
    try:
        from make_versions import versions
    finally:
        sys.path.remove(FIXTURES)
    old = json.load(open(os.path.join(LEGACY, "versions.json")))
    new = versions()
    assert len(old) >= 18
    for name, then in old.items():
        assert new[name] == then, name


def _legacy_config(tmp_path) -> tuple[list[str], list[str], dict]:
    """The fixture's config with its weights replaced by empty files of the same recorded sha256: a run
    that loaded any model would fail its sha256 check, so these runs prove that none is loaded."""
    run = json.load(open(os.path.join(LEGACY, "run.json")))
    weights = OmegaConf.load(os.path.join(LEGACY, "synthetic.yaml"))
    for section in weights.models.values():
        name = os.path.basename(section.weights.uri)
        (tmp_path / name).write_bytes(b"")
        section.weights.uri = str(tmp_path / name)
    path = tmp_path / "synthetic.yaml"
    OmegaConf.save(weights, path)
    return [str(path)], [*run["overrides"], "ray.num_cpus=null", "output.report=false"], run


@pytest.mark.slow
def test_an_output_committed_before_the_reshape_is_a_noop_then_a_threshold_only_rescore(s3, ray_local, tmp_path):
    s3.put(os.path.join(LEGACY, "bucket") + "/", "legacy/", recursive=True)
    files, overrides, then = _legacy_config(tmp_path)
    cfg = load_config(files, overrides)
    assert model_version(cfg) == then["model_version"]
    assert stage_fingerprints(cfg) == then["stage_fingerprints"]

    again = pipeline.run(cfg)
    assert again["noop"] is True and again["run_id"] == then["run_id"]

    old = {r["uri"]: r for r in manifest.read("s3://legacy/out", version=then["model_version"]).to_pylist()}
    for uri in old:  # a threshold-only re-score reads no image: none is there to read
        s3.rm(uri.removeprefix("s3://"))
    stricter = pipeline.run(load_config(files, [*overrides, "decision.min_serfiq=0.99"]))
    assert stricter["model_version"] != then["model_version"]
    assert stricter["stages_run"] == [] and stricter["reuse"]["source_version"] == then["model_version"]
    assert set(stricter["reuse"]["reused_stages"]) == set(then["stage_fingerprints"]) - {"decide"}
    new = {r["uri"]: r for r in manifest.read("s3://legacy/out", version=stricter["model_version"]).to_pylist()}
    assert set(new) == set(old) and len(old) == 12
    kept = ["status", "error", "width", "height", "det_score", "landmarks", "serfiq_raw", "magface", "dbcnn",
            "topiq_face", "mask_fraction", "yaw", "sharpness", "embedding", "identity"]
    for uri, row in old.items():
        assert {c: new[uri][c] for c in kept} == {c: row[c] for c in kept}, uri
        if row["status"] == "scored":
            assert new[uri]["accepted"] is False and new[uri]["reject_reason"] is not None
