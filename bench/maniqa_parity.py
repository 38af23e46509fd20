"""MANIQA: cafi's network against pyiqa's own `maniqa_arch.py` on the same random weights.

    python bench/maniqa_parity.py --pyiqa /path/to/IQA-PyTorch-checkout [--faces 2] [--crops 20] [--seed 0]

Needs einops importable (pyiqa's MANIQA uses it; not a cafi dependency: e.g. `pip install --target
/tmp/parity-site --no-deps einops` and PYTHONPATH=/tmp/parity-site); timm is cafi's own. Nothing is
downloaded: pyiqa's constructor asks timm for the pretrained ViT-B/8, so timm.create_model is called
with pretrained=False while it runs, and MANIQA itself is built with pretrained=False (koniq's
arguments: scale 0.8, test_sample = --crops).

A synthetic checkpoint in the published layout (`cafi weights synth`'s: a bare state dict) is written
from cafi's random MANIQA and loaded into pyiqa's net by pyiqa's own `load_pretrained_network(...,
strict=True)`. Both score the same generated faces (cafi: uint8 through ManiqaScorer; pyiqa: the
same pixels as float [0, 1], its forward normalising and cropping): max |score diff|, and the
spread of the scores for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyiqa_arch import import_pyiqa_arch  # noqa: E402

from cafi.models import maniqa  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.weights import Checkpoint, sha256_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyiqa", required=True, help="a checkout of github.com/chaofengc/IQA-PyTorch")
    ap.add_argument("--faces", type=int, default=2)
    ap.add_argument("--crops", type=int, default=20, help="test-time crops (pyiqa's test_sample)")
    ap.add_argument("--size", type=int, default=384, help="face crop side (cafi's image.crop_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    arch, arch_util, steps = import_pyiqa_arch(args.pyiqa, "maniqa_arch")
    print("pyiqa import:\n  " + "\n  ".join(steps))
    create = arch.timm.create_model
    arch.timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)
    theirs = arch.MANIQA(train_dataset="koniq", scale=0.8, test_sample=args.crops, pretrained=False).eval()
    arch.timm.create_model = create
    print(f"pyiqa net: MANIQA(train_dataset='koniq', scale=0.8, test_sample={args.crops}, pretrained=False), "
          "its ViT built with pretrained=False")

    ours = maniqa.build("maniqa_koniq")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt_koniq10k.pt")
        torch.save(ours.state_dict(), path)
        arch_util.load_pretrained_network(theirs, path, True)  # pyiqa's loader, strict
        scorer = maniqa.ManiqaScorer(Checkpoint("maniqa", path, sha256_of(path), None), d, torch.device("cpu"),
                                     crops=args.crops)
    print(f"weights: cafi's random MANIQA ({len(ours.state_dict())} entries) saved as a bare state dict, "
          "loaded strictly by both")

    diffs, scores = [], []
    for i in range(args.faces):
        img = draw_face(args.size, args.seed + i)
        t = time.perf_counter()
        a = float(scorer(img[None])[0])
        t_ours = time.perf_counter() - t
        with torch.inference_mode():
            t = time.perf_counter()
            b = theirs(torch.from_numpy(img[None].copy()).permute(0, 3, 1, 2).float() / 255.0).item()
            t_theirs = time.perf_counter() - t
        diffs.append(abs(a - b))
        scores.append(b)
        print(f"face {i}: cafi {a:.7f}  pyiqa {b:.7f}  |diff| {abs(a - b):.2e}  "
              f"(cafi {t_ours:.1f} s, pyiqa {t_theirs:.1f} s)", flush=True)
    print(f"e2e: max |cafi - pyiqa| = {max(diffs):.3e} over {args.faces} faces of {args.size} px, "
          f"{args.crops} crops each; score spread {np.ptp(scores):.3e}")


if __name__ == "__main__":
    main()
