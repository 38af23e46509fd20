"""The fused score (cafi/fusion.py): each column's mapping onto [0, 1], the weighted mean, its rule and
config checks, and `cafi eval --fit-fusion` recovering the weights of a known weighted sum."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import yaml

from cafi import columns, fusion
from cafi.cli import main
from cafi.config import load_config
from cafi.decision import OK
from cafi.errors import ConfigError
from cafi.eval_fusion import fit
from cafi.stages import specs
from cafi.stages.decide import decide
from cafi.version import stage_fingerprints

try:  # tests/ is a package here; still importable if it is not
    from .test_report import decision_cfg, scored_table, write_run
except ImportError:  # pragma: no cover
    from test_report import decision_cfg, scored_table, write_run  # type: ignore[no-redef]

BASE = ["input.uri=unused", "output.uri=unused"]
SPANNED = [c for c in columns.QUALITY if c.span is not None]


@pytest.mark.parametrize("col", SPANNED, ids=lambda c: c.name)
def test_every_documented_range_maps_its_best_end_to_1_and_its_worst_to_0(col):
    lo, hi = col.span
    best, worst = {"higher": (hi, lo), "lower": (lo, hi), "abs_lower": (0.0, hi),
                   "near_half": ((lo + hi) / 2, lo)}[col.better]
    beyond = {"higher": hi + 1, "lower": lo - 1, "abs_lower": -0.0, "near_half": (lo + hi) / 2}[col.better]
    out = col.unit_interval(np.array([best, worst, beyond, np.nan]))
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.0) and out[2] == pytest.approx(1.0)
    assert np.isnan(out[3])
    inner = col.unit_interval(np.linspace(lo, hi, 11))
    assert ((inner >= 0) & (inner <= 1)).all() and len(np.unique(inner)) > 2


def test_angles_count_as_one_minus_the_angle_over_90_whatever_their_sign():
    yaw = columns.BY_NAME["yaw"]
    assert yaw.unit_interval(np.array([-45.0, 45.0, 90.0, 120.0])) == pytest.approx([0.5, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("name", ["serfiq", "dbcnn", "yaw", "luma_mean", "over_exposed", "magface_raw"])
@pytest.mark.parametrize("weight", [1.0, 3.5])
def test_a_single_weight_gives_that_columns_normalised_value(name, weight):
    rng = np.random.default_rng(0)
    lo, hi = columns.BY_NAME[name].span
    v = rng.uniform(lo - 0.1 * (hi - lo), hi, 50)
    got = fusion.fused({name: v}, {name: weight}, {}, 50)
    assert got == pytest.approx(columns.BY_NAME[name].unit_interval(v))


def test_the_fused_score_is_the_weighted_mean_and_null_where_a_weighted_column_is():
    cols = {"serfiq": np.array([1.0, 0.5, np.nan]), "dbcnn": np.array([0.0, 50.0, 80.0])}
    got = fusion.fused(cols, {"serfiq": 3, "dbcnn": 1}, {}, 3)
    assert got[:2] == pytest.approx([0.75, 0.5]) and np.isnan(got[2])
    ranged = fusion.fused({"sharpness": np.array([0.0, 250.0, 900.0])}, {"sharpness": 1}, {"sharpness": [0, 500]}, 3)
    assert ranged == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize("override, key", [
    (["decision.fusion.weights.nope=1"], "decision.fusion.weights.nope"),
    (["decision.fusion.weights.cafi=1"], "decision.fusion.weights.cafi"),
    (["decision.fusion.weights.serfiq=-1"], "decision.fusion.weights.serfiq"),
    (["decision.fusion.weights.sharpness=1"], "decision.fusion.ranges.sharpness"),
    (["decision.fusion.weights.serfiq=0"], "decision.fusion.weights"),
    (["decision.fusion.weights.serfiq=1", "decision.fusion.ranges.serfiq=[1,0]"], "decision.fusion.ranges.serfiq"),
    (["decision.min_fused=0.5"], "decision.min_fused"),
    (["decision.fusion.weights.serfiq=1", "decision.min_fused=2"], "decision.min_fused"),
])
def test_bad_fusion_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], BASE + override)


def test_a_weight_on_a_column_the_run_does_not_compute_is_refused_before_the_run():
    cfg = load_config([], BASE + ["models.iqa.kind=topiq_face", "decision.fusion.weights.dbcnn=1"])
    with pytest.raises(ConfigError, match=r"decision\.fusion\.weights\.dbcnn: this run does not compute dbcnn"):
        specs.validate(cfg, pinned=False)
    specs.validate(load_config([], BASE + ["decision.fusion.weights.yaw=1"]), pinned=False)


def test_fusion_changes_only_the_decisions_fingerprint_and_unset_keeps_old_versions():
    plain = stage_fingerprints(load_config([], BASE))
    fused = stage_fingerprints(load_config([], BASE + ["decision.fusion.weights.serfiq=1"]))
    other = stage_fingerprints(load_config([], BASE + ["decision.fusion.weights.serfiq=2",
                                                       "decision.fusion.weights.yaw=1"]))
    assert {k for k in plain if plain[k] != fused[k]} == {"decide"} and fused["decide"] != other["decide"]
    settings = specs.DECIDE.settings(load_config([], BASE), ())
    assert "fusion" not in settings and "min_fused" not in settings["decision"]


def test_decide_writes_fused_and_rejects_below_min_fused_last():
    cfg = load_config([], BASE + ["decision.fusion.weights.serfiq=1", "decision.fusion.weights.yaw=1",
                                  "decision.min_fused=0.6", "decision.min_serfiq=0.2", "decision.min_dbcnn=0"])
    n = 4
    batch = {"uri": [f"u{i}" for i in range(n)], "status": [OK] * n, "error": [None] * n,
             "serfiq_raw": np.array([0.9, 0.9, 0.1, 0.9]), "yaw": np.array([0.0, 80.0, 0.0, np.nan]),
             "mask_fraction": np.full(n, 0.5), "dbcnn": np.full(n, 50.0)}
    cfg = replace(cfg, models=replace(cfg.models, serfiq=replace(cfg.models.serfiq, alpha=1000.0, r=0.5)))
    rows = decide(batch, cfg, "v-test", "run").to_pydict()
    want = [1.0, (1.0 + 1 - 80 / 90) / 2, 0.5, None]  # serfiq rescaled: ~1 for raw 0.9, ~0 for 0.1
    for got, w in zip(rows["fused"], want, strict=True):
        assert (got is None) if w is None else got == pytest.approx(w, abs=1e-3)
    # the serfiq rule comes first for row 2; rows 1 and 3 fail only the fused rule
    assert rows["reject_reason"] == [None, "low_fused", "unrecognisable", "low_fused"]


def _weighted_labels(n: int, weights: dict, seed: int, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    values = {"uri": [f"s3://b/{i}.jpg" for i in range(n)], "serfiq": rng.uniform(0, 1, n),
              "dbcnn": rng.uniform(0, 100, n), "yaw": rng.uniform(-60, 60, n), "luma_mean": rng.uniform(0.2, 0.8, n),
              "dynamic_range": rng.uniform(3, 8, n)}
    mos = sum(w * columns.BY_NAME[c].unit_interval(values[c]) for c, w in weights.items())
    return values, mos + noise * rng.standard_normal(n)


def test_fit_fusion_recovers_the_order_of_known_weights():
    weights = {"dbcnn": 0.55, "serfiq": 0.3, "yaw": 0.15}
    values, mos = _weighted_labels(300, weights, seed=1, noise=0.01)
    table = scored_table(values, decision_cfg(), "r", "v-x")
    res = fit(table, mos, None, {})
    got = [c for c in res.weights if c in weights]
    assert got == list(weights), res.weights  # largest first, as the known sum's
    assert sum(w for c, w in res.weights.items() if c not in weights) < 0.05
    assert res.srcc > res.best_single["srcc"] + 0.05 and res.best_single["column"] == "dbcnn"
    # against accepts made from the same sum: its best threshold, at least the best single column's F1
    truth = (mos > np.median(mos)).astype(np.int8)
    acc = fit(table, np.full(len(mos), np.nan), truth, {})
    assert acc.target == "accept" and 0 <= acc.min_fused <= 1 and acc.f1 >= acc.best_single["f1"]
    assert list(acc.weights)[0] == "dbcnn"


def test_cli_fit_fusion_prints_a_config_block_that_loads_and_reproduces_the_fit(tmp_path, capsys):
    weights = {"serfiq": 0.6, "yaw": 0.4}
    values, mos = _weighted_labels(120, weights, seed=2)
    cfg = decision_cfg()
    out = str(tmp_path / "out")
    write_run(out, scored_table(values, cfg, "r1", "v-fit"), "r1", cfg)
    labels = tmp_path / "labels.csv"
    labels.write_text("uri,mos\n" + "".join(f"{u},{m}\n" for u, m in zip(values["uri"], mos, strict=True)))
    assert main(["eval", out, str(labels), "--fit-fusion"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("decision:\n  fusion:"):]
    doc = yaml.safe_load(block)
    fitted = doc["decision"]["fusion"]["weights"]
    assert list(fitted)[:2] == ["serfiq", "yaw"] and fitted["serfiq"] > fitted["yaw"]
    (tmp_path / "fusion.yaml").write_text(block)
    loaded = load_config([str(tmp_path / "fusion.yaml")], BASE)
    assert dict(loaded.decision.fusion.weights) == pytest.approx(fitted)
    assert "best single column on the same rows: serfiq" in text
    assert main(["eval", out, "--fit-fusion"]) != 0  # nothing to fit to
