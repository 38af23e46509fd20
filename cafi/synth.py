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

from cafi.models import arcface, dbcnn, face_parsing, iresnet, retinaface, topiq
from cafi.models.registry import published
from cafi.weights import sha256_of

# Keys of the published RetinaFace files carry DataParallel's `module.` prefix.
_PREFIXED = {"retinaface_resnet50", "retinaface_mobile0.25"}

# MagFace's iResNet100 file is a training checkpoint (run/trainer_dist.py): epoch, arch, optimizer
# and `state_dict` = the DDP-wrapped backbone (`features.module.<k>`) plus rank 0's shard of the
# split margin head, `parallel_fc.weight` (85744 MS1MV2 classes / 8 GPUs; the 283,040,192-byte
# size of the published file fits exactly this). The loader drops the head (the record's
# drop_prefixes); it is written so that the drop is exercised.
MAGFACE_HEAD_SHARD = (85744 // 8, iresnet.EMBEDDING)

# Optional scorers (config section -> arch) that synth() writes beside the four defaults.
OPTIONAL_SCORERS = {"magface": "magface_iresnet100", "topiq_face": "topiq_nr_face"}


def _module_for(arch: str) -> torch.nn.Module:
    if arch.startswith("retinaface_"):
        return retinaface.build(arch, "cpu")
    if arch in ("bisenet", "parsenet"):
        return face_parsing.build(arch)
    if arch == "arcface_ir_se50":
        return arcface.build()
    if arch == "dbcnn":
        return dbcnn.build()
    if arch == "magface_iresnet100":
        return _calibrated(iresnet.build(100), (8, 3, 112, 112))
    if arch == "topiq_nr_face":
        return topiq.build()
    raise KeyError(arch)


def _calibrated(net: torch.nn.Module, input_shape: tuple[int, ...]) -> torch.nn.Module:
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


def _magface_training_checkpoint(state: dict) -> dict:
    wrapped = {f"features.module.{k}": v for k, v in state.items()}
    wrapped["parallel_fc.weight"] = torch.randn(MAGFACE_HEAD_SHARD)
    sgd = {"lr": 0.0001, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0005, "nesterov": False,
           "params": list(range(len(wrapped)))}
    return {"epoch": 25, "arch": "iresnet100", "state_dict": wrapped, "optimizer": {"state": {}, "param_groups": [sgd]}}


def write_checkpoint(arch: str, directory: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    record = published(arch)
    state = _module_for(arch).state_dict()
    if arch in _PREFIXED:
        state = {f"module.{k}": v for k, v in state.items()}
    if arch == "magface_iresnet100":
        obj = _magface_training_checkpoint(state)
    else:
        obj = {record.state_key: state} if record.state_key else state
    path = os.path.join(directory, record.file_name)
    torch.save(obj, path)
    return path


def synth(directory: str, detector: str = "retinaface_resnet50", parser: str = "bisenet",
          seed: int = 0, scorers: tuple[str, ...] = tuple(OPTIONAL_SCORERS)) -> str:
    """Write the checkpoints and `synthetic.yaml`; return the config path. `scorers`: the
    optional scorers (models.magface, models.topiq_face) to write as well."""
    os.makedirs(directory, exist_ok=True)
    models = {"detector": detector, "parser": parser, "serfiq": "arcface_ir_se50", "dbcnn": "dbcnn"}
    models.update({k: OPTIONAL_SCORERS[k] for k in scorers})
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
