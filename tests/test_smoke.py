"""The README's run command on a fresh checkout: a smoke run that makes its own inputs and weights."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the README's smoke command end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_smoke_command_scores_generated_crops(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["CAFI_LOG_LEVEL"] = "WARNING"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "score.py"), "--config", os.path.join(ROOT, "configs/smoke.yaml"),
         # the README command; smaller (documented keys) so that the suite stays within its time
         "ray.progress_bars=false", "smoke.samples=8", "image.crop_size=160", "models.serfiq.samples=8",
         "models.serfiq.arch=arcface_ir_se50_tiny", "models.dbcnn.arch=dbcnn_tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    manifest_line = next(line for line in lines if line.startswith("manifest:"))
    summary_line = next(line for line in lines if line.startswith("summary:"))
    summary_path = tmp_path / summary_line.split(":", 1)[1].strip()
    assert (tmp_path / manifest_line.split(":", 1)[1].strip()).is_dir()
    summary = json.loads(summary_path.read_text())
    assert (summary_path.parent / "_SUCCESS").exists()
    # generated variety: faces, unusual formats and broken files, every one accounted for
    n_files = sum(len(files) for _, _, files in os.walk(tmp_path / "out/smoke/samples"))
    assert summary["inputs"] == n_files >= 8 + 6
    assert summary["counts"]["status"].get("error", 0) == 6
    assert summary["counts"]["status"].get("scored", 0) >= 8
    assert summary["model_version"].startswith("synthetic-")
