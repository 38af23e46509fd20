"""Checkpoints by URI + sha256: fetch once per node, verify, load with weights_only, clear errors."""

import multiprocessing as mp
import os
import pickle
import socket

import pytest
import torch

from cafi.errors import WeightsError
from cafi.models import arcface, dbcnn, face_parsing, retinaface
from cafi.models.registry import PUBLISHED, checkpoint
from cafi.weights import Checkpoint, fetch, load_into, read_state_dict, sha256_of


def _ckpt(path, model="dbcnn", state_key="params", sha=None):
    return Checkpoint(model=model, uri=str(path), sha256=sha or sha256_of(str(path)), state_key=state_key)


def test_synthetic_checkpoints_have_the_published_names_keys_and_wrapping(synth_dir):
    for arch, rec in PUBLISHED.items():
        path = os.path.join(synth_dir, rec.file_name)
        assert os.path.isfile(path), rec.file_name
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if arch == "dbcnn":
            assert list(raw) == ["params"]  # pyiqa wraps the state dict under 'params'
            state = raw["params"]
            assert state["features1.0.weight"].shape == (64, 3, 3, 3)
            assert state["features1.28.weight"].shape == (512, 512, 3, 3)
            assert state["features2.0.weight"].shape == (48, 3, 3, 3)
            assert state["features2.25.running_var"].shape == (128,)
            assert state["fc.weight"].shape == (1, 512 * 128)
        elif arch.startswith("retinaface"):
            assert all(k.startswith("module.") for k in raw)  # DataParallel-saved originals
        elif arch == "arcface_ir_se50":
            assert raw["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
            assert raw["body.23.res_layer.5.fc1.weight"].shape == (32, 512, 1, 1)
        else:
            assert "module." not in next(iter(raw))


def test_fetch_local_verifies_in_place(synth_dir):
    path = os.path.join(synth_dir, PUBLISHED["dbcnn"].file_name)
    assert fetch(_ckpt(path), "/nonexistent-cache") == path


def test_wrong_sha256_names_model_and_uri(synth_dir):
    path = os.path.join(synth_dir, PUBLISHED["dbcnn"].file_name)
    with pytest.raises(WeightsError) as err:
        fetch(_ckpt(path, sha="0" * 64), "/tmp")
    assert "dbcnn" in str(err.value) and path in str(err.value) and "sha256 mismatch" in str(err.value)


def test_missing_file_and_unreachable_uri(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        fetch(Checkpoint("serfiq", str(tmp_path / "none.pth"), "a" * 64), str(tmp_path))
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(WeightsError) as err:
        fetch(Checkpoint("serfiq", uri, "a" * 64), str(tmp_path))
    assert "serfiq" in str(err.value) and uri in str(err.value)
    assert not [p for p in os.listdir(tmp_path / ("a" * 64)) if p.endswith(".pth")]  # no partial file left


def test_s3_fetch_downloads_once_into_the_cache(s3, synth_dir, tmp_path):
    s3.mkdir("weights-bucket")
    src = os.path.join(synth_dir, PUBLISHED["parsenet"].file_name)
    s3.put(src, "weights-bucket/m/parsing_parsenet.pth")
    ck = Checkpoint("parser", "s3://weights-bucket/m/parsing_parsenet.pth", sha256_of(src))
    first = fetch(ck, str(tmp_path))
    assert first.startswith(str(tmp_path)) and sha256_of(first) == ck.sha256
    s3.rm("weights-bucket/m/parsing_parsenet.pth")  # the cached copy is used from now on
    assert fetch(ck, str(tmp_path)) == first
    bad = Checkpoint("parser", "s3://weights-bucket/m/gone.pth", ck.sha256)
    with pytest.raises(WeightsError, match="parser: cannot fetch checkpoint s3://weights-bucket/m/gone.pth"):
        fetch(bad, str(tmp_path / "other"))


def _fetch_in_process(args):
    uri, sha, cache = args
    return fetch(Checkpoint("serfiq", uri, sha), cache)


def test_concurrent_fetches_on_one_node_share_one_download(s3, s3_endpoint, synth_dir, tmp_path):
    s3.mkdir("weights-conc")
    src = os.path.join(synth_dir, PUBLISHED["bisenet"].file_name)
    s3.put(src, "weights-conc/parsing_bisenet.pth")
    sha = sha256_of(src)
    with mp.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_fetch_in_process, [("s3://weights-conc/parsing_bisenet.pth", sha, str(tmp_path))] * 4)
    assert len(set(paths)) == 1
    files = os.listdir(os.path.dirname(paths[0]))
    assert [f for f in files if ".partial" in f] == []
    assert sha256_of(paths[0]) == sha


def test_weights_only_refuses_a_pickle_with_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"params": Payload()}, fh)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(_ckpt(path), str(path))


def test_key_and_shape_mismatches_are_clear(synth_dir, tmp_path):
    bisenet_file = os.path.join(synth_dir, PUBLISHED["bisenet"].file_name)
    with pytest.raises(WeightsError) as err:
        load_into(face_parsing.build("parsenet"), _ckpt(bisenet_file, "parser", None), str(tmp_path))
    assert "parser" in str(err.value) and "missing" in str(err.value) and bisenet_file in str(err.value)
    state = dbcnn.build().state_dict()
    state["fc.weight"] = torch.zeros(1, 10)
    bad = tmp_path / "bad_shape.pth"
    torch.save({"params": state}, bad)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_into(dbcnn.build(), _ckpt(bad), str(tmp_path))
    torch.save(state, tmp_path / "unwrapped.pth")
    with pytest.raises(WeightsError, match="no 'params' entry"):
        load_into(dbcnn.build(), _ckpt(tmp_path / "unwrapped.pth"), str(tmp_path))


def test_module_prefix_is_stripped_and_load_is_strict(synth_dir, tmp_path):
    rec = PUBLISHED["retinaface_mobile0.25"]
    path = os.path.join(synth_dir, rec.file_name)
    net = load_into(retinaface.build("retinaface_mobile0.25"), _ckpt(path, "detector", None), str(tmp_path))
    raw = torch.load(path, weights_only=True)
    assert torch.equal(net.state_dict()["fpn.output1.0.weight"], raw["module.fpn.output1.0.weight"])


def test_published_records_are_the_config_defaults():
    ck = checkpoint("serfiq", "arcface_ir_se50", None)
    assert ck.uri.endswith("/v0.1.0/recognition_arcface_ir_se50.pth") and len(ck.sha256) == 64
    ck = checkpoint("dbcnn", "dbcnn", None)
    assert ck.uri.endswith("DBCNN_KonIQ10k-2de81c0a.pth") and ck.state_key == "params"
    assert ck.sha256.startswith("2de81c0a")  # pyiqa names files by their hash prefix
    assert arcface.build().output_layer[1].p == 0.5
