"""Smoke runs: make sample crops and synthetic weights on first use, so a fresh clone can score."""

from __future__ import annotations

import os

from cafi.config import load_config
from cafi.errors import ConfigError


def prepare(files: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """Return the config files to load; with `smoke.enabled`, generate what the smoke run needs."""
    cfg = load_config(files, overrides)
    if not cfg.smoke.enabled:
        return files, overrides
    if cfg.input.uri is None or "://" in cfg.input.uri:
        raise ConfigError("smoke.enabled: input.uri must be a local directory to generate samples into")
    from cafi.samples import write_samples
    from cafi.synth import synth

    if not os.path.isdir(cfg.input.uri) or not os.listdir(cfg.input.uri):
        write_samples(cfg.input.uri, count=cfg.smoke.samples)
        print(f"smoke: wrote sample crops to {cfg.input.uri}")
    weights_cfg = os.path.join(cfg.smoke.weights_dir, "synthetic.yaml")
    if not os.path.isfile(weights_cfg):
        from cafi.stages.specs import all_specs

        m = cfg.models  # only the scorers the run computes: MagFace's random iResNet100 alone is 260 MB
        archs = {s.section: s.arch(cfg) for s in all_specs() if s.synth and s.arch}  # the configured ones
        synth(cfg.smoke.weights_dir, detector=m.detector.arch, parser=m.parser.arch,
              scorers=(m.fiqa.kind, *m.fiqa.also, m.iqa.kind, *m.iqa.also), archs=archs)
        print(f"smoke: wrote synthetic weights to {cfg.smoke.weights_dir}")
    return [*files, weights_cfg], overrides
