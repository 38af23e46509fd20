"""One schema: defaults documented in configs/default.yaml, composition, overrides, clear errors."""

import os

import pytest
from omegaconf import OmegaConf

from cafi.config import JobConfig, load_config
from cafi.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_YAML = os.path.join(ROOT, "configs", "default.yaml")
BASE = ["input.uri=/data/in", "output.uri=/data/out"]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_default_yaml_documents_every_key_with_the_schema_defaults():
    documented = _flatten(OmegaConf.to_container(OmegaConf.load(DEFAULT_YAML)))
    schema = _flatten(OmegaConf.to_container(OmegaConf.structured(JobConfig)))
    assert set(documented) == set(schema)
    for key, value in schema.items():
        if value == "???":
            continue
        assert documented[key] == value, key
    # every key line carries a comment (the file is the documentation)
    text = open(DEFAULT_YAML).read().splitlines()
    for line in text:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped.endswith(":") is False and ":" in stripped:
            leaf = stripped.split(":", 1)[0]
            if leaf in ("batch_size", "num_cpus", "num_gpus", "min_actors", "max_actors", "torch_threads",
                        "weights"):
                continue  # the shared stage keys are documented once above the model stages
            assert "#" in line, f"undocumented key: {line!r}"


def test_every_shipped_config_loads():
    for name in ("default.yaml", "local.yaml", "cluster.yaml", "smoke.yaml"):
        load_config([os.path.join(ROOT, "configs", name)], BASE)


def test_compose_and_dotlist_override(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("models:\n  dbcnn:\n    batch_size: 16\n  serfiq:\n    samples: 50\n")
    b.write_text("models:\n  dbcnn:\n    batch_size: 32\n")
    cfg = load_config([str(a), str(b)], BASE + ["models.serfiq.alpha=99"])
    assert cfg.models.dbcnn.batch_size == 32  # later file wins
    assert cfg.models.serfiq.samples == 50  # earlier file kept where not overridden
    assert cfg.models.serfiq.alpha == 99.0
    cfg = load_config([str(a), str(b)], BASE + ["models.dbcnn.batch_size=64"])
    assert cfg.models.dbcnn.batch_size == 64  # dotlist last


@pytest.mark.parametrize(
    "override, key_in_message",
    [
        ("models.dbcnn.batch_size=-1", "models.dbcnn.batch_size"),
        ("models.dbcnn.batch_size=abc", "models.dbcnn.batch_size"),
        ("models.detector.arch=yolo", "models.detector.arch"),
        ("models.parser.arch=segformer", "models.parser.arch"),
        ("decision.min_serfiq=1.5", "decision.min_serfiq"),
        ("decision.min_mask_fraction=-0.1", "decision.min_mask_fraction"),
        ("models.serfiq.dropout=1.0", "models.serfiq.dropout"),
        ("models.serfiq.samples=1", "models.serfiq.samples"),
        ("models.nonsense=1", "models.nonsense"),
        ("models.dbcnn.weights.sha256=abc", None),
        ("models.parser.face_labels=[skin,tail]", "models.parser.face_labels"),
        ("models.serfiq.max_actors=0", "models.serfiq.max_actors"),
        ("output.partition_by=[uri]", "output.partition_by"),
        ("image.crop_size=7", "image.crop_size"),
        ("ray.cpu_replicas=-1", "ray.cpu_replicas"),
        ("ray.cpu_replicas=65", "ray.cpu_replicas"),
        ("ray.cpu_replicas=two", "ray.cpu_replicas"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key_in_message):
    """The schema's checks (cafi/config.py) and the model tables' (the stage specs), as a run makes them."""
    from cafi.stages import specs

    with pytest.raises(ConfigError) as err:
        specs.validate(load_config([], BASE + [override]))
    key = key_in_message or "models.dbcnn.weights"
    assert key in str(err.value)


def test_weights_need_uri_and_a_full_sha256():
    with pytest.raises(ConfigError, match="models.dbcnn.weights.sha256"):
        load_config([], BASE + ["models.dbcnn.weights.uri=/w.pth", "models.dbcnn.weights.sha256=" + "a" * 63])
    cfg = load_config([], BASE + ["models.dbcnn.weights.uri=/w.pth", "models.dbcnn.weights.sha256=" + "A" * 64])
    assert cfg.models.dbcnn.weights.uri == "/w.pth"


def test_required_and_exclusive_keys():
    with pytest.raises(ConfigError, match="output.uri"):
        load_config([], ["input.uri=/x"])
    with pytest.raises(ConfigError, match="input.uri / input.manifest"):
        load_config([], ["output.uri=/o"])
    with pytest.raises(ConfigError, match="input.uri / input.manifest"):
        load_config([], ["output.uri=/o", "input.uri=/x", "input.manifest=/m.parquet"])


def test_unknown_key_in_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("decision:\n  min_serfik: 0.4\n")
    with pytest.raises(ConfigError, match="decision.min_serfik"):
        load_config([str(bad)], BASE)
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "nope.yaml")], BASE)
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], BASE + ["decision.min_serfiq"])


def test_parser_labels_are_checked_against_the_chosen_architecture():
    # 'hair' exists in both label orders; the index differs, the name check must pass for both
    for arch in ("bisenet", "parsenet"):
        cfg = load_config([], BASE + [f"models.parser.arch={arch}", "models.parser.face_labels=[skin,hair]"])
        assert cfg.models.parser.face_labels == ["skin", "hair"]


def test_ray_data_gives_its_tasks_and_actors_the_retries_the_job_relies_on():
    """Read and decide tasks retried without limit (lineage reconstruction after a lost node), model
    actors restarted and their calls re-run without limit: the job no longer passes these to
    map_batches (deprecated since Ray 2.60), so a Ray release that changes Ray Data's defaults must
    fail here, not first in a node-loss run."""
    import ray
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data._internal.remote_fn import cached_remote_fn

    from cafi.ray_setup import RAY_DATA_RETRIES, configure_data_context

    ctx = configure_data_context(load_config([], ["input.uri=/in", "output.uri=/out"]))

    def map_task():  # a function Ray Data has not wrapped before
        return None

    task_options = cached_remote_fn(map_task)._default_options
    assert {k: task_options[k] for k in RAY_DATA_RETRIES["task"]} == RAY_DATA_RETRIES["task"]
    assert task_options["retry_exceptions"] == [ray.exceptions.RaySystemError]  # never our own exceptions
    actor_options = ActorPoolMapOperator._apply_default_remote_args({}, ctx)
    assert {k: actor_options[k] for k in RAY_DATA_RETRIES["actor"]} == RAY_DATA_RETRIES["actor"]
    assert ctx.actor_task_retry_on_errors is False and ctx.max_errored_blocks == 0


def test_object_store_cap_reaches_ray_data():
    """ray.object_store_mb bounds the job's blocks in the object store (pixels in flight)."""
    import math

    from cafi.ray_setup import configure_data_context

    base = ["input.uri=/in", "output.uri=/out"]
    ctx = configure_data_context(load_config([], [*base, "ray.object_store_mb=256", "ray.progress_bars=false"]))
    assert ctx.execution_options.resource_limits.object_store_memory == 256 * 2**20
    assert ctx.enable_progress_bars is False
    ctx = configure_data_context(load_config([], [*base, "ray.object_store_mb=null"]))
    assert ctx.execution_options.resource_limits.object_store_memory == math.inf  # Ray Data's own share
    with pytest.raises(ConfigError, match="ray.object_store_mb"):
        load_config([], [*base, "ray.object_store_mb=8"])
