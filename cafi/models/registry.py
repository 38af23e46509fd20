"""Typed records of the published checkpoints (as timm and pyiqa keep them)."""

from __future__ import annotations

from dataclasses import dataclass

FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
PYIQA_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"


@dataclass(frozen=True)
class Pretrained:
    arch: str
    uri: str
    sha256: str
    file_name: str
    state_key: str | None = None  # key that wraps the state dict in the file
    input_size: int | None = None  # None: any size
    channel_order: str = "rgb"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # on the 0..1 scale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    score_range: tuple[float, float] | None = None
    higher_is_better: bool = True


PUBLISHED: dict[str, Pretrained] = {
    p.arch: p
    for p in (
        Pretrained(
            arch="retinaface_resnet50",
            uri=f"{FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
            file_name="detection_Resnet50_Final.pth",
            sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
            channel_order="bgr",
            mean=(104 / 255, 117 / 255, 123 / 255),
            std=(1 / 255, 1 / 255, 1 / 255),  # raw 0..255 minus the mean
            score_range=(0.0, 1.0),
        ),
        Pretrained(
            arch="retinaface_mobile0.25",
            uri=f"{FACEXLIB}/v0.1.0/detection_mobilenet0.25_Final.pth",
            file_name="detection_mobilenet0.25_Final.pth",
            sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
            channel_order="bgr",
            mean=(104 / 255, 117 / 255, 123 / 255),
            std=(1 / 255, 1 / 255, 1 / 255),
            score_range=(0.0, 1.0),
        ),
        Pretrained(
            arch="bisenet",
            uri=f"{FACEXLIB}/v0.2.0/parsing_bisenet.pth",
            file_name="parsing_bisenet.pth",
            sha256="468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
            input_size=512,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        Pretrained(
            arch="parsenet",
            uri=f"{FACEXLIB}/v0.2.2/parsing_parsenet.pth",
            file_name="parsing_parsenet.pth",
            sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
            input_size=512,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        Pretrained(
            arch="arcface_ir_se50",
            uri=f"{FACEXLIB}/v0.1.0/recognition_arcface_ir_se50.pth",
            file_name="recognition_arcface_ir_se50.pth",
            sha256="a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28",
            input_size=112,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            score_range=(0.0, 1.0),
        ),
        Pretrained(
            arch="dbcnn",
            uri=f"{PYIQA_HF}/DBCNN_KonIQ10k-2de81c0a.pth",
            file_name="DBCNN_KonIQ10k-2de81c0a.pth",
            sha256="2de81c0af94ac46fb191fe713c4d72e93e0acb02e6aa29c601f4251e93b9ebe6",
            state_key="params",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            score_range=(0.0, 100.0),  # KonIQ-10k MOS scale
        ),
    )
}


def published(arch: str) -> Pretrained:
    try:
        return PUBLISHED[arch]
    except KeyError:
        raise KeyError(f"no published checkpoint for {arch!r}; known: {sorted(PUBLISHED)}") from None


def checkpoint(model: str, arch: str, weights):
    """The checkpoint (cafi.weights.Checkpoint) a stage loads: the configured one, else the published one."""
    from cafi.weights import Checkpoint

    record = published(arch)
    if weights is None:
        return Checkpoint(model=model, uri=record.uri, sha256=record.sha256, state_key=record.state_key)
    return Checkpoint(model=model, uri=weights.uri, sha256=weights.sha256.lower(), state_key=record.state_key,
                      synthetic=weights.synthetic)
