"""`ray start --head` on loopback, then `ray job submit --working-dir . -- python jobs/score.py ...`.

The way cluster/README.md submits a run, end to end on this machine: a one-node cluster with
token authentication on, the repository uploaded as the job's working directory, synthetic
weights, and the committed manifest read back. The cluster is ours alone (its own ports and
temp dir) and is stopped afterwards, by the process id of the `ray start` we ran.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

try:  # tests/ is a package here; still importable if it is not
    from .scenarios import free_port, stop
except ImportError:  # pragma: no cover
    from scenarios import free_port, stop  # type: ignore[no-redef]

pytestmark = pytest.mark.slow  # a Ray head and `ray job submit`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            if _get(f"{url}/api/version", token) == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {url} did not come up in {timeout}s")


def test_ray_job_submit_scores_a_small_input_end_to_end(fast_config, tmp_path):
    from cafi import manifest
    from cafi.samples import write_samples

    inp, out = tmp_path / "in", tmp_path / "out"
    write_samples(str(inp), count=4, unusual=False, broken=True)
    n_files = sum(len(f) for _, _, f in os.walk(inp))

    tmp = tempfile.mkdtemp(prefix="cafi-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(tmp, "ray"))
    token = secrets.token_hex(24)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=tmp,
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))  # the entrypoint's `python`
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    url = f"http://127.0.0.1:{dash}"
    start_log_file = open(os.path.join(tmp, "ray-start.log"), "w")
    head = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={tmp}/ray", "--disable-usage-stats"],
        env=env, stdout=start_log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_dashboard(url, token, head, timeout=180)
        # Token authentication is on: without the token the job API answers 401.
        assert _get(f"{url}/api/jobs/") == 401
        assert _get(f"{url}/api/jobs/", token="not-the-token") in (401, 403)

        submission = f"cafi-test-{secrets.token_hex(4)}"
        config_args = [arg for path in fast_config for arg in ("--config", path)]
        cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", url, "--working-dir", ".",
               "--submission-id", submission, "--", "python", "jobs/score.py", *config_args,
               f"input.uri={inp}", f"output.uri={out}", "ray.progress_bars=false",
               "ray.fuse_models=true"]  # one model actor: the submission path is under test, not placement
        job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
        logs = job.stdout[-6000:] + job.stderr[-4000:]
        assert job.returncode == 0, logs
        assert f"Job '{submission}' succeeded" in job.stdout, logs
        assert "committed run" in job.stdout, logs

        table = manifest.read(str(out))
        assert table.num_rows == n_files == 10
        status = table.column("status").to_pylist()
        assert status.count("scored") == 4 and status.count("error") == 6
        runs = manifest.committed_runs(str(out))
        assert len(runs) == 1 and runs[0]["counts"]["rows"] == n_files
        assert runs[0]["model_version"].startswith("synthetic-")

        # The job ran on the cluster: its record is in the cluster's job table, with our entrypoint.
        request = urllib.request.Request(f"{url}/api/jobs/{submission}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            info = json.loads(resp.read())
        assert info["status"] == "SUCCEEDED" and "jobs/score.py" in info["entrypoint"]
    finally:
        stop(head)
        start_log_file.close()
        with open(os.path.join(tmp, "ray-start.log")) as fh:
            start_log = fh.read()[-3000:]
        shutil.rmtree(tmp, ignore_errors=True)
    assert head.poll() is not None, start_log
