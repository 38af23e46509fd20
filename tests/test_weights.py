"""Checkpoints by URI + sha256: fetch once per node, verify, load with weights_only, clear errors."""

import hashlib
import multiprocessing as mp
import os
import pickle
import socket

import pytest
import torch

from cafi.config import WeightsConfig
from cafi.errors import ConfigError, WeightsError
from cafi.models import arcface, dbcnn, face_parsing, retinaface
from cafi.models.registry import PUBLISHED, checkpoint
from cafi.weights import Checkpoint, fetch, fetch_unpinned, load_into, read_state_dict, sha256_of


def _ckpt(path, model="dbcnn", state_key="params", sha=None):
    return Checkpoint(model=model, uri=str(path), sha256=sha or sha256_of(str(path)), state_key=state_key)


def test_synthetic_checkpoints_have_the_published_names_keys_and_wrapping(synth_dir):
    from tests.conftest import NOT_IN_SYNTH_DIR

    for arch, rec in PUBLISHED.items():
        if arch in NOT_IN_SYNTH_DIR:
            continue
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
        elif arch == "magface_iresnet100":
            # MagFace's training checkpoint: DDP-wrapped backbone + rank 0's shard of the margin head
            assert set(raw) == {"epoch", "arch", "state_dict", "optimizer"} and raw["arch"] == "iresnet100"
            state = raw["state_dict"]
            assert len(state) == 925 + 1
            assert state["parallel_fc.weight"].shape == (85744 // 8, 512)
            assert all(k.startswith("features.module.") for k in state if k != "parallel_fc.weight")
            assert state["features.module.conv1.weight"].shape == (64, 3, 3, 3)
            assert state["features.module.layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
            assert state["features.module.layer3.29.conv2.weight"].shape == (256, 256, 3, 3)
            assert state["features.module.layer4.2.prelu.weight"].shape == (512,)
            assert state["features.module.fc.weight"].shape == (512, 512 * 7 * 7)
            assert state["features.module.features.running_var"].shape == (512,)
        elif arch == "topiq_nr_face":
            assert list(raw) == ["params"]  # pyiqa's wrapping; the whole CFANet, backbone included
            state = raw["params"]
            assert len(state) == 524 and list(state)[:2] == ["h_emb", "w_emb"]
            assert state["h_emb"].shape == (1, 128, 32, 1) and state["w_emb"].shape == (1, 128, 1, 32)
            assert state["semantic_model.conv1.weight"].shape == (64, 3, 7, 7)
            assert state["semantic_model.layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
            assert "semantic_model.fc.weight" not in state  # timm's features_only drops the head
            assert state["weight_pool.4.splitconv.weight"].shape == (4096, 2048, 1, 1)
            assert state["weight_pool.0.weight_blk.4.weight"].shape == (1, 64, 3, 3)
            assert state["dim_reduce.1.0.weight"].shape == (256, 256, 1, 1)
            assert state["sa_attn_blks.4.layers.0.self_attn.in_proj_weight"].shape == (768, 256)
            assert state["attn_blks.3.layers.0.self_attn.in_proj_weight"].shape == (768, 256)  # unused, kept
            assert state["attn_blks.3.layers.0.multihead_attn.out_proj.weight"].shape == (256, 256)
            assert state["attn_blks.0.layers.0.norm3.bias"].shape == (256,)
            assert state["attn_pool.linear1.weight"].shape == (1024, 256)
            assert state["score_linear.6.weight"].shape == (1, 256)
            assert sum(v.numel() for k, v in state.items() if "running" not in k and "batches" not in k) == 45196934
        elif arch.startswith("crfiqa_"):
            # CR-FIQA's `<step>backbone.pth`: the backbone's plain state dict, quality head `qs` included
            depth = {"crfiqa_iresnet100": 100, "crfiqa_iresnet50": 50}[arch]
            assert len(raw) == (927 if depth == 100 else 477) and not any(k.startswith("module.") for k in raw)
            assert raw["conv1.weight"].shape == (64, 3, 3, 3)
            assert raw["layer3.13.conv2.weight"].shape == (256, 256, 3, 3)
            assert ("layer3.29.bn3.running_var" in raw) == (depth == 100)
            assert raw["fc.weight"].shape == (512, 512 * 7 * 7) and raw["features.running_mean"].shape == (512,)
            assert raw["qs.weight"].shape == (1, 512) and raw["qs.bias"].shape == (1,)
        elif arch == "sddfiqa_ir50":
            # TFace's R50(use_type="Qua") state dict, saved under DataParallel
            assert len(raw) == 340 and all(k.startswith("module.") for k in raw)
            assert list(raw)[:8] == ["module.input_layer.0.weight", *(f"module.input_layer.1.{k}" for k in (
                "weight", "bias", "running_mean", "running_var", "num_batches_tracked")), "module.input_layer.2.weight",
                "module.quality.1.weight"]
            assert raw["module.quality.1.weight"].shape == (512 * 7 * 7,)  # PReLU over the flattened map
            assert raw["module.quality.3.weight"].shape == (1, 512 * 7 * 7)
            assert raw["module.body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
            assert "module.body.4.shortcut_layer.0.weight" not in raw  # MaxPool2d(1, 1): no parameters
            assert raw["module.body.23.res_layer.3.weight"].shape == (512, 512, 3, 3)
        elif arch == "musiq_koniq":
            # pyiqa's converted file: a bare state dict (load_pretrained_network without weight_keys)
            assert len(raw) == 248 and list(raw)[:3] == ["conv_root.weight", "gn_root.weight", "gn_root.bias"]
            assert raw["conv_root.weight"].shape == (64, 3, 7, 7)
            assert raw["block1.conv_proj.weight"].shape == (256, 64, 1, 1)
            assert raw["embedding.weight"].shape == (384, 256 * 8 * 8)  # the 8x8x256 map of a 32-px patch
            assert raw["transformer_encoder.posembed_input.position_emb"].shape == (1, 100, 384)  # 10x10 hash
            assert raw["transformer_encoder.scaleembed_input.scale_emb"].shape == (3, 384)  # 224, 384, original
            assert raw["transformer_encoder.transformer.encoderblock_13.mlp.fc1.weight"].shape == (1152, 384)
            assert raw["head.weight"].shape == (1, 384)  # KonIQ-10k: one MOS output
        else:
            assert "module." not in next(iter(raw))


def test_every_published_record_names_its_licence_source_and_training_data():
    for arch, rec in PUBLISHED.items():
        assert rec.licence and rec.source and rec.training_data, arch
    nc = {a for a, r in PUBLISHED.items() if "NC" in r.licence or "Noncommercial" in r.licence}
    assert {"crfiqa_iresnet100", "crfiqa_iresnet50", "dbcnn", "topiq_nr_face", "parsenet", "maniqa_koniq",
            "musiq_koniq"} == nc


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


@pytest.mark.slow  # several processes racing for one download
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


def test_magface_record_renames_both_training_layouts_and_drops_the_margin_head():
    ck = checkpoint("magface", "magface_iresnet100", None)
    assert ck.sha256 == "cfeba792dada6f1f30d1e118aff077d493dd95dd76c77c30f57f90fd0164ad58"
    assert ck.state_key == "state_dict" and "1Bd87admxOZvbIOAyTkGEntsEz3fyMt7H" in ck.uri
    assert ck.strip_prefixes == ("features.module.", "module.features.")
    assert ck.drop_prefixes == ("parallel_fc.", "module.fc.")
    # configured weights keep the record's layout and renaming
    w = WeightsConfig(uri="/w/magface.pth", sha256="A" * 64)
    assert checkpoint("magface", "magface_iresnet100", w).drop_prefixes == ck.drop_prefixes


def test_a_record_without_a_published_digest_needs_the_config_to_name_one():
    with pytest.raises(ConfigError) as err:
        checkpoint("topiq_face", "topiq_nr_face", None)
    msg = str(err.value)
    assert "models.topiq_face.weights" in msg and "topiq_nr_cgfiqa_res50-0a8b8e4f.pth" in msg
    assert "cafi weights fetch" in msg and "0a8b8e4f" in msg
    ck = checkpoint("topiq_face", "topiq_nr_face", WeightsConfig(uri="/w/t.pth", sha256="0a8b8e4f" + "0" * 56))
    assert ck.state_key == "params" and ck.strip_prefixes == ("module.",)


def test_duplicate_keys_after_renaming_are_refused(tmp_path):
    t = torch.zeros(1)
    torch.save({"state_dict": {"features.module.bn2.weight": t, "module.features.bn2.weight": t}}, tmp_path / "m.pth")
    ck = Checkpoint("magface", str(tmp_path / "m.pth"), "0" * 64, "state_dict",
                    strip_prefixes=("features.module.", "module.features."))
    with pytest.raises(WeightsError, match="twice"):
        read_state_dict(ck, str(tmp_path / "m.pth"))


def test_fetch_unpinned_returns_the_digest_and_checks_the_name_prefix(tmp_path):
    src = tmp_path / "src.pth"
    torch.save({"params": {"w": torch.ones(3)}}, src)
    sha = sha256_of(str(src))
    path, digest = fetch_unpinned("topiq_face", str(src), "t.pth", str(tmp_path / "cache"), expect_prefix=sha[:8])
    assert digest == sha and sha256_of(path) == sha and path.endswith(os.path.join(sha, "t.pth"))
    with pytest.raises(WeightsError, match="its name says it starts with 00000000"):
        fetch_unpinned("topiq_face", str(src), "t.pth", str(tmp_path / "cache"), expect_prefix="00000000")
    assert not os.listdir(tmp_path / "cache" / "unpinned")  # nothing half-written stays


def test_a_web_page_instead_of_the_file_is_named_as_such(tmp_path):
    page = tmp_path / "drive.html"
    page.write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>")
    with pytest.raises(WeightsError, match="sent a web page"):
        fetch(Checkpoint("magface", f"file://{page}", "0" * 64), str(tmp_path / "c"))


def _memory_source(tmp_path, data: bytes) -> str:
    """A remote checkpoint in fsspec's in-process memory filesystem (a URI with a signature in its
    query): fetch() caches it like an object in a bucket."""
    import fsspec

    uri = f"memory://cafi-weights/{tmp_path.name}/w.pth?sig=sig-77d2c4e0aa"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe(path, data)
    return uri


def _state_bytes(tmp_path) -> bytes:
    torch.save({"params": {"w": torch.arange(4.0)}}, tmp_path / "good.pth")
    return (tmp_path / "good.pth").read_bytes()


def _counting_downloads(monkeypatch) -> list[str]:
    """The partial file of every download fetch() makes, in order."""
    from cafi import weights

    partials, real = [], weights._download

    def download(model, uri, partial, storage):
        partials.append(partial)
        return real(model, uri, partial, storage)

    monkeypatch.setattr(weights, "_download", download)
    return partials


def test_a_corrupted_cached_copy_is_fetched_again_once_and_loads(tmp_path, monkeypatch):
    good = _state_bytes(tmp_path)
    ck = Checkpoint("dbcnn", _memory_source(tmp_path, good), hashlib.sha256(good).hexdigest(), "params")
    partials = _counting_downloads(monkeypatch)
    cache = str(tmp_path / "cache")
    path = fetch(ck, cache)
    with open(path, "r+b") as fh:  # a truncated, then scribbled-over copy in the cache
        fh.truncate(len(good) // 2)
        fh.write(b"garbage")
    assert fetch(ck, cache) == path and sha256_of(path) == ck.sha256
    assert len(partials) == 2  # the first fetch, then once again for the corrupted copy
    assert torch.equal(read_state_dict(ck, path)["w"], torch.arange(4.0))
    assert fetch(ck, cache) == path and len(partials) == 2  # a good copy is not fetched again
    assert [f for f in os.listdir(os.path.dirname(path)) if ".partial" in f] == []


def test_a_source_that_keeps_sending_a_bad_file_is_one_clear_error(tmp_path, monkeypatch):
    good = _state_bytes(tmp_path)
    uri = _memory_source(tmp_path, b"not the pinned checkpoint")
    ck = Checkpoint("dbcnn", uri, hashlib.sha256(good).hexdigest(), "params")
    cache = tmp_path / "cache"
    cached = cache / ck.sha256 / "w.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a corrupted copy")
    partials = _counting_downloads(monkeypatch)
    with pytest.raises(WeightsError) as err:
        fetch(ck, str(cache))
    msg = str(err.value)
    assert len(partials) == 1  # fetched again once, not in a loop
    assert msg.startswith("dbcnn: sha256 mismatch for memory://cafi-weights/") and "w.pth:" in msg
    assert "sig-77d2c4e0aa" not in msg  # the checkpoint is named by its redacted URI
    assert hashlib.sha256(b"not the pinned checkpoint").hexdigest() in msg and "cached copy" in msg
    assert os.listdir(cached.parent) == [".lock"]  # neither the bad copy nor a partial file stays


def test_partial_downloads_are_named_per_host_process_and_call(tmp_path, monkeypatch):
    """A cache shared between nodes (NFS): two nodes whose downloaders have the same pid must not
    write into one partial file."""
    good = _state_bytes(tmp_path)
    ck = Checkpoint("dbcnn", _memory_source(tmp_path, good), hashlib.sha256(good).hexdigest(), "params")
    target_dir = tmp_path / "cache" / ck.sha256
    target_dir.mkdir(parents=True)
    other_node = target_dir / f"w.pth.partial.{os.getpid()}"  # another host's download in progress
    other_node.write_bytes(b"half of another node's download")
    partials = _counting_downloads(monkeypatch)
    path = fetch(ck, str(tmp_path / "cache"))
    assert sha256_of(path) == ck.sha256
    assert other_node.read_bytes() == b"half of another node's download"  # untouched
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    assert f".partial.{host}.{os.getpid()}." in partials[0]
    os.remove(path)
    fetch(ck, str(tmp_path / "cache"))
    assert len(partials) == 2 and partials[0] != partials[1]  # a random part per call


def _fake_cfg(fiqa, iqa, **weights):
    """Just what preflight reads of a config, with any scorer kinds (the schema's own checks aside)."""
    from types import SimpleNamespace as NS

    archs = {"serfiq": "arcface_ir_se50", "dbcnn": "dbcnn"}
    stage = {k: NS(weights=weights.get(k), **({"arch": archs[k]} if k in archs else {}))
             for k in ("serfiq", "magface", "dbcnn", "topiq_face")}
    models = NS(detector=NS(align="retinaface", arch="retinaface_resnet50", weights=None),
                parser=NS(arch="bisenet", weights=None), fiqa=NS(kind=fiqa[0], also=fiqa[1:]),
                iqa=NS(kind=iqa[0], also=iqa[1:]), **stage)
    return NS(models=models)


def test_preflight_lists_the_checkpoints_of_the_configured_scorers_only():
    from cafi import preflight

    names = [c.model for c in preflight.checkpoints(_fake_cfg(["serfiq"], ["dbcnn"]))]
    assert names == ["detector", "serfiq", "parser", "dbcnn"]  # in pipeline order
    w = WeightsConfig(uri="/w/topiq.pth", sha256="0a8b8e4f" + "0" * 56)
    cks = preflight.checkpoints(_fake_cfg(["magface", "serfiq"], ["topiq_face"], topiq_face=w))
    assert [(c.model, c.uri.rsplit("/", 1)[-1]) for c in cks if c.model not in ("detector", "parser")] == [
        ("magface", "download?id=1Bd87admxOZvbIOAyTkGEntsEz3fyMt7H&export=download&confirm=t"),
        ("serfiq", "recognition_arcface_ir_se50.pth"), ("topiq_face", "topiq.pth")]
    with pytest.raises(ConfigError, match="models.topiq_face.weights"):
        preflight.checkpoints(_fake_cfg(["serfiq"], ["dbcnn", "topiq_face"]))


def test_weights_fetch_copies_the_published_files_and_pins_a_missing_digest(synth_config, synth_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """`cafi weights fetch` on records pointed at local copies; DBCNN's digest withheld as TOPIQ's is."""
    import dataclasses

    from cafi.cli import main
    from cafi.models import registry

    for arch in ("retinaface_resnet50", "bisenet", "arcface_ir_se50", "dbcnn", "sddfiqa_ir50"):
        rec = registry.PUBLISHED[arch]
        path = os.path.join(synth_dir, rec.file_name)
        sha = sha256_of(path)
        pinned = arch not in ("dbcnn", "sddfiqa_ir50")
        monkeypatch.setitem(registry.PUBLISHED, arch, dataclasses.replace(
            rec, uri=path, sha256=sha if pinned else "", sha256_prefix=sha[:8] if arch == "dbcnn" else ""))
    dest = tmp_path / "dest"
    # No weights configured for the scorers without a published digest: this command is how they get one.
    assert main(["weights", "fetch", str(dest), f"models.cache_dir={tmp_path / 'c'}",
                 "models.fiqa.also=[crfiqa,sddfiqa]", "models.crfiqa.weights=null", "models.sddfiqa.weights=null",
                 "--config", synth_config]) == 0
    out = capsys.readouterr().out
    dbcnn_sha = sha256_of(os.path.join(synth_dir, PUBLISHED["dbcnn"].file_name))
    assert f"sha256: {dbcnn_sha}  # computed from the copy fetched now" in out
    sdd_sha = sha256_of(os.path.join(synth_dir, PUBLISHED["sddfiqa_ir50"].file_name))
    assert f"sha256: {sdd_sha}  # computed from the copy fetched now" in out
    assert sorted(os.listdir(dest)) == sorted(registry.PUBLISHED[a].file_name for a in (
        "retinaface_resnet50", "bisenet", "arcface_ir_se50", "dbcnn", "sddfiqa_ir50"))  # CR-FIQA: by hand
    assert sha256_of(str(dest / PUBLISHED["dbcnn"].file_name)) == dbcnn_sha
    # Each model's licence and training data, printed with its block; CR-FIQA's Drive folder by hand.
    assert "  # crfiqa_iresnet100: licence CC BY-NC 4.0 (fdbtrs/CR-FIQA); trained on MS1MV2" in out
    assert "  # dbcnn: licence CC BY-NC-SA 4.0 (chaofengc/IQA-PyTorch (pyiqa)); trained on KonIQ-10k" in out
    assert "  # sddfiqa_ir50: licence Apache-2.0 (Tencent/TFace (quality/)); trained on MS1MV2" in out
    assert len([ln for ln in out.splitlines() if ": licence " in ln]) == 6  # one per model the config loads
    assert (f"  # crfiqa: download 181952backbone.pth by hand from {PUBLISHED['crfiqa_iresnet100'].uri}, copy it "
            f"to DEST, then:\n  crfiqa:\n    weights:\n      uri: {dest}/181952backbone.pth\n"
            "      sha256: <sha256sum of your copy>") in out


@pytest.mark.parametrize("arch", ["dbcnn", "retinaface_mobile0.25"])
def test_a_model_built_without_initialising_loads_the_same_tensors(synth_dir, tmp_path, arch):
    """build_loaded skips the random init (meta device, then the checkpoint's tensors assigned); a module
    that cannot be built on the meta device (RetinaFace moves itself while built) is built normally."""
    import torch

    from cafi.models import dbcnn, retinaface
    from cafi.models.registry import PUBLISHED
    from cafi.weights import build_loaded, load_into

    builder = dbcnn.build if arch == "dbcnn" else (lambda: retinaface.build(arch, "cpu"))
    path = os.path.join(synth_dir, PUBLISHED[arch].file_name)
    rec = PUBLISHED[arch]
    ckpt = Checkpoint("m", path, sha256_of(path), rec.state_key, strip_prefixes=rec.strip_prefixes)
    fast = build_loaded(builder, ckpt, str(tmp_path))
    plain = load_into(builder(), ckpt, str(tmp_path))
    assert not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    a, b = fast.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
