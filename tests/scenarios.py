"""Scenarios that start their own Ray cluster run in a fresh interpreter each: the session-wide
`ray_local` fixture of the test process must not see them. A test module that holds scenario
bodies runs itself as a script (`python tests/<module>.py <scenario> <json>`); the scenario
prints one JSON line of what it observed (`emit`), and the test asserts on that."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MARK = "CAFI-SCENARIO-RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(tmp: str) -> dict:
    """Token auth on, a private temp dir: nothing of ours is found by other Ray users of this machine."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), RAY_TMPDIR=tmp,
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    return env


def run_scenario(script: str, name: str, args: dict, timeout: int) -> dict:
    """Run scenario `name` of `script` in its own interpreter and process group; whatever it leaves
    running is ended.

    Its output goes to a file, not a pipe: Ray processes it starts inherit the descriptors, and a
    pipe would stay open (and the test wait) for as long as any of them lives.
    """
    tmp = tempfile.mkdtemp(prefix="cafi-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(tmp, "ray"))  # RAY_TMPDIR/ray: where Ray keeps this cluster's address file
    log_path = os.path.join(tmp, f"{name}.log")
    with open(log_path, "w") as log:
        argv = [sys.executable, os.path.abspath(script), name, json.dumps({**args, "tmp": tmp})]
        proc = subprocess.Popen(argv, env=cluster_env(tmp), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = f"killed after {timeout}s"
        finally:
            stop(proc)
    with open(log_path) as fh:
        output = fh.read()
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session logs; the failure message carries the output
    lines = [ln for ln in output.splitlines() if ln.startswith(MARK)]
    if code != 0 or not lines:
        raise AssertionError(f"scenario {name} failed ({code}):\n{output[-12000:]}")
    return json.loads(lines[-1][len(MARK):])


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (SIGTERM: `ray start --block` stops what it started), then anything
    left in its process group (ours), waiting only as long as the group is still there."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the fake provider's worker raylets outlive the head
        except ProcessLookupError:
            return
        if _group_ends(proc.pid, within_s=3):
            return


def _group_ends(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
