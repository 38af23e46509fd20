"""`cafi weights synth DIR`: randomly initialised checkpoints in the published formats.

Same file names, key names, shapes and wrapping as the published files, so the real
loading path (sha256, weights_only, strict load) runs end to end on any machine. A
config written beside them points at the files with their sha256s and marks them
synthetic, which puts `synthetic-` in the model version of anything scored with them.
"""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from cafi.models import arcface, dbcnn, face_parsing, retinaface
from cafi.models.registry import published
from cafi.weights import sha256_of

# Keys of the published RetinaFace files carry DataParallel's `module.` prefix.
_PREFIXED = {"retinaface_resnet50", "retinaface_mobile0.25"}


def _module_for(arch: str) -> torch.nn.Module:
    if arch.startswith("retinaface_"):
        return retinaface.build(arch, "cpu")
    if arch in ("bisenet", "parsenet"):
        return face_parsing.build(arch)
    if arch == "arcface_ir_se50":
        return arcface.build()
    if arch == "dbcnn":
        return dbcnn.build()
    raise KeyError(arch)


def write_checkpoint(arch: str, directory: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    record = published(arch)
    state = _module_for(arch).state_dict()
    if arch in _PREFIXED:
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {record.state_key: state} if record.state_key else state
    path = os.path.join(directory, record.file_name)
    torch.save(obj, path)
    return path


def synth(directory: str, detector: str = "retinaface_resnet50", parser: str = "bisenet",
          seed: int = 0) -> str:
    """Write the checkpoints and `synthetic.yaml`; return the config path."""
    os.makedirs(directory, exist_ok=True)
    models = {"detector": detector, "parser": parser, "serfiq": "arcface_ir_se50", "dbcnn": "dbcnn"}
    block: dict = {}
    for key, arch in models.items():
        path = os.path.abspath(write_checkpoint(arch, directory, seed))
        entry: dict = {"weights": {"uri": path, "sha256": sha256_of(path), "synthetic": True}}
        if key in ("detector", "parser"):
            entry["arch"] = arch
        block[key] = entry
    # Random weights cannot find faces with confidence: accept any detection.
    block["detector"]["conf_threshold"] = 0.01
    cfg_path = os.path.join(directory, "synthetic.yaml")
    header = "# Written by `cafi weights synth`: random weights in the published formats.\n"
    with open(cfg_path, "w") as fh:
        fh.write(header + OmegaConf.to_yaml(OmegaConf.create({"models": block})))
    return cfg_path
