"""Exactly-once manifests under faults: killed workers, a killed driver, a flaky object store,
and two runs of one version at once. Each ends with 0 rows lost and 0 duplicated."""

import os
import subprocess
import sys
import threading
import time

import pytest

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.errors import CafiError
from cafi.samples import write_samples

try:  # tests/ is a package under pytest; a scenario runs this file as a script
    from . import faults
    from .faults import FlakyProxy, check_exactly_once, kill_tree
    from .scenarios import emit, run_scenario
except ImportError:
    import faults  # type: ignore[no-redef]
    from faults import FlakyProxy, check_exactly_once, kill_tree  # type: ignore[no-redef]
    from scenarios import emit, run_scenario  # type: ignore[no-redef]

pytestmark = pytest.mark.slow  # fault injection on real Ray runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Blocks of 2 rows, each written as its own file: the run is observably mid-way for a while.
SMALL_BLOCKS = ["read.batch_size=2", "output.min_rows_per_file=1"] + [
    f"models.{m}.batch_size=2" for m in ("detector", "parser", "serfiq", "dbcnn")]


def _exactly_once(out, expected_uris):
    rows = manifest.read(str(out)).to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "a URI appears twice"
    assert sorted(uris) == sorted(expected_uris), "a URI is missing"
    return rows


def _data_files(out):
    return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "manifest")) for f in fs
            if f.endswith(".parquet")]


def test_a_killed_model_worker_is_replaced_and_the_run_completes(tmp_path, fast_config):
    """The model actor is killed while it holds a batch, by construction: a gate (tests/faults.py) stops
    its call on a batch of faces and records its pid; the scenario kills that process, then lets the
    restarted actor through. The run completes with every input once, as an undisturbed run scores it.
    In the same run, an input that kills the worker decoding it every time (as a kill for memory would:
    it looped forever before) is tried alone and becomes an error row after ray.max_worker_deaths deaths
    with it in progress (1 here: each death restarts the actor; 2 and 3 are tests/test_worker_deaths.py);
    the rest of its batch is scored."""
    paths = write_samples(str(tmp_path / "in"), count=6, seed=31, unusual=False, broken=False)
    poison = str(tmp_path / "in" / "poison.png")
    outs = {k: str(tmp_path / k) for k in ("undisturbed", "killed")}
    seen = run_scenario(__file__, "killed_worker", {"files": list(fast_config), "input": str(tmp_path / "in"),
                                                    "poison": poison, "outputs": outs}, timeout=900)
    assert seen["held"], seen  # the actor held a batch of faces when it was killed
    assert seen["killed_pid"] == seen["held"][0]["pid"] and not seen["alive_after_kill"], seen
    assert set(seen["held"][0]["uris"]) <= set(paths)
    assert seen["counts"]["rows"] == len(paths) + 1, seen
    rows = check_exactly_once(outs["killed"], [*paths, poison], reference_out=outs["undisturbed"], differ=(poison,))
    assert all(rows[u]["status"] == "scored" for u in seen["held"][0]["uris"]), rows
    assert rows[poison]["status"] == "error" and "died once while decoding this input" in rows[poison]["error"]


def _scenario_killed_worker(args: dict) -> None:
    import signal

    import ray

    gate = os.path.join(args["tmp"], "gate")
    os.makedirs(gate)
    ray.cloudpickle.register_pickle_by_value(faults)  # the hook reaches the workers by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": faults.hold_batches_on_gated_node,
                          "env_vars": {faults.GATE_ENV: gate}})
    overrides = [f"input.uri={args['input']}", *SMALL_BLOCKS]
    try:
        pipeline.run(load_config(args["files"], [*overrides, f"output.uri={args['outputs']['undisturbed']}"]))
        with open(args["poison"], "wb") as fh:  # an input that kills its worker, in the killed run only
            fh.write(faults.poison_png(seed=7))
        faults.arm_poison(gate)
        faults.arm_gate(gate, "killed", ray.get_runtime_context().get_node_id(), holds="/face_")
        summary: dict = {}
        job = threading.Thread(target=lambda: summary.update(pipeline.run(load_config(args["files"], [
            *overrides, f"output.uri={args['outputs']['killed']}", "ray.max_worker_deaths=1"]))))
        job.start()
        held = faults.wait_for_held(gate, "killed", job.is_alive, timeout=600)
        result: dict = {"held": held, "killed_pid": None, "alive_after_kill": None}
        if held:
            pid = held[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            result["killed_pid"] = pid
            for _ in range(100):  # gone before the gate opens: the batch cannot have been let through
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                result["alive_after_kill"] = True
            result["alive_after_kill"] = result["alive_after_kill"] or False
        faults.disarm_gate(gate)  # the restarted actor scores every batch
        job.join(timeout=600)
        result["counts"] = summary.get("counts", {})
        emit(result)
    finally:
        ray.shutdown()


def _job(config_files, overrides, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "score.py")]
    for f in config_files:
        cmd += ["--config", f]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CAFI_LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(cmd + list(overrides), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_killed_driver_is_resumed_by_the_next_run(tmp_path, fast_config, ray_local):
    paths = write_samples(str(tmp_path / "in"), count=8, seed=41, unusual=False, broken=False)
    out = tmp_path / "out"
    args = [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", "ray.num_cpus=2", "ray.progress_bars=false",
            *SMALL_BLOCKS]
    proc = _job(fast_config, args, tmp_path)
    deadline = time.time() + 400
    while proc.poll() is None and not _data_files(out) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    kill_tree(proc.pid)  # SIGKILL the driver and every process it started
    proc.wait(timeout=30)
    crashed_runs = os.listdir(out / "runs")
    assert len(crashed_runs) == 1 and not (out / "runs" / crashed_runs[0] / "_SUCCESS").exists()
    assert manifest.read(str(out)).num_rows == 0  # nothing committed yet: readers see nothing

    summary = pipeline.run(load_config(fast_config, args[:2]))
    assert summary["includes_runs"] == crashed_runs
    assert summary["scored_now"] < len(paths)  # what the crashed attempt wrote was not scored again
    assert summary["counts"]["rows"] == len(paths)
    rows = _exactly_once(out, paths)
    assert {r["run_id"] for r in rows} <= {summary["run_id"], crashed_runs[0]}


def test_a_flaky_object_store_is_retried_and_the_run_completes(s3, s3_endpoint, fast_config, ray_local, tmp_path):
    s3.mkdir("flaky")
    local = write_samples(str(tmp_path / "in"), count=3, seed=51, unusual=False, broken=True)
    for p in local:
        s3.put(p, "flaky/in/" + os.path.relpath(p, tmp_path / "in"))
    uris = sorted("s3://" + k for k in s3.find("flaky/in"))
    with FlakyProxy(s3_endpoint, every=4) as proxy:
        cfg = load_config(fast_config, ["input.uri=s3://flaky/in/", "output.uri=s3://flaky/out",
                                        f"storage.endpoint_url={proxy.url}", *SMALL_BLOCKS])
        summary = pipeline.run(cfg)
    assert proxy.failed >= 5, "the proxy injected too few faults to mean anything"
    rows = _exactly_once("s3://flaky/out", uris)
    assert summary["counts"]["status"].get("error", 0) == 6  # only the broken files; no read failure leaked
    assert not [r for r in rows if r["error"] and "cannot read object" in r["error"]]


def test_a_permanent_write_failure_fails_the_run_without_a_marker(s3, s3_endpoint, fast_config, ray_local,
                                                                   tmp_path):
    s3.mkdir("broken-out")
    local = write_samples(str(tmp_path / "in"), count=1, seed=61, unusual=False, broken=False)
    s3.put(local[0], "broken-out/in/a.jpg")
    with FlakyProxy(s3_endpoint, methods=("PUT", "POST"), path_contains="/manifest/", permanent=True) as proxy:
        # a budget of seconds: the failure is the same past any budget, only later
        cfg = load_config(fast_config, ["input.uri=s3://broken-out/in/", "output.uri=s3://broken-out/out",
                                        f"storage.endpoint_url={proxy.url}", "storage.retry_budget_s=3"])
        # Ray wraps the storage error; its message is ours
        with pytest.raises(Exception, match="cannot write .* within storage.retry_budget_s=3 ") as err:
            pipeline.run(cfg)
    assert proxy.failed > 0
    assert not isinstance(err.value, AssertionError)
    assert not s3.glob("broken-out/out/runs/*/_SUCCESS")
    assert manifest.read("s3://broken-out/out").num_rows == 0


def test_two_runs_of_one_version_at_once_commit_the_same_result(tmp_path, fast_config):
    paths = write_samples(str(tmp_path / "in"), count=2, seed=71, unusual=False, broken=True)
    out = tmp_path / "out"
    args = [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", "ray.num_cpus=2", "ray.progress_bars=false"]
    a, b = _job(fast_config, args, tmp_path), _job(fast_config, args, tmp_path)
    outs = [p.communicate(timeout=900)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    committed = manifest.committed_runs(str(out))
    assert 1 <= len(committed) <= 2
    for s in committed:
        assert s["counts"]["rows"] == len(paths) and s["counts"]["distinct_uris"] == len(paths)
    _exactly_once(out, paths)


def test_counts_that_do_not_add_up_refuse_to_commit(tmp_path, fast_config, ray_local, monkeypatch):
    write_samples(str(tmp_path / "in"), count=1, unusual=False, broken=True)
    real = manifest.run_counts

    def lossy(*args, **kwargs):
        counts = real(*args, **kwargs)
        counts["distinct_uris"] -= 1  # as if a row had been lost on the way
        return counts

    monkeypatch.setattr(manifest, "run_counts", lossy)
    with pytest.raises(CafiError, match="have no row; not committed"):
        pipeline.run(load_config(fast_config, [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}"]))
    assert manifest.committed_runs(str(tmp_path / "out")) == []


if __name__ == "__main__":
    import json
    import logging

    logging.basicConfig(level=os.environ.get("CAFI_LOG_LEVEL", "WARNING"))
    scenario, payload = sys.argv[1], json.loads(sys.argv[2])
    {"killed_worker": _scenario_killed_worker}[scenario](payload)
