"""bench/gpu.py's dry run: every part of the GPU script that runs without CUDA, at tiny sizes on the CPU,
so the script a GPU session runs once has not rotted by then."""

from __future__ import annotations

import json
import os
import re

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.slow
def test_gpu_script_dry_run_prints_every_figure_and_writes_them_to_out(fast_config, ray_local, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import gpu

    from cafi.stages.specs import all_specs

    out = tmp_path / "out"
    gpu.main(["--dry-run", "--all", "--out", str(out), *[a for c in fast_config for a in ("--config", c)]])
    lines = capsys.readouterr().out.splitlines()

    last = r"gpu e2e: [\d.]+ crops/s, \d+ % of the [\d.]+ crops/s bound, device cpu \(dry run\)"
    assert re.fullmatch(last, lines[-1]), lines[-1]
    assert any(ln.startswith("nvJPEG decode: skipped (needs CUDA)") for ln in lines)
    model_stages = [s.name for s in all_specs() if s.stage is not None]  # optional scorers too: from the specs
    for name in model_stages:
        stage_line = next(ln for ln in lines if ln.startswith(f"stage {name}: "))
        assert re.search(r"fp16 eager [\d.]+, bf16 eager skipped \(dry run: the CPU runs fp32\)", stage_line), \
            stage_line
    assert re.match(r"bound: [\d.]+ crops/s = detect \+ serfiq \+ parse \+ components \+ dbcnn", next(
        ln for ln in lines if ln.startswith("bound: ")))
    slowest = next(ln for ln in lines if ln.startswith("slowest stage (torch.profiler"))
    assert re.search(r": (detect|serfiq|parse|components|dbcnn), [\d.]+ ms of [\d.]+ ms for all", slowest)
    assert any(ln.startswith("e2e run, ") and "'scored': " in ln for ln in lines)

    assert (out / "gpu.txt").read_text().splitlines() == lines
    figures = json.loads((out / "gpu.json").read_text())
    assert figures["bound"] > 0 and figures["e2e"] > 0 and figures["device"] == "cpu (dry run)"
    assert {f"stage_{n}_fp16_eager" for n in model_stages} <= set(figures)
