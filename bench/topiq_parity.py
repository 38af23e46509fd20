"""TOPIQ face: cafi's CFANet against pyiqa's own `topiq_nr-face` code on the same random weights.

    python bench/topiq_parity.py --pyiqa /path/to/IQA-PyTorch-checkout [--faces 3] [--seed 0]

Needs timm importable (pyiqa builds its backbone with it; timm is not a cafi dependency: e.g.
`pip install --target /tmp/parity-site --no-deps timm huggingface_hub safetensors` and
PYTHONPATH=/tmp/parity-site). Nothing is downloaded.

How: pyiqa's package __init__ imports every metric, so only `pyiqa/archs/topiq_arch.py` and the
few modules it imports are loaded from the checkout (the packages `pyiqa`, `pyiqa.archs`,
`pyiqa.utils` are registered as empty namespaces; the CLIP and Swin backbone modules, unused with
ResNet-50, are stubbed; facexlib's FaceRestoreHelper is replaced while constructing, as its
constructor would download detectors). CFANet is built with topiq_nr-face's arguments and
`backbone_pretrain=False, pretrained=False`; a synthetic checkpoint in pyiqa's layout
(`cafi weights synth`'s format: {"params": state_dict}) is written from cafi's random CFANet and
loaded into pyiqa's net with pyiqa's own `load_pretrained_network(..., strict=True, 'params')`.

Compared, on generated faces with landmarks from a random similarity of the FFHQ template:
  align   cafi's align_ffhq (uint8) vs facexlib's FaceRestoreHelper.align_warp_face (run unbound on
          the same landmarks, on pyiqa's float BGR image): max |pixel diff|
  net     both nets on the same normalised input: max |score diff|
  e2e     pyiqa's path (facexlib crop, float, /255, CFANet.forward with its test resize) vs
          cafi's TopiqFaceScorer on align_ffhq's crop: max |score diff|
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyiqa_arch import import_pyiqa_arch  # noqa: E402 - bench/ is on the path when run as a script

from cafi.faces.align import FFHQ_TEMPLATE_512, align_ffhq  # noqa: E402
from cafi.models import topiq  # noqa: E402
from cafi.models.runtime import to_input  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.weights import Checkpoint, sha256_of  # noqa: E402


def import_pyiqa_topiq(root: str):
    """pyiqa/archs/topiq_arch.py from the checkout (bench/pyiqa_arch.py); its CLIP and Swin backbones
    are stubbed: unused with resnet50."""
    return import_pyiqa_arch(root, "topiq_arch", stubs={"pyiqa.archs.clip_model": {"load": None},
                                                         "pyiqa.archs.topiq_swin": {"create_swin": None}})


def facexlib_align(bgr_float: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """facexlib's own align_warp_face, run on a helper that skips the constructor (no detector)."""
    from facexlib.utils.face_restoration_helper import FaceRestoreHelper

    helper = FaceRestoreHelper.__new__(FaceRestoreHelper)
    helper.face_template = FFHQ_TEMPLATE_512.astype(np.float64) * 1.0  # face_size 512, crop_ratio (1, 1)
    helper.face_size = (512, 512)
    helper.pad_blur = False
    helper.input_img = bgr_float
    helper.all_landmarks_5 = [landmarks]
    helper.affine_matrices, helper.cropped_faces = [], []
    FaceRestoreHelper.align_warp_face(helper)
    return helper.cropped_faces[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyiqa", required=True, help="a checkout of github.com/chaofengc/IQA-PyTorch")
    ap.add_argument("--faces", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    arch, arch_util, steps = import_pyiqa_topiq(os.path.abspath(args.pyiqa))
    print("pyiqa import:\n  " + "\n  ".join(steps))
    real_helper = arch.FaceRestoreHelper
    arch.FaceRestoreHelper = lambda *a, **k: None  # its constructor would download detectors
    theirs = arch.CFANet(semantic_model_name="resnet50", model_name="topiq_nr_cgfiqa_res50", backbone_pretrain=False,
                         use_ref=False, test_img_size=512, pretrained=False, align_crop_face=False).eval()
    arch.FaceRestoreHelper = real_helper
    print("pyiqa net: CFANet(resnet50, topiq_nr_cgfiqa_res50, use_ref=False, test_img_size=512), "
          "align_crop_face=False (faces are aligned here, below)")

    ours = topiq.build()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "topiq_nr_cgfiqa_res50-synthetic.pth")
        torch.save({"params": ours.state_dict()}, path)
        arch_util.load_pretrained_network(theirs, path, True, weight_keys="params")  # pyiqa's loader, strict
        scorer = topiq.TopiqFaceScorer(Checkpoint("topiq_face", path, sha256_of(path), "params"), d,
                                       torch.device("cpu"))
    print(f"weights: cafi's random CFANet ({len(ours.state_dict())} entries) saved as {{'params': ...}}, "
          "loaded strictly by both")

    align_diff, net_diff, e2e_diff = 0.0, 0.0, 0.0
    for i in range(args.faces):
        img = draw_face(384, args.seed + i)
        angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.45, 0.7)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        lm = (FFHQ_TEMPLATE_512 - 256) @ rot.T * scale + rng.uniform(170, 214, 2) + rng.normal(0, 1.5, (5, 2))
        lm = lm.astype(np.float32)

        cafi_face = align_ffhq(img[None], lm[None])[0]
        bgr = img[..., ::-1].astype(np.float32)  # pyiqa: tensor [0,1] * 255 -> numpy, RGB -> BGR
        their_face = facexlib_align(bgr, lm)[..., ::-1]  # back to RGB, float
        align_diff = max(align_diff, float(np.abs(cafi_face.astype(np.float32) - their_face).max()))

        with torch.inference_mode():
            x = to_input(cafi_face[None], torch.device("cpu"), scorer.record).contiguous()
            a = ours(x).item()
            # pyiqa normalises inside its forward: it takes RGB in [0, 1]
            t = torch.from_numpy(cafi_face[None].copy()).permute(0, 3, 1, 2).float() / 255.0
            b = theirs(t).item()
            net_diff = max(net_diff, abs(a - b))
            their_e2e = theirs(torch.from_numpy(their_face[None].copy()).permute(0, 3, 1, 2).float() / 255.0).item()
        ours_e2e = float(scorer(cafi_face[None])[0])
        e2e_diff = max(e2e_diff, abs(ours_e2e - their_e2e))
        print(f"face {i}: cafi {a:.6f}  pyiqa {b:.6f}  |  e2e cafi {ours_e2e:.6f}  pyiqa {their_e2e:.6f}")

    print(f"align: max |cafi align_ffhq - facexlib align_warp_face| = {align_diff:.3f} (0..255 scale)")
    print(f"net:   max |cafi - pyiqa| on the same input = {net_diff:.3e}")
    print(f"e2e:   max |cafi - pyiqa| from the same landmarks = {e2e_diff:.3e}")


if __name__ == "__main__":
    main()
