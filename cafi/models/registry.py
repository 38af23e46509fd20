"""Typed records of the published checkpoints (as facexlib, pyiqa, MagFace, CR-FIQA and TFace publish
them), each with the licence it is published under and the data it was trained on.

Licences: what the repository that publishes the file states (its LICENSE or README); facexlib
re-publishes other projects' weights and defers to their original licences (its README table), so
those records name the original project. None of the face-recognition weights is trained on data
licensed for commercial use: MS1M (MS-Celeb-1M, withdrawn by its authors), CASIA-WebFace and
CelebAMask-HQ are distributed for non-commercial research only, whatever the code licence says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cafi.errors import ConfigError

FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
PYIQA_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
# MagFace publishes its models on Google Drive and Baidu only (README "Model Zoo",
# IrvingMeng/MagFace@99bae61); no mirror with a manifest exists. This is Drive's direct-download
# form of the iResNet100 file's share link (confirm=t skips the page Drive shows for large files).
MAGFACE_IR100_DRIVE = ("https://drive.usercontent.google.com/download"
                       "?id=1Bd87admxOZvbIOAyTkGEntsEz3fyMt7H&export=download&confirm=t")
# CR-FIQA links Google Drive folders (README "Pretrained model", fdbtrs/CR-FIQA@a8f98da), not files:
# a folder page cannot be fetched as the file, so these are downloaded by hand.
CRFIQA_L_DRIVE = "https://drive.google.com/drive/folders/1siy_3eQSBuIV6U6_9wgGtbZG2GMgVLMy"
CRFIQA_S_DRIVE = "https://drive.google.com/drive/folders/13bE4LP303XA_IzL1YOgG5eN0c8efHU9h"
# SDD-FIQA's IR-50 is one Drive file (Tencent/TFace quality/README.md); Drive's direct-download form.
SDDFIQA_DRIVE = ("https://drive.usercontent.google.com/download"
                 "?id=1AM0iWVfSVWRjCriwZZ3FXiUGbcDzkF25&export=download&confirm=t")

MS1M = "MS1MV2 (refined MS-Celeb-1M; non-commercial research only)"
# pyiqa's licence at chaofengc/IQA-PyTorch@01ae427 (README "License"; the older records above were
# checked when it read CC BY-NC-SA 4.0). Non-commercial either way.
PYIQA_LICENCE = "PolyForm Noncommercial 1.0.0"

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
    # Key renaming on load (cafi.weights.read_state_dict): keys starting with a drop prefix are
    # removed (training-only heads the scorer never runs), then the first matching strip prefix.
    strip_prefixes: tuple[str, ...] = ("module.",)  # DataParallel's wrapper
    drop_prefixes: tuple[str, ...] = ()
    # sha256 is "" when no public manifest gives the file's digest: the config must then name it.
    # What the file name promises about the digest (pyiqa: its first 8 hex digits); checked on fetch.
    sha256_prefix: str = ""
    # The licence the weights are published under, where (source), and what they were trained on.
    licence: str = ""
    source: str = ""
    training_data: str = ""
    # The URI is a web page that lists the file (a Drive folder), not the file: download it by hand.
    manual_download: bool = False
    # No published file at all: the user trains it (`cafi train classic`); the config must name it.
    user_trained: bool = False


PUBLISHED: dict[str, Pretrained] = {
    p.arch: p
    for p in (
        Pretrained(
            arch="retinaface_resnet50",
            licence="MIT", source="biubug6/Pytorch_Retinaface via facexlib", training_data="WIDER FACE",
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
            licence="MIT", source="biubug6/Pytorch_Retinaface via facexlib", training_data="WIDER FACE",
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
            licence="MIT", source="zllrunning/face-parsing.PyTorch via facexlib",
            training_data="CelebAMask-HQ (non-commercial research only)",
            uri=f"{FACEXLIB}/v0.2.0/parsing_bisenet.pth",
            file_name="parsing_bisenet.pth",
            sha256="468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
            input_size=512,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        Pretrained(
            arch="parsenet",
            licence="CC BY-NC-SA 4.0", source="chaofengc/PSFRGAN via facexlib",
            training_data="CelebAMask-HQ (non-commercial research only)",
            uri=f"{FACEXLIB}/v0.2.2/parsing_parsenet.pth",
            file_name="parsing_parsenet.pth",
            sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
            input_size=512,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        Pretrained(
            arch="arcface_ir_se50",
            licence="MIT", source="TreB1eN/InsightFace_Pytorch via facexlib", training_data=MS1M,
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
            licence="CC BY-NC-SA 4.0", source="chaofengc/IQA-PyTorch (pyiqa)",
            training_data="KonIQ-10k (backbones pre-trained on ImageNet)",
            uri=f"{PYIQA_HF}/DBCNN_KonIQ10k-2de81c0a.pth",
            file_name="DBCNN_KonIQ10k-2de81c0a.pth",
            sha256="2de81c0af94ac46fb191fe713c4d72e93e0acb02e6aa29c601f4251e93b9ebe6",
            state_key="params",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            score_range=(0.0, 100.0),  # KonIQ-10k MOS scale
        ),
        Pretrained(
            # MagFace iResNet100 / MS1MV2, DDP with split FC ("trained by original codes"), the
            # file MagFace's inference examples load. MagFace publishes no digest; this is the one
            # fiqat's documentation records for this 283 MB file, and two other public model
            # manifests on GitHub list the same digest (one with the size: 283,040,192 bytes).
            arch="magface_iresnet100",
            licence="MIT", source="IrvingMeng/MagFace", training_data=MS1M,
            uri=MAGFACE_IR100_DRIVE,
            file_name="magface_epoch_00025.pth",
            sha256="cfeba792dada6f1f30d1e118aff077d493dd95dd76c77c30f57f90fd0164ad58",
            state_key="state_dict",
            # DDP training saved `features.module.<k>` (the DataParallel trainer `module.features.<k>`);
            # MagFace's own loader (inference/network_inf.py clean_dict_inf) accepts both. The margin
            # head is dropped, as that loader drops it: `parallel_fc.weight` (the split-FC shard) or
            # `module.fc.weight` (DataParallel). Anything else must match the iResNet exactly.
            strip_prefixes=("features.module.", "module.features."),
            drop_prefixes=("parallel_fc.", "module.fc."),
            input_size=112,
            channel_order="bgr",  # cv2.imread -> ToTensor (/255), Normalize(0, 1) in gen_feat.py
            # Embedding norm: training clamps it to [l_a, u_a] = [10, 110] (run/run_dist.sh); real
            # aligned faces give about 15..35 with this model (toy images 21.8..30.3).
            score_range=(10.0, 110.0),
        ),
        Pretrained(
            # pyiqa `topiq_nr-face` (CFANet, ResNet-50, trained on CGFIQA-40k; since pyiqa 4d382cb).
            # No public manifest gives the full sha256: the config must supply it (see checkpoint()).
            arch="topiq_nr_face",
            licence="CC BY-NC-SA 4.0", source="chaofengc/IQA-PyTorch (pyiqa)",
            training_data="CGFIQA-40k (ResNet-50 pre-trained on ImageNet)",
            uri=f"{PYIQA_HF}/topiq_nr_cgfiqa_res50-0a8b8e4f.pth",
            file_name="topiq_nr_cgfiqa_res50-0a8b8e4f.pth",
            sha256="",
            sha256_prefix="0a8b8e4f",
            state_key="params",
            input_size=512,  # FFHQ-aligned face (cafi.faces.align.align_ffhq)
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            score_range=(0.0, 1.0),  # CGFIQA MOS normalised to [0, 1]; outputs may overshoot slightly
        ),
        Pretrained(
            # pyiqa `maniqa` (train_dataset koniq): the MANIQA authors' KonIQ-10k file (IIGROUP/MANIQA's
            # release name), re-published by pyiqa on Hugging Face; a bare state dict. Its name carries
            # no digest and no public manifest gives one: the config must name it (see checkpoint()).
            arch="maniqa_koniq",
            licence=PYIQA_LICENCE, source="chaofengc/IQA-PyTorch (pyiqa; MANIQA by IIGROUP)",
            training_data="KonIQ-10k (ViT-B/8 pre-trained on ImageNet)",
            uri=f"{PYIQA_HF}/ckpt_koniq10k.pt",
            file_name="ckpt_koniq10k.pt",
            sha256="",
            input_size=224,  # the side of the test-time crops (cafi.models.maniqa.uniform_crops)
            mean=(0.5, 0.5, 0.5),  # pyiqa: IMAGENET_INCEPTION_MEAN / STD
            std=(0.5, 0.5, 0.5),
            score_range=(0.0, 1.0),  # pyiqa's "~0, ~1"
        ),
        Pretrained(
            # pyiqa `musiq` (pretrained koniq10k): Google's KonIQ-10k checkpoint converted by pyiqa
            # (scripts/convert_musiq_to_pth.py); a bare state dict. Full digest unpublished.
            arch="musiq_koniq",
            licence=PYIQA_LICENCE, source="chaofengc/IQA-PyTorch (pyiqa; MUSIQ by google-research)",
            training_data="KonIQ-10k (pre-trained on ImageNet)",
            uri=f"{PYIQA_HF}/musiq_koniq_ckpt-e95806b9.pth",
            file_name="musiq_koniq_ckpt-e95806b9.pth",
            sha256="",
            sha256_prefix="e95806b9",
            mean=(0.5, 0.5, 0.5),  # pyiqa: (x - 0.5) * 2
            std=(0.5, 0.5, 0.5),
            score_range=(0.0, 100.0),  # KonIQ-10k MOS scale (pyiqa's "~0, ~100")
        ),
        Pretrained(
            # CR-FIQA(L): iResNet100 on MS1MV2, the README's `--model_id 181952` (`<step>backbone.pth`).
            # The authors publish no digest (one third-party manifest on GitHub lists sha256 5fca2473...
            # and 261,219,071 bytes: not the authors', so not pinned here); the config must name it.
            arch="crfiqa_iresnet100",
            licence="CC BY-NC 4.0", source="fdbtrs/CR-FIQA", training_data=MS1M,
            uri=CRFIQA_L_DRIVE,
            file_name="181952backbone.pth",
            sha256="",
            manual_download=True,
            strip_prefixes=(),  # saved from the DDP module's own state dict: no prefix
            input_size=112,
            mean=(0.5, 0.5, 0.5),  # evaluation/QualityModel.py: x / 255, - 0.5, / 0.5, RGB
            std=(0.5, 0.5, 0.5),
            # The score is the head's raw regression output (trained on certainty ratios): no fixed range.
        ),
        Pretrained(
            # CR-FIQA(S): iResNet50 on CASIA-WebFace, the README's `--model_id 32572`.
            arch="crfiqa_iresnet50",
            licence="CC BY-NC 4.0", source="fdbtrs/CR-FIQA",
            training_data="CASIA-WebFace (non-commercial research only)",
            uri=CRFIQA_S_DRIVE,
            file_name="32572backbone.pth",
            sha256="",
            manual_download=True,
            strip_prefixes=(),
            input_size=112,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        Pretrained(
            # SDD-FIQA IR-50 regressor on the refined MS1M (Tencent/TFace quality/README.md); the file
            # name TFace's eval.py loads. No published digest: the config must name it.
            arch="sddfiqa_ir50",
            licence="Apache-2.0", source="Tencent/TFace (quality/)", training_data=MS1M,
            uri=SDDFIQA_DRIVE,
            file_name="SDD_FIQA_checkpoints_r50.pth",
            sha256="",
            input_size=112,
            mean=(0.5, 0.5, 0.5),  # eval.py: ToTensor, Normalize(0.5, 0.5), PIL RGB
            std=(0.5, 0.5, 0.5),
            score_range=(0.0, 100.0),  # pseudo-labels min-max scaled to 0..100 in training
        ),
        Pretrained(
            # The score-based FQA classifier (cafi/models/classic.py): nothing published; each team trains
            # its own on its labels with `cafi train classic`, which writes this file and the config block.
            arch="classic_fqa",
            licence="the team's own (trained on its labels and images)", source="cafi train classic",
            training_data="the labelled crops given to `cafi train classic`",
            uri="",
            file_name="classic.pth",
            sha256="",
            user_trained=True,
            state_key="state_dict",
            strip_prefixes=(),
            input_size=112,
            score_range=(0.0, 1.0),  # P(good) + 0.5 P(average)
        ),
    )
}

# Architectures with no published file: toy-width variants of published networks for tests (random
# weights from `cafi weights synth` only) and networks cafi trains itself; the config must name the weights.
# Their preprocessing is that of the published network they are built from.
TESTS = "cafi weights synth (random weights, for tests)"
SDDFIQA_MANIQA = "cafi train sddfiqa --backbone maniqa"
_MANIQA_FACE = dict(input_size=224, score_range=(0.0, 100.0), licence="yours (trained by cafi on your data)",
                    source=SDDFIQA_MANIQA, training_data="your run's SDD-FIQA pseudo-labels")
UNPUBLISHED: dict[str, Pretrained] = {
    p.arch: p
    for p in (
        dataclasses.replace(PUBLISHED["maniqa_koniq"], arch="maniqa_tiny", uri="", file_name="maniqa_tiny.pth",
                            input_size=64, licence="n/a", source=TESTS, training_data="none"),
        dataclasses.replace(PUBLISHED["arcface_ir_se50"], arch="arcface_ir_se50_tiny", uri="", sha256="",
                            file_name="arcface_ir_se50_tiny.pth", licence="n/a", source=TESTS, training_data="none"),
        dataclasses.replace(PUBLISHED["dbcnn"], arch="dbcnn_tiny", uri="", sha256="", file_name="dbcnn_tiny.pth",
                            licence="n/a", source=TESTS, training_data="none"),
        dataclasses.replace(PUBLISHED["musiq_koniq"], arch="musiq_tiny", uri="", sha256_prefix="",
                            file_name="musiq_tiny.pth", licence="n/a", source=TESTS, training_data="none"),
        dataclasses.replace(PUBLISHED["maniqa_koniq"], arch="sddfiqa_maniqa", uri="", file_name="sddfiqa.pth",
                            **_MANIQA_FACE),
        dataclasses.replace(PUBLISHED["maniqa_koniq"], arch="sddfiqa_maniqa_tiny", uri="",
                            file_name="sddfiqa_maniqa_tiny.pth", **{**_MANIQA_FACE, "input_size": 64, "source": TESTS}),
    )
}


def published(arch: str) -> Pretrained:
    try:
        return PUBLISHED[arch] if arch in PUBLISHED else UNPUBLISHED[arch]
    except KeyError:
        raise KeyError(f"no published checkpoint for {arch!r}; known: {sorted(PUBLISHED)}") from None


def checkpoint(model: str, arch: str, weights):
    """The checkpoint (cafi.weights.Checkpoint) a stage loads: the configured one, else the published
    one. `model` is the stage's config key (models.<model>); the record's file layout and key
    renaming apply either way."""
    from cafi.weights import Checkpoint

    record = published(arch)
    layout = {"state_key": record.state_key, "strip_prefixes": record.strip_prefixes,
              "drop_prefixes": record.drop_prefixes}
    if weights is None:
        if record.user_trained:
            raise ConfigError(
                f"models.{model}.weights: the {model} scorer has no published weights; train them on your labels "
                f"with `cafi train {model} LABELS.csv --run RUN --out DIR` and add the block DIR/{model}.yaml "
                f"holds (models.{model}.weights.uri and .sha256) to your config"
            )
        if arch in UNPUBLISHED:
            raise ConfigError(f"models.{model}.weights: {arch} has no published file (its weights come from "
                              f"`{record.source.split(' (')[0]}`): set models.{model}.weights.uri and .sha256")
        if not record.sha256:
            hint = (f" (pyiqa names the file by its digest: it starts with {record.sha256_prefix})"
                    if record.sha256_prefix else "")
            if record.manual_download:
                raise ConfigError(
                    f"models.{model}.weights: {record.source} publishes {record.file_name} only on a web page "
                    f"({record.uri}) and no sha256 of it: download it by hand, then set models.{model}.weights.uri "
                    f"and models.{model}.weights.sha256 (sha256sum of your copy)"
                )
            raise ConfigError(
                f"models.{model}.weights: no public manifest gives the sha256 of the published "
                f"{record.file_name}, so cafi cannot verify it by itself; set models.{model}.weights.uri "
                f"and models.{model}.weights.sha256 (`cafi weights fetch DEST` copies {record.uri} and "
                f"prints both; or download it and run sha256sum{hint})"
            )
        return Checkpoint(model=model, uri=record.uri, sha256=record.sha256, **layout)
    return Checkpoint(model=model, uri=weights.uri, sha256=weights.sha256.lower(), synthetic=weights.synthetic,
                      **layout)
