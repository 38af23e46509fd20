"""What cloud clusters do to a run: a GPU node lost mid-run (with and without a replacement),
throttling storms on reads and on manifest writes, object keys with odd characters, inputs
listed twice or gone. Each scenario ends by checking the committed output row by row against
the input (`check_exactly_once`). The node-loss scenarios run in a fresh interpreter with their
own multi-node Ray cluster (tests/scenarios.py); the "GPUs" are logical: the models run on CPU.
"""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pytest

from cafi import manifest, pipeline
from cafi.config import load_config
from cafi.fetch import MAX_WAIT_S
from cafi.samples import write_samples

try:  # tests/ is a package under pytest; a scenario runs this file as a script
    from . import faults
    from .faults import FlakyProxy, ServerIgnoringRange, check_exactly_once
    from .scenarios import emit, run_scenario
except ImportError:
    import faults  # type: ignore[no-redef]
    from faults import FlakyProxy, ServerIgnoringRange, check_exactly_once  # type: ignore[no-redef]
    from scenarios import emit, run_scenario  # type: ignore[no-redef]

# Blocks of 2 rows, each written as its own file: the run is observably mid-way for a while.
SMALL_BLOCKS = ["read.batch_size=2", "output.min_rows_per_file=1", "ray.progress_bars=false"] + [
    f"models.{m}.batch_size=2" for m in ("detector", "parser", "serfiq", "dbcnn")]


def _data_files(out) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(str(out), "manifest")) for f in fs
            if f.endswith(".parquet")]


# ---------------------------------------------------------------- a GPU node lost mid-run

@pytest.mark.slow
def test_a_gpu_node_lost_mid_run_with_and_without_a_replacement(fast_config, tmp_path):
    paths = write_samples(str(tmp_path / "in"), count=10, seed=81, unusual=False, broken=True)
    outs = {k: str(tmp_path / k) for k in ("undisturbed", "replaced", "survivor")}
    seen = run_scenario(__file__, "node_loss", {"files": list(fast_config), "input": str(tmp_path / "in"),
                                                "outputs": outs}, timeout=1200)
    assert seen["removed"] == ["replaced", "survivor"], seen
    assert seen["added"] == ["replaced"]
    for name in ("replaced", "survivor"):
        # The lost node's model actor held batches when the node went: the gate (tests/faults.py)
        # stops its calls on entry and records them, on that node only, until the node is removed.
        held = seen["held_on_lost_node"][name]
        assert held["uris"], f"{name}: the lost node's model actor never took a batch: {seen}"
        assert held["nodes"] == [held["victim"]], seen  # recorded by processes on the lost node
        assert held["actors_alive_on_victim"], seen  # by FusedModels actors placed there, alive then
        assert not held["released"], seen  # no held call let its batch go: they died with the node
        assert set(held["uris"]) <= set(paths), seen
        assert seen["written_before_loss"][name], seen  # the run was mid-way: some blocks were written
        # ... and those batches ran again elsewhere: every row once, scored as in the undisturbed run,
        # the faces of the held batches included
        rows = check_exactly_once(outs[name], paths, reference_out=outs["undisturbed"])
        assert [u for u in held["uris"] if rows[u]["status"] == "scored"], (held, rows)
        assert seen["counts"][name]["rows"] == len(paths), seen


def _scenario_node_loss(args: dict) -> None:
    import ray
    from ray.cluster_utils import Cluster

    gate = os.path.join(args["tmp"], "gate")
    os.makedirs(gate)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": os.path.join(args["tmp"], "ray"),
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    # Every worker process of this job wraps FusedModels.__call__ in the gate (tests/faults.py): inert
    # until armed, then a model actor on the armed node holds the batches it is given. The hook goes
    # to the workers by value: they need not find tests/ on their path.
    ray.cloudpickle.register_pickle_by_value(faults)
    ray.init(address=cluster.address, log_to_driver=False,  # first: the driver attaches to the head's raylet
             runtime_env={"worker_process_setup_hook": faults.hold_batches_on_gated_node,
                          "env_vars": {faults.GATE_ENV: gate}})
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    # One fused model actor per GPU node (a whole logical GPU each); reads and decisions anywhere.
    overrides = [f"input.uri={args['input']}", *SMALL_BLOCKS, "ray.fuse_models=true",
                 "ray.scale_gpu_pools=always"]
    for m in ("detector", "parser", "serfiq", "dbcnn"):
        overrides += [f"models.{m}.num_gpus=1", f"models.{m}.num_cpus=0.5", f"models.{m}.max_actors=2"]
    result: dict = {"removed": [], "added": [], "held_on_lost_node": {}, "written_before_loss": {}, "counts": {}}
    try:
        pipeline.run(load_config(args["files"], [*overrides, f"output.uri={args['outputs']['undisturbed']}"]))
        for name in ("replaced", "survivor"):
            out = args["outputs"][name]
            victim = gpu_nodes[0]
            faults.arm_gate(gate, name, victim.node_id, holds="/face_")  # a batch with faces to score
            summary: dict = {}

            def score(out=out, summary=summary):
                try:
                    summary.update(pipeline.run(load_config(args["files"], [*overrides, f"output.uri={out}"])))
                except Exception as exc:  # noqa: BLE001 - reported with the result
                    summary["error"] = f"{type(exc).__name__}: {exc}"[:2000]

            job = threading.Thread(target=score)
            job.start()
            held = faults.wait_for_held(gate, name, job.is_alive, timeout=600)
            actors = ray._private.state.actors()  # GCS's actor table (no dashboard here)
            on_victim = [actors.get(h["actor_id"] or "", {}) for h in held]
            result["held_on_lost_node"][name] = {
                "victim": victim.node_id,
                "nodes": sorted({h["node_id"] for h in held}),
                "uris": sorted({u for h in held for u in h["uris"]}),
                "actors_alive_on_victim": bool(on_victim) and all(
                    a.get("State") == "ALIVE" and "FusedModels" in a.get("ActorClassName", "")
                    and a.get("Address", {}).get("NodeID") == victim.node_id for a in on_victim),
            }
            # The other GPU node goes on with the rest: wait until some of it is written.
            deadline = time.time() + 300
            while job.is_alive() and not _data_files(out) and time.time() < deadline:
                time.sleep(0.2)
            result["written_before_loss"][name] = bool(_data_files(out)) and job.is_alive()
            cluster.remove_node(victim, allow_graceful=False)  # its actors and object-store blocks go with it
            faults.disarm_gate(gate)
            result["removed"].append(name)
            result["held_on_lost_node"][name]["released"] = faults.held_batches(gate, name, "released")
            gpu_nodes.pop(0)
            if name == "replaced":
                time.sleep(3)
                gpu_nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))
                result["added"].append(name)
            job.join(timeout=900)
            result["counts"][name] = summary.get("counts", {})
            if "error" in summary:
                result.setdefault("errors", {})[name] = summary["error"]
        emit(result)
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------- throttling storms

def _put_inputs(s3, tmp_path, bucket: str, count: int, seed: int) -> list[str]:
    s3.mkdir(bucket)
    local = write_samples(str(tmp_path / bucket), count=count, seed=seed, unusual=False, broken=False)
    for p in local:
        s3.put(p, f"{bucket}/in/" + os.path.relpath(p, tmp_path / bucket))
    return sorted("s3://" + k for k in s3.find(f"{bucket}/in"))


# Storms and budgets of seconds. Each object's retries are spaced by a jittered backoff of at most
# MAX_WAIT_S, so a storm of STORM_S seconds is outlasted for certain within a budget of
# STORM_S + MAX_WAIT_S (+ slack for the failed request itself): the survived storms below pass
# whatever the jitter draws. A failed write retries for at most its budget, so a storm longer than
# budget + slack fails the run whatever the jitter draws. The first waits are at most 0.2, 0.4, 0.8
# and 1.6 s, so a request failed at the start of a 5 s storm is failed again at least 4 times.
STORM_S = 5.0
SURVIVED_BUDGET_S = STORM_S + MAX_WAIT_S + 4
SHORT_BUDGET_S = 3
LONG_STORM_S = 10 * SHORT_BUDGET_S


@pytest.mark.slow
def test_a_read_storm_delays_the_run_instead_of_failing_reads(s3, s3_endpoint, fast_config, ray_local, tmp_path):
    uris = _put_inputs(s3, tmp_path, "storm-read", count=6, seed=91)
    # every GET of an input object fails (503 SlowDown, or a dropped connection) for STORM_S, once
    # the first two have been served
    with FlakyProxy(s3_endpoint, methods=("GET",), path_contains="/storm-read/in/", storm_s=STORM_S,
                    storm_after=2) as proxy:
        cfg = load_config(fast_config, ["input.uri=s3://storm-read/in/", "output.uri=s3://storm-read/out",
                                        f"storage.endpoint_url={proxy.url}",
                                        f"storage.retry_budget_s={SURVIVED_BUDGET_S:g}", *SMALL_BLOCKS])
        summary = pipeline.run(cfg)
        finished = time.time()
    assert proxy.storm_start is not None and proxy.failed >= 5, "the storm never hit a read"
    # the run waited the storm out: objects whose reads failed in it were read after it, and it ended
    # after the storm did
    assert proxy.recovered and proxy.recovered == proxy.failed_paths, (proxy.failed_paths, proxy.recovered)
    assert finished > proxy.storm_start + STORM_S
    rows = check_exactly_once("s3://storm-read/out", uris)
    assert not [r for r in rows.values() if r["error"] and "cannot read object" in r["error"]]
    assert summary["counts"]["status"].get("error", 0) == 0
    assert summary["retries"]["read_retries"] > 0


@pytest.mark.slow
def test_a_write_storm_is_retried_within_its_budget_and_fails_the_run_past_it(s3, s3_endpoint, fast_config,
                                                                             ray_local, tmp_path):
    uris = _put_inputs(s3, tmp_path, "storm-write", count=2, seed=92)
    base = ["input.uri=s3://storm-write/in/", *SMALL_BLOCKS]
    with FlakyProxy(s3_endpoint, methods=("PUT", "POST"), path_contains="/storm-write/ok/manifest/",
                    storm_s=STORM_S) as proxy:
        summary = pipeline.run(load_config(fast_config, [*base, "output.uri=s3://storm-write/ok",
                                                         f"storage.endpoint_url={proxy.url}",
                                                         f"storage.retry_budget_s={SURVIVED_BUDGET_S:g}"]))
    assert proxy.failed >= 3
    assert proxy.recovered == proxy.failed_paths  # every write the storm failed was sent again and went through
    check_exactly_once("s3://storm-write/ok", uris)
    assert summary["retries"]["write_retries"] > 0

    # a storm longer than the budget: the run fails and commits nothing
    with FlakyProxy(s3_endpoint, methods=("PUT", "POST"), path_contains="/storm-write/short/manifest/",
                    storm_s=LONG_STORM_S) as proxy:
        with pytest.raises(Exception, match=f"cannot write .* within storage.retry_budget_s={SHORT_BUDGET_S} "):
            pipeline.run(load_config(fast_config, [*base, "output.uri=s3://storm-write/short",
                                                   f"storage.endpoint_url={proxy.url}",
                                                   f"storage.retry_budget_s={SHORT_BUDGET_S}"]))
    assert not s3.glob("storm-write/short/runs/*/_SUCCESS")
    assert manifest.read("s3://storm-write/short").num_rows == 0


# ---------------------------------------------------------------- odd keys, duplicates, vanished objects

ODD_NAMES = ["with space.jpg", "한글 얼굴.jpg", "hash#tag.jpg", "what?.jpg", "per%20cent.jpg", "plus+sign.jpg"]


@pytest.mark.slow
def test_odd_keys_duplicates_and_vanished_objects(s3, fast_config, ray_local, tmp_path):
    """Keys with spaces, Hangul, #, ?, %, + and `::` are read and scored like any other (a `#` in a plain
    object's key is part of its name; `a::b.jpg` is that object, not fsspec's chained URL `a` through
    `b.jpg`); a manifest that lists objects twice gets one row each and says how many were duplicated;
    a vanished object is an error row that says so. Hostile rows of an S3 manifest: a local file
    (`file:///etc/hostname`), an unknown or uninstalled scheme -- error rows, never read and never a
    failed task; an http(s) object over image.max_bytes from a server that ignores Range -- an error
    row; a blank row names no input and is counted."""
    from cafi.samples import draw_face, encode

    s3.mkdir("odd")
    uris = []
    for i, name in enumerate(ODD_NAMES):
        s3.pipe(f"odd/in/{name}", encode(draw_face(160, 100 + i), "JPEG"))
        uris.append(f"s3://odd/in/{name}")
    listed = sorted("s3://" + k for k in s3.find("odd/in"))
    assert sorted(listed) == sorted(uris)  # the listing gives the keys back as they are
    s3.pipe("odd/in/a", b"another object")  # what `a::b.jpg` was read as (not listed: no image suffix)
    s3.pipe("odd/in/a::b.jpg", encode(draw_face(160, 120), "JPEG"))
    uris.append("s3://odd/in/a::b.jpg")
    vanished = "s3://odd/in/gone #1.jpg"
    refused = ["file:///etc/hostname", "foo://b/x.jpg", "sftp://host/x.jpg"]
    big = tmp_path / "web" / "big.jpg"
    big.parent.mkdir()
    big.write_bytes(encode(draw_face(160, 121), "JPEG") + os.urandom(3 << 20))
    with ServerIgnoringRange(big.parent) as web:  # serves the run and the export below
        csv = tmp_path / "list.csv"
        pd.DataFrame({"uri": uris + uris[:2] + uris[:1] + [vanished, *refused, f"{web}/big.jpg", ""]}).to_csv(
            csv, index=False)
        s3.put(str(csv), "odd/lists/list.csv")
        summary = pipeline.run(load_config(fast_config, ["input.manifest=s3://odd/lists/list.csv",
                                                         "output.uri=s3://odd/out", "input.schemes=[s3,http]",
                                                         "image.max_bytes=2000000", *SMALL_BLOCKS]))
        # the curated set of every row: what the run could not name is not read for it either
        from cafi.export import export

        done = export("s3://odd/out", "s3://odd/export", decision="all")
    hostile = [vanished, *refused, f"{web}/big.jpg"]
    assert summary["inputs"] == len(uris) + len(hostile) and summary["duplicate_inputs"] == 3
    assert summary["input"]["blank_uris"] == 1
    rows = check_exactly_once("s3://odd/out", [*uris, *hostile])
    for uri in uris:
        assert rows[uri]["status"] in ("scored", "no_face"), (uri, rows[uri]["error"])
    assert rows[vanished]["status"] == "error" and "not found" in rows[vanished]["error"]
    for uri in refused[:1]:
        assert rows[uri]["status"] == "error" and "scheme 'file' is not allowed" in rows[uri]["error"]
    for uri in refused[1:]:
        assert rows[uri]["status"] == "error" and "is not allowed for inputs" in rows[uri]["error"]
    assert rows[f"{web}/big.jpg"]["status"] == "error" and "too large" in rows[f"{web}/big.jpg"]["error"]
    assert done["skipped"] == {"not_allowed": 3, "not_found": 1, "too_large": 1}, done
    assert done["samples"] == len(uris) and done["selected"] == len(uris) + len(hostile)
    # the same keys by prefix listing: every one read, none an error row
    summary = pipeline.run(load_config(fast_config, ["input.uri=s3://odd/in/", "output.uri=s3://odd/out2",
                                                     *SMALL_BLOCKS]))
    rows = check_exactly_once("s3://odd/out2", uris)
    assert all(r["status"] != "error" for r in rows.values()), rows


if __name__ == "__main__":
    import json
    import logging
    import sys

    logging.basicConfig(level=os.environ.get("CAFI_LOG_LEVEL", "WARNING"))
    scenario, payload = sys.argv[1], json.loads(sys.argv[2])
    {"node_loss": _scenario_node_loss}[scenario](payload)
