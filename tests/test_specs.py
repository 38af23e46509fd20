"""Every stage spec, one parametrised test each (a new stage is tested by being a spec): its columns,
its fingerprint, its reuse, its synthetic checkpoint; and what iterates over the specs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cafi import autoscale, columns
from cafi.config import load_config
from cafi.decision import OK
from cafi.stages import specs
from cafi.version import stage_fingerprints, upstream

MODEL_SPECS = [s for s in specs.all_specs() if s.stage is not None]
BASE = ["input.uri=/in", "output.uri=/out"]
# Every scorer computed, every checkpoint named by digest (no file needed for a fingerprint).
WEIGHTS = [f"models.{sec}.weights.{k}" for sec in specs.sections() for k in ("uri=/w.pth", f"sha256={'1' * 64}")]


def _all_scorers() -> list[str]:
    out = []
    for family in ("fiqa", "iqa"):
        first, *rest = [s.name for s in specs.of_family(family)]
        out += [f"models.{family}.kind={first}", f"models.{family}.also=[{','.join(rest)}]"]
    return out


def _cfg(*extra: str):
    return load_config([], [*BASE, *WEIGHTS, "output.embeddings=true", *_all_scorers(), *extra])


def _downstream(name: str, ups: dict) -> set[str]:
    out, grew = {name}, True
    while grew:
        more = {s for s, u in ups.items() if set(u) & out} - out
        grew = bool(more)
        out |= more
    return out


def test_the_specs_are_found_and_every_family_is_there():
    names = [s.name for s in specs.all_specs()]
    assert {"detect", "serfiq", "magface", "crfiqa", "sddfiqa", "parse", "components", "dbcnn", "topiq_face",
            "maniqa", "musiq", "decide"} <= set(names)
    assert len(names) == len(set(names))
    assert [s.name for s in specs.specs_for(_cfg())][:1] == ["detect"]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.name)
def test_a_stage_fills_manifest_columns_and_reads_what_its_upstream_makes(spec):
    for col in spec.outputs:
        assert col in columns.BY_NAME, col
    cfg = _cfg()
    assert spec in specs.specs_for(cfg)
    assert set(spec.upstream(cfg)) <= {s.name for s in specs.specs_for(cfg)}
    if spec.score:
        assert spec.score in columns.BY_NAME and spec.threshold in vars(cfg.decision)


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.name)
def test_a_stage_fingerprint_changes_with_its_own_settings_and_no_unrelated_stage_does(spec, monkeypatch):
    cfg = _cfg()
    before = stage_fingerprints(cfg)
    if spec.arch is not None:  # its checkpoint: every model stage has one
        changed = _cfg(f"models.{spec.section}.weights.sha256={'2' * 64}")
    else:  # no model: its definitions
        import cafi.components

        monkeypatch.setattr(cafi.components, "DEFINITION_VERSION", "changed-by-test")
        changed = cfg
    after = stage_fingerprints(changed)
    moved = {s for s in before if before[s] != after[s]}
    shared = {s.name for s in MODEL_SPECS if s.section == spec.section and s.arch is not None} if spec.arch else set()
    expected = set().union(*(_downstream(n, upstream(cfg)) for n in ({spec.name} | shared)))
    assert spec.name in moved and "decide" in moved
    assert moved == expected


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.name)
def test_reuse_takes_a_stage_columns_over_without_a_model(spec):
    cfg = _cfg()
    outputs = specs.stage_columns(spec, cfg)
    n = 3
    batch = {"uri": np.array(["a", "b", "c"], dtype=object), "status": np.array([OK] * n, dtype=object),
             f"prev_{spec.name}_reused": np.array([True, True, False]), "prev_status": np.array(["scored"] * n)}
    rng = np.random.default_rng(0)
    for col in outputs:
        shape = (n, columns.BY_NAME[col].type.list_size) if hasattr(columns.BY_NAME[col].type, "list_size") else (n,)
        batch[f"prev_{col}"] = rng.uniform(1, 2, shape).astype(np.float32)
    stage = spec.stage(spec, cfg, load=False, outputs=outputs)
    with pytest.raises(RuntimeError, match="planned as reused"):  # row c needs the model
        stage({k: v.copy() for k, v in batch.items()})
    batch[f"prev_{spec.name}_reused"][2] = True
    out = stage(batch)
    for col in outputs:
        np.testing.assert_allclose(np.asarray(out[col], np.float32), batch[f"prev_{col}"], rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in MODEL_SPECS if s.synth], ids=lambda s: s.name)
def test_a_stage_loads_its_synthetic_checkpoint_strictly(spec, tmp_path):
    """Every arch a stage can load: `synth` writes it in the published layout, the stage's real loading
    path (sha256, weights_only, strict load_state_dict) builds its model from it."""
    from cafi.synth import write_checkpoint
    from cafi.weights import sha256_of

    for arch in spec.archs:
        path = write_checkpoint(arch, str(tmp_path))
        over = [f"models.{spec.section}.weights.uri={path}", f"models.{spec.section}.weights.sha256={sha256_of(path)}",
                f"models.cache_dir={tmp_path / 'cache'}"]
        if len(spec.archs) > 1:
            over.append(f"models.{spec.section}.arch={arch}")
        cfg = _cfg(*over)
        stage = spec.stage(spec, cfg, load=True, outputs=specs.stage_columns(spec, cfg))
        assert stage.loaded
        del stage
        os.remove(path)  # one arch's checkpoint on disk at a time (up to 543 MB); a local file is not cached


def test_unfused_pools_of_every_gpu_scorer_are_sized_and_fused_ones_follow_the_stages_that_run():
    gpu = [f"models.{s}.{k}" for s in ("magface", "topiq_face") for k in ("num_gpus=0.5", "max_actors=3")]
    cfg = load_config([], [*BASE, "models.fiqa.kind=magface", "models.iqa.kind=topiq_face", "ray.fuse_models=false",
                           "ray.scale_gpu_pools=always", "models.topiq_face.weights.uri=/t.pth",
                           f"models.topiq_face.weights.sha256={'3' * 64}", *gpu])
    sized = autoscale.sized(cfg, rows=1000)
    assert {p.name for p in autoscale.gpu_pools(cfg)} == {"magface", "topiq_face"}
    for section in ("magface", "topiq_face"):
        st = getattr(sized.models, section)
        assert (st.min_actors, st.max_actors) == (3, 3), section
    assert cfg.models.magface.min_actors == 1  # the caller's config is untouched (it is immutable)
    # fused: the actor's demand is that of the stages that run; SER-FIQ on a GPU does not run here
    fused = load_config([], [*BASE, "models.serfiq.num_gpus=1", "ray.scale_gpu_pools=always",
                             "models.fiqa.kind=magface"])
    assert autoscale.gpu_pools(fused) == []


def test_the_config_is_immutable():
    import dataclasses

    cfg = load_config([], BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models.serfiq.samples = 3  # type: ignore[misc]


@pytest.mark.parametrize("fiqa, source", [
    (["models.fiqa.kind=crfiqa"], "crfiqa"),
    (["models.fiqa.kind=sddfiqa", "models.fiqa.also=[crfiqa]"], "crfiqa"),
    (["models.fiqa.kind=crfiqa", "models.fiqa.also=[magface]"], "magface"),
    (["models.fiqa.kind=magface", "models.fiqa.also=[crfiqa,serfiq]"], "serfiq"),
])
def test_one_pass_gives_the_embedding_and_the_run_names_its_recognizer(fiqa, source):
    cfg = load_config([], [*BASE, *WEIGHTS, "output.embeddings=true", "models.crfiqa.arch=crfiqa_iresnet50", *fiqa])
    specs.validate(cfg)
    assert specs.embedding_source(cfg) == source
    assert [s.name for s in specs.specs_for(cfg) if "embedding" in specs.stage_columns(s, cfg)] == [source]
    arch = {"crfiqa": "crfiqa_iresnet50", "magface": "magface_iresnet100", "serfiq": "arcface_ir_se50"}[source]
    assert specs.embedding_model(cfg) == {"stage": source, "arch": arch, "sha256": "1" * 64}
    assert specs.embedding_model(load_config([], [*BASE, *WEIGHTS, *fiqa])) is None  # no embeddings asked for


def test_embeddings_from_a_run_whose_fiqa_scorers_yield_none_is_a_config_error():
    from cafi.errors import ConfigError

    cfg = load_config([], [*BASE, *WEIGHTS, "output.embeddings=true", "models.fiqa.kind=sddfiqa"])
    with pytest.raises(ConfigError, match=r"output.embeddings: .*\(sddfiqa\) yields an embedding.*crfiqa"):
        specs.validate(cfg)


def test_a_checkpoint_published_on_a_web_page_only_asks_to_be_downloaded_by_hand():
    from cafi.errors import ConfigError

    cfg = load_config([], [*BASE, "models.fiqa.kind=crfiqa", "models.crfiqa.arch=crfiqa_iresnet50"])
    with pytest.raises(ConfigError, match=r"models.crfiqa.weights: .*32572backbone.pth only on a web page.*by hand"):
        specs.validate(cfg)
    specs.validate(cfg, pinned=False)  # what `cafi weights fetch` checks: the digest is what it pins


def test_a_new_threshold_moves_only_the_decision_and_only_once_set():
    before = stage_fingerprints(_cfg())
    after = stage_fingerprints(_cfg("decision.min_crfiqa=1.5"))
    assert {s for s in before if before[s] != after[s]} == {"decide"}
    assert stage_fingerprints(_cfg("decision.min_sddfiqa=null")) == before  # unset: as before the key existed
