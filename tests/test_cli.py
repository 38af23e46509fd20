"""The `cafi` command line: --help everywhere, `cafi report`, and errors as one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cafi import cli
from cafi.errors import StorageError, WeightsError

try:  # tests/ is a package here; still importable if it is not
    from .test_report import face_run
except ImportError:  # pragma: no cover
    from test_report import face_run  # type: ignore[no-redef]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = [["score"], ["report"], ["eval"], ["weights"], ["weights", "synth"], ["weights", "fetch"],
            ["weights", "verify"], ["samples"], []]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cafi")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cafi {' '.join(command)}".rstrip())
    if command == ["report"]:
        assert "RUN_URI" in out and "--out FILE" in out
    if command == ["eval"]:
        assert "MANIFEST" in out and "LABELS.csv" in out and "--precision P" in out
    if command == []:
        for sub in ("score", "report", "eval", "weights", "samples"):
            assert sub in out


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "cafi")
    if not os.path.exists(exe):
        pytest.skip("the cafi console script is not installed in this environment (pip install -e .)")
    proc = subprocess.run([exe, "report", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "RUN_URI" in proc.stdout


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report"])
    assert exc.value.code == 2
    assert "the following arguments are required: RUN_URI" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    out, run, _ = face_run(tmp_path, n=12)
    assert cli.main(["report", run]) == 0
    assert capsys.readouterr().out.strip() == f"report: {os.path.join(run, 'report.html')}"
    assert os.path.exists(os.path.join(run, "report.html"))
    dest = str(tmp_path / "r.html")
    assert cli.main(["report", out, "--out", dest]) == 0  # the output root: its latest committed run
    assert "cafi run report: 20250101T000000Z-aaaaaa" in open(dest, encoding="utf-8").read()


def _one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("cafi: error: ")
    return lines[0]


def test_report_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert _one_error_line(capsys) == f"cafi: error: {tmp_path / 'missing'} does not exist"
    run = tmp_path / "out" / "runs" / "20250101T000000Z-ffffff"
    run.mkdir(parents=True)
    assert cli.main(["report", str(run)]) == 1
    assert "is not committed" in _one_error_line(capsys)


def test_config_error_exits_2(capsys):
    assert cli.main(["score", "output.uri=/tmp/x"]) == 2
    assert _one_error_line(capsys).startswith("cafi: error: config: input.uri / input.manifest")


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch, capsys):
    def boom(args):
        raise ValueError("the parquet footer is bad\nand a second line")

    monkeypatch.setattr(cli, "cmd_report", boom)
    monkeypatch.delenv("CAFI_DEBUG", raising=False)
    assert cli.main(["report", "x"]) == 1
    assert _one_error_line(capsys) == "cafi: error: ValueError: the parquet footer is bad"
    monkeypatch.setenv("CAFI_DEBUG", "1")
    assert cli.main(["report", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "cafi: error: ValueError: the parquet footer is bad"


def test_cafi_error_with_several_lines_stays_one_line(monkeypatch, capsys):
    def fail(args):
        raise StorageError("output.uri: cannot write to s3://b/out:\n  AccessDenied")

    monkeypatch.setattr(cli, "cmd_report", fail)
    assert cli.main(["report", "x"]) == 1
    assert _one_error_line(capsys) == "cafi: error: output.uri: cannot write to s3://b/out: AccessDenied"


# ---------------------------------------------------------------- errors raised inside Ray

def test_errors_raised_inside_ray_are_unwrapped(ray_local, monkeypatch, capsys):
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False

    class BadStage:  # defined here, so that Ray ships it by value to its workers
        def __init__(self):
            raise WeightsError("dbcnn: sha256 mismatch for /w/dbcnn.pth")

        def __call__(self, batch):
            return batch

    def bad_fn(batch):
        raise StorageError("input.uri: s3://crops vanished")

    @ray.remote
    def task():
        raise StorageError("output.uri: cannot write to s3://x/out: AccessDenied")

    @ray.remote
    class Actor:
        def __init__(self):
            raise WeightsError("serfiq: checkpoint not found: s3://w/arcface.pth")

        def ping(self):
            return 1

    cases = {
        "task": (lambda: ray.get(task.remote()), "output.uri: cannot write to s3://x/out: AccessDenied"),
        "actor": (lambda: ray.get(Actor.remote().ping.remote()), "serfiq: checkpoint not found: s3://w/arcface.pth"),
        "data actor": (lambda: ray.data.range(2).map_batches(
            BadStage, compute=ray.data.ActorPoolStrategy(size=1)).materialize(),
            "dbcnn: sha256 mismatch for /w/dbcnn.pth"),
        "data task": (lambda: ray.data.range(2).map_batches(bad_fn).materialize(), "input.uri: s3://crops vanished"),
    }
    for name, (call, message) in cases.items():
        def command(args, call=call):
            call()

        monkeypatch.setattr(cli, "cmd_report", command)
        assert cli.main(["report", "x"]) == 1, name
        # Ray logs its own lines to stderr; ours is the last, and the only one.
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"cafi: error: {message}", (name, err[-5:])
        assert sum(line.startswith("cafi: error") for line in err) == 1, name
