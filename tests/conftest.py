"""Shared fixtures: synthetic checkpoints, a real local Ray, a real moto S3 server on loopback."""

from __future__ import annotations

import os
import socket

import pytest

# Credentials for the loopback S3 server only; set before any AWS client exists.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "cafi-test-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "cafi-test-secret-7f3a9c")  # tests check it never leaks
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# Files synth_dir does not write: MANIQA's random 136 M parameters (543 MB, seconds to build; also the
# MANIQA-backbone SDD-FIQA regressor's) are not worth a session fixture; the layout is checked on the meta
# device (tests/test_scorers.py) and the strict load in tests/test_specs.py (slow tier). Their toy-width
# variants are written.
NOT_IN_SYNTH_DIR = ("maniqa_koniq", "sddfiqa_maniqa")
TINY = {"maniqa": "maniqa_tiny", "musiq": "musiq_tiny"}
# fast_config's end-to-end runs also take SER-FIQ's and DBCNN's toy widths (46 and 6 ms a face on one
# thread, against 188 and 137): the published sizes are what synth_dir and the model tests load.
FAST_ARCHS = {**TINY, "serfiq": "arcface_ir_se50_tiny", "dbcnn": "dbcnn_tiny", "crfiqa": "crfiqa_iresnet50"}


def _made_once(tmp_path_factory, name: str, make) -> str:
    """A directory that session fixtures only read, made once for the whole run. Under pytest-xdist
    (`-n 2`: not the default, see README) the first worker makes it and the others wait on the lock
    and reuse it, pytest-xdist's documented pattern for session fixtures; without it, once per session."""
    from filelock import FileLock  # a dependency of ray

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temp root, shared by its workers
    d = root / name
    with FileLock(str(d) + ".lock"):
        if not (d / ".made").is_file():
            d.mkdir(exist_ok=True)
            make(str(d))
            (d / ".made").touch()
    return str(d)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    """Random checkpoints in the published formats (resnet50 detector, bisenet parser) + synthetic.yaml,
    and every other published record's file (and every test arch's) beside them."""
    from cafi.models.registry import PUBLISHED, UNPUBLISHED
    from cafi.synth import synth, write_checkpoint

    def make(d: str) -> None:
        synth(d, archs=TINY)
        for arch, rec in {**PUBLISHED, **UNPUBLISHED}.items():
            if arch not in NOT_IN_SYNTH_DIR and not os.path.isfile(os.path.join(d, rec.file_name)):
                write_checkpoint(arch, d)

    return _made_once(tmp_path_factory, "weights", make)


@pytest.fixture(scope="session")
def synth_config(synth_dir) -> str:
    return os.path.join(synth_dir, "synthetic.yaml")


@pytest.fixture(scope="session")
def fast_config(tmp_path_factory) -> list[str]:
    """Synthetic weights, the small detector, 128-pixel crops and few SER-FIQ samples: the real
    architectures and code paths at a size that keeps CPU tests quick."""
    return [os.path.join(_made_once(tmp_path_factory, "fast", _write_fast_config), name)
            for name in ("synthetic.yaml", "fast.yaml")]


def _write_fast_config(d: str) -> None:
    from cafi.synth import synth

    # the optional scorers the pipeline tests run (tests/test_rescore.py, the GPU script's dry run): each
    # other one's random checkpoint costs seconds to write (CR-FIQA's iResNet100, SDD-FIQA's IR-50); add a
    # kind here to run it. MANIQA and MUSIQ run at toy widths (their published sizes cost seconds a face).
    synth(d, detector="retinaface_mobile0.25",
          scorers=("magface", "topiq_face", "crfiqa", "sddfiqa", "classic", "maniqa", "musiq"), archs=FAST_ARCHS)
    extra = os.path.join(d, "fast.yaml")
    with open(extra, "w") as fh:
        fh.write(
            "image:\n  crop_size: 128\n"
            "models:\n  serfiq:\n    samples: 8\n    r: 0.54\n    torch_threads: 0\n"
            "  parser:\n    input_size: 128\n    torch_threads: 0\n"
            "  dbcnn:\n    batch_size: 4\n    torch_threads: 0\n"
            "  detector:\n    torch_threads: 0\n"
            # One fused model actor (the default), one torch thread: each run starts one actor, not one
            # per model (the separate pools run in tests/test_pipeline.py and the placement scenario).
            # The report is written only where a test looks at it (output.report: true).
            "ray:\n  progress_bars: false\n  fuse_models: true\n"
            "output:\n  report: false\n"
            "decision:\n  min_serfiq: 0.5\n"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (as s3fs's own tests run it); exported as AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A fresh s3fs filesystem against the loopback server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, anon=False)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One real local Ray for the session: 2 CPUs, like this machine. Workers inherit the
    loopback S3 endpoint from the environment, as a cluster's workers would."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    yield ray
    ray.shutdown()
