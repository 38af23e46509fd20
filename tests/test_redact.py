"""No credential in what a run writes or prints: URIs lose userinfo and query, interpolations stay text."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from cafi import preflight, runs
from cafi.config import load_config
from cafi.errors import WeightsError
from cafi.redact import redact_text, redact_uri
from cafi.stages.specs import checkpoints
from cafi.summary import Phases, run_summary
from cafi.weights import fetch

TOKEN, SIG = "tok-5e1f0c2a9b", "sig-77d2c4e0aa"


def _closed_port() -> int:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hostile_config(tmp_path, monkeypatch, synth_config):
    """The synthetic weights, but DBCNN's from a URI with a token (from the environment) in its userinfo
    and a signature in its query; a presigned input, an endpoint from the environment."""
    monkeypatch.setenv("CAFI_TEST_TOKEN", TOKEN)
    path = tmp_path / "hostile.yaml"
    path.write_text(
        "models:\n  dbcnn:\n    weights:\n"
        f"      uri: https://user:${{oc.env:CAFI_TEST_TOKEN}}@127.0.0.1:{_closed_port()}/w/dbcnn.pth?sig={SIG}\n"
        f"      sha256: {'a' * 64}\n"
        "storage:\n  endpoint_url: http://${oc.env:CAFI_TEST_TOKEN}.example:9000\n"
        f"input:\n  uri: s3://crops/in/?X-Amz-Signature={SIG}\n"
        f"output:\n  uri: {tmp_path / 'out'}\n")
    cfg = load_config([synth_config, str(path)])
    assert TOKEN in cfg.models.dbcnn.weights.uri and SIG in cfg.models.dbcnn.weights.uri  # what is fetched
    return cfg


def _assert_clean(text: str) -> None:
    assert TOKEN not in text and SIG not in text and "user:" not in text, text


def test_redact_uri_keeps_scheme_host_path_and_drops_userinfo_and_query():
    assert redact_uri(f"https://user:{TOKEN}@host:8443/w/x.pth?sig={SIG}") == "https://host:8443/w/x.pth"
    assert redact_uri(f"s3://b/shard.tar?X-Amz-Signature={SIG}#key-1") == "s3://b/shard.tar#key-1"
    assert redact_uri(f"s3://AKIA:se/cr?{TOKEN}@bucket/p/x.jpg") == "s3://bucket/p/x.jpg"  # '/', '?' unencoded
    for kept in ("s3://b/a@b.jpg", "/local/a?b.jpg", "relative/x.jpg", "http://[::1]:9000/p", None, 3):
        assert redact_uri(kept) == kept
    text = f"cannot fetch 'https://u:{TOKEN}@h/x?sig={SIG}': 403 for url: https://h/x?sig={SIG}, see (s3://b/k?v=1)."
    assert redact_text(text) == "cannot fetch 'https://h/x': 403 for url: https://h/x, see (s3://b/k)."


def test_summary_holds_neither_the_token_nor_the_signature(hostile_config, tmp_path):
    cfg = hostile_config
    summary = run_summary(
        run_id="r1", version="v-1", synthetic=True, fingerprints={}, inputs=0, listed=0, scored_now=0, includes=[],
        reuse=None, stages_run=[], observed={}, counts={}, phases=Phases(), elapsed=1.0, input_section={},
        stats={}, output={"manifest": f"s3://user:{TOKEN}@b/out/manifest", "run": f"s3://b/out/runs/r1?sig={SIG}"},
        config=cfg)
    _assert_clean(json.dumps(summary, default=str))
    conf = summary["config"]
    # A URI loses userinfo and query; a value from an interpolation is its text, never what it resolved to.
    assert conf["models"]["dbcnn"]["weights"]["uri"].endswith("/w/dbcnn.pth")
    assert conf["models"]["dbcnn"]["weights"]["uri"].startswith("https://127.0.0.1:")
    assert conf["storage"]["endpoint_url"] == "http://${oc.env:CAFI_TEST_TOKEN}.example:9000"
    assert conf["input"]["uri"] == "s3://crops/in/"
    assert summary["output"] == {"manifest": "s3://b/out/manifest", "run": "s3://b/out/runs/r1"}
    # The rest of the config is written as it was used; readers of the summary skip interpolation text.
    assert conf["models"]["dbcnn"]["weights"]["sha256"] == "a" * 64 and conf["image"]["max_pixels"] == 40_000_000
    assert runs.storage_config(summary).endpoint_url is None


def test_weights_errors_name_the_checkpoint_by_its_redacted_uri(hostile_config, tmp_path):
    cfg = hostile_config
    ckpt = next(c for c in checkpoints(cfg) if c.model == "dbcnn")
    with pytest.raises(WeightsError) as err:  # the download fails: nobody listens
        fetch(ckpt, str(tmp_path / "cache"), cfg.storage)
    _assert_clean(str(err.value))
    assert "dbcnn" in str(err.value) and "/w/dbcnn.pth" in str(err.value)
    with pytest.raises(WeightsError) as err:  # the check at start: not reachable or not found
        preflight.check(cfg, "r1")
    _assert_clean(str(err.value))
    assert "dbcnn" in str(err.value) and "/w/dbcnn.pth" in str(err.value)


def test_log_lines_of_cafi_are_redacted(caplog):
    with caplog.at_level(logging.INFO, logger="cafi"):
        logging.getLogger("cafi").warning("shard %s: %s", f"https://user:{TOKEN}@h/s.tar?sig={SIG}", "bad")
    assert caplog.records and caplog.records[-1].getMessage() == "shard https://h/s.tar: bad"
    _assert_clean(caplog.text)
