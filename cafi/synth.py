"""`cafi weights synth DIR`: randomly initialised checkpoints in the published formats.

Same file names, key names, shapes and wrapping as the published files, so the real loading path
(sha256, weights_only, strict load) runs end to end on any machine. Each stage's spec says how its
checkpoint is made (`synth`); this module writes them and a config beside them that points at the
files with their sha256s and marks them synthetic, which puts `synthetic-` in the model version of
anything scored with them.
"""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from cafi.config import ModelsConfig
from cafi.models.registry import published
from cafi.weights import sha256_of


def as_published(arch: str, state: dict) -> dict:
    """A state dict wrapped as the published file of `arch` wraps it (pyiqa: under `params`)."""
    record = published(arch)
    return {record.state_key: state} if record.state_key else state


def calibrated(net: torch.nn.Module, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """Batch-norm running statistics from one batch of random pixels. A random iResNet100 with the
    default statistics (mean 0, var 1) grows its activations block after block (norms ~1e11, past
    fp16's range); calibrated, its embedding norm lands near sqrt(512) ~ 23, a real face's range."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # running stats = this batch's
    net.train()
    with torch.no_grad():
        net(torch.rand(input_shape))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return net.eval()


def _spec_of(arch: str):
    from cafi.stages.specs import all_specs

    for s in all_specs():
        if arch in s.archs:
            return s
    raise KeyError(f"no stage loads {arch!r}")


def write_checkpoint(arch: str, directory: str, seed: int = 0) -> str:
    """A random checkpoint of `arch` in its published layout, under its published file name."""
    torch.manual_seed(seed)
    obj = _spec_of(arch).synth(arch)
    path = os.path.join(directory, published(arch).file_name)
    torch.save(obj, path)
    return path


def synth(directory: str, detector: str = "retinaface_resnet50", parser: str = "bisenet", seed: int = 0,
          scorers: tuple[str, ...] | None = None, archs: dict[str, str] | None = None) -> str:
    """Write the checkpoints of every stage and `synthetic.yaml`; return the config path. `scorers`: the
    scorers beyond the default FIQA and IQA kinds to write (None: all of them). `archs`: the arch of
    other sections than the detector's and parser's (section -> arch; default: each stage's first)."""
    from cafi.stages.specs import all_specs

    os.makedirs(directory, exist_ok=True)
    defaults = ModelsConfig()
    arch_of = {**(archs or {}), "detector": detector, "parser": parser}
    block: dict = {}
    for s in all_specs():
        if s.synth is None:
            continue
        optional = s.family in ("fiqa", "iqa") and s.name not in (defaults.fiqa.kind, defaults.iqa.kind)
        if optional and scorers is not None and s.name not in scorers:
            continue
        arch = arch_of.get(s.section, s.archs[0])
        path = os.path.abspath(write_checkpoint(arch, directory, seed))
        entry: dict = {"weights": {"uri": path, "sha256": sha256_of(path), "synthetic": True}}
        if len(s.archs) > 1:
            entry["arch"] = arch
        block[s.section] = entry
    # Random weights cannot find faces with confidence: accept any detection.
    block["detector"]["conf_threshold"] = 0.01
    cfg_path = os.path.join(directory, "synthetic.yaml")
    header = "# Written by `cafi weights synth`: random weights in the published formats.\n"
    with open(cfg_path, "w") as fh:
        fh.write(header + OmegaConf.to_yaml(OmegaConf.create({"models": block})))
    return cfg_path
