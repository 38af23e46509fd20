"""Stage placement on a multi-node Ray cluster, and GPU pools that make an autoscaler add GPU workers.

The two cluster scenarios run in a fresh interpreter each (`python tests/test_cluster_placement.py
<scenario> <json>`): they start their own Ray cluster, and the session-wide `ray_local` fixture
of this process must not see it. Each scenario prints one JSON line of what it observed; the
tests assert on that. The "GPU" is a logical resource: the models run on CPU here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cafi import autoscale
from cafi.config import load_config
from cafi.stages import specs
from cafi.stages.actor import FusedModels

pytestmark = pytest.mark.slow  # multi-node ray.cluster_utils clusters

try:  # tests/ is a package under pytest; a scenario runs this file as a script
    from .scenarios import emit, free_port, run_scenario, stop, wait_for_port
except ImportError:
    from scenarios import emit, free_port, run_scenario, stop, wait_for_port  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------- pool sizing (no cluster)

def _cfg(tmp_path, *overrides):
    return load_config([], ["input.uri=/in", f"output.uri={tmp_path}/out", "ray.fuse_models=false", *overrides])


GPU_STAGES = ("models.serfiq.num_gpus=0.5", "models.serfiq.max_actors=8",
              "models.dbcnn.num_gpus=1", "models.dbcnn.max_actors=3", "models.dbcnn.num_cpus=2")


def test_gpu_pools_are_the_stages_that_ask_for_gpus(tmp_path):
    cfg = _cfg(tmp_path, *GPU_STAGES)
    pools = {p.name: p for p in autoscale.gpu_pools(cfg)}
    assert set(pools) == {"serfiq", "dbcnn"}
    assert pools["dbcnn"].bundle == {"CPU": 2.0, "GPU": 1.0} and pools["dbcnn"].max_actors == 3
    bundles = autoscale.bundles_at_max(cfg)
    assert len(bundles) == 11 and sum(b["GPU"] for b in bundles) == 8 * 0.5 + 3
    assert autoscale.gpu_pools(_cfg(tmp_path)) == []  # the CPU-only defaults have none

    fused = autoscale.gpu_pools(_cfg(tmp_path, *GPU_STAGES, "ray.fuse_models=true"))
    assert [(p.name, p.num_gpus, p.num_cpus, p.max_actors) for p in fused] == [("fused", 1.0, 2.0, 8)]


def test_sized_starts_gpu_pools_at_full_size_capped_by_the_work(tmp_path):
    cfg = _cfg(tmp_path, *GPU_STAGES, "ray.scale_gpu_pools=always", "models.serfiq.batch_size=10")
    big = autoscale.sized(cfg, rows=10_000)
    assert (big.models.serfiq.min_actors, big.models.dbcnn.min_actors) == (8, 3)
    assert (big.models.serfiq.max_actors, big.models.dbcnn.max_actors) == (8, 3)  # fixed: started once, kept
    assert (big.models.detector.min_actors, big.models.parser.min_actors) == (1, 1)  # CPU pools untouched
    assert cfg.models.serfiq.min_actors == 1  # the caller's config is not changed
    small = autoscale.sized(cfg, rows=25)  # serfiq: 3 batches of 10; dbcnn: 4 batches of 8, capped at 3
    assert (small.models.serfiq.min_actors, small.models.dbcnn.min_actors) == (3, 3)
    assert (small.models.serfiq.max_actors, small.models.dbcnn.max_actors) == (3, 3)

    fused = autoscale.sized(_cfg(tmp_path, *GPU_STAGES, "ray.fuse_models=true", "ray.scale_gpu_pools=always"))
    assert {getattr(fused.models, k).min_actors for k in specs.sections()} == {8, 3, 1}
    strategy = FusedModels.resources(fused, specs.specs_for(fused))["compute"]
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (8, 8, 8)


def test_sized_leaves_the_embedded_local_ray_and_never_alone(tmp_path):
    import ray

    assert not ray.is_initialized() or not autoscale.joined_existing_cluster()
    for mode in ("auto", "never"):
        cfg = _cfg(tmp_path, *GPU_STAGES, f"ray.scale_gpu_pools={mode}")
        assert autoscale.sized(cfg, rows=10_000) is cfg
    with pytest.raises(Exception, match="ray.scale_gpu_pools"):
        _cfg(tmp_path, "ray.scale_gpu_pools=sometimes")


def test_auto_is_off_on_the_embedded_local_ray(ray_local, tmp_path):
    assert not autoscale.joined_existing_cluster()
    cfg = _cfg(tmp_path, *GPU_STAGES)
    assert not autoscale.active(cfg)


# ---------------------------------------------------------------- scenarios (separate interpreter)

def test_model_stages_on_a_cpu_node_and_a_gpu_node(fast_config, tmp_path):
    """SER-FIQ and DBCNN actors run on the GPU node only; every other stage asks for CPUs only."""
    from cafi.samples import write_samples

    inp = tmp_path / "in"
    write_samples(str(inp), count=4, unusual=False, broken=True)
    n_files = sum(len(f) for _, _, f in os.walk(inp))
    out = tmp_path / "out"
    seen = run_scenario(__file__, "placement", {"files": list(fast_config), "input": str(inp), "output": str(out)},
                         timeout=400)

    by_stage: dict[str, list[dict]] = {}
    for actor in seen["actors"]:
        for stage in ("detect", "parse", "serfiq", "dbcnn"):
            if f"({stage})" in (actor["repr_name"] or "") or f"({stage})" in actor["class_name"]:
                by_stage.setdefault(stage, []).append(actor)
    assert set(by_stage) == {"detect", "parse", "serfiq", "dbcnn"}, seen["actors"]
    for stage in ("serfiq", "dbcnn"):
        for actor in by_stage[stage]:
            assert actor["node_id"] == seen["gpu_node"], (stage, actor)
            assert actor["required_resources"].get("GPU") == 0.5, (stage, actor)
    for stage in ("detect", "parse"):
        for actor in by_stage[stage]:
            assert not actor["required_resources"].get("GPU"), (stage, actor)
    # read/decode and decide are tasks: none of them held a GPU
    assert seen["tasks"], "no task was recorded"
    assert all(not t["required_resources"].get("GPU") for t in seen["tasks"]), seen["tasks"]

    counts = seen["counts"]
    assert counts["rows"] == counts["distinct_uris"] == n_files == 10
    assert counts["status"] == {"scored": 4, "error": 6}
    from cafi import manifest

    table = manifest.read(str(out))
    assert table.num_rows == n_files
    assert sorted(set(table.column("status").to_pylist())) == ["error", "scored"]


def test_pinned_gpu_pool_makes_the_autoscaler_add_gpu_workers_from_zero(tmp_path):
    """A cluster autoscaler (Ray's own, with its fake multi-node provider) whose GPU node type starts
    at zero: the pool cafi sizes for the GPU stage grows to max_actors on autoscaled GPU workers."""
    seen = run_scenario(__file__, "autoscale", {"output": str(tmp_path / "out")}, timeout=300)
    assert seen["gpus_before"] == 0
    assert seen["gpu_workers_added"] >= 2
    assert seen["pool"] == {"min_size": 2, "max_size": 2}
    # two actors, one per autoscaled GPU worker (from the GCS actor table: which of them Ray Data then
    # handed blocks to depends on when each was ready, so the rows do not say)
    assert len(seen["actor_nodes"]) == 2, seen
    assert set(seen["row_nodes"]) <= set(seen["actor_nodes"]), seen
    assert seen["rows"] == 16


# ---------------------------------------------------------------- scenario bodies

def _scenario_placement(args: dict) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from cafi import pipeline

    dashboard = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "temp_dir": os.path.join(args["tmp"], "ray")})
    try:
        gpu = cluster.add_node(num_cpus=2, num_gpus=1)
        ray.init(address=cluster.address)
        # one actor pool per model (the unfused path): each lands where its own resources say
        overrides = [f"input.uri={args['input']}", f"output.uri={args['output']}", "ray.progress_bars=false",
                     "ray.fuse_models=false"]
        for stage in ("serfiq", "dbcnn"):
            overrides += [f"models.{stage}.num_gpus=0.5", f"models.{stage}.num_cpus=0.5"]
        cfg = load_config(args["files"], overrides)
        summary = pipeline.run(cfg)
        api = f"http://127.0.0.1:{dashboard}"
        actors = [{"class_name": a.class_name, "repr_name": a.repr_name, "node_id": a.node_id,
                   "required_resources": a.required_resources or {}, "state": a.state}
                  for a in list_actors(address=api, detail=True, limit=10_000, raise_on_missing_output=False)]
        tasks = [{"name": t.name, "required_resources": t.required_resources or {}}
                 for t in list_tasks(address=api, detail=True, limit=10_000, raise_on_missing_output=False,
                                     filters=[("type", "=", "NORMAL_TASK")])]
        emit({"gpu_node": gpu.node_id, "head_node": cluster.head_node.node_id, "actors": actors,
               "tasks": tasks, "counts": summary["counts"]})
    finally:
        ray.shutdown()
        cluster.shutdown()


class _GpuStandIn:
    """Holds the GPU stage's place in the pool (same resources, same pool sizing), without torch."""

    def __init__(self):
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        time.sleep(0.5)
        batch["node"] = [self.node] * len(batch["id"])
        return batch


def _autoscaling_cluster_config(gcs_port: int) -> dict:
    """A cluster-launcher config: CPU-only head, GPU worker type that starts at zero.

    The fake multi-node provider starts each "instance" as a local raylet. It is loaded as an
    external provider because the installed Ray does not ship the fake provider's defaults file.
    """
    provider = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
    empty: list = []
    return {
        "cluster_name": "cafi-autoscale-test", "max_workers": 2, "idle_timeout_minutes": 5,
        "upscaling_speed": 10,
        "provider": {"type": "external", "module": provider, "gcs_address": f"127.0.0.1:{gcs_port}",
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": empty, "file_mounts_sync_continuously": False,
        "rsync_exclude": empty, "rsync_filter": empty, "initialization_commands": empty,
        "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


def _scenario_autoscale(args: dict) -> None:
    import yaml

    tmp, gcs = args["tmp"], free_port()
    config_path = os.path.join(tmp, "autoscaler.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(_autoscaling_cluster_config(gcs), fh)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = open(os.path.join(tmp, "ray-start.log"), "w")  # closed when this interpreter exits
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={tmp}/ray",
         f"--dashboard-agent-listen-port={free_port()}", f"--autoscaling-config={config_path}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import ray

    try:
        wait_for_port(gcs, 120)
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        gpus_before = ray.cluster_resources().get("GPU", 0)
        cfg = load_config([], ["input.uri=/unused", f"output.uri={args['output']}", "ray.progress_bars=false",
                               "models.serfiq.num_gpus=1", "models.serfiq.num_cpus=0.5",
                               "models.serfiq.max_actors=2", "models.serfiq.batch_size=2"])
        resources = FusedModels.resources(autoscale.sized(cfg, rows=16), [specs.spec("serfiq")])
        import ray.data

        ds = ray.data.range(16, override_num_blocks=8).map_batches(_GpuStandIn, **resources)
        rows = ds.take_all()
        added = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
        stand_ins = [a for a in ray._private.state.actors().values() if "_GpuStandIn" in a["ActorClassName"]]
        strategy = resources["compute"]
        emit({"gpus_before": gpus_before, "gpu_workers_added": added, "rows": len(rows),
               "pool": {"min_size": strategy.min_size, "max_size": strategy.max_size},
               "actor_nodes": sorted({a["Address"]["NodeID"] for a in stand_ins} & gpu_nodes),
               "row_nodes": sorted({r["node"] for r in rows})})
    finally:
        ray.shutdown()
        stop(head)


if __name__ == "__main__":
    logging_level = os.environ.get("CAFI_LOG_LEVEL", "WARNING")
    import logging

    logging.basicConfig(level=logging_level)
    scenario, payload = sys.argv[1], json.loads(sys.argv[2])
    {"placement": _scenario_placement, "autoscale": _scenario_autoscale}[scenario](payload)
