"""MUSIQ: cafi's network and multi-scale patch encoding against pyiqa's own `musiq_arch.py` (and its
`multiscale_trans_util.py`) on the same random weights.

    python bench/musiq_parity.py --pyiqa /path/to/IQA-PyTorch-checkout [--faces 3] [--seed 0]

Nothing is downloaded: pyiqa's MUSIQ is built with pretrained=False (KonIQ-10k's head: one output).
A synthetic checkpoint in the published layout (`cafi weights synth`'s: a bare state dict) is written
from cafi's random MUSIQ and loaded into pyiqa's net by pyiqa's own `load_pretrained_network(...,
strict=True)`. Compared on generated faces (cafi: uint8 through MusiqScorer; pyiqa: the same pixels
as float [0, 1] through its forward, which encodes the patches itself):
  encoding  cafi's patches, hashed positions, scale ids and mask vs pyiqa's get_multiscale_patches
            (max |diff|; the mask and ids must be equal)
  e2e       max |score diff|, at the crop side (square) and at a non-square size (padding masked)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyiqa_arch import import_pyiqa_arch  # noqa: E402

from cafi.models import musiq  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.weights import Checkpoint, sha256_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyiqa", required=True, help="a checkout of github.com/chaofengc/IQA-PyTorch")
    ap.add_argument("--faces", type=int, default=3)
    ap.add_argument("--size", type=int, default=384, help="face crop side (cafi's image.crop_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    arch, arch_util, steps = import_pyiqa_arch(args.pyiqa, "musiq_arch")
    encode = importlib.import_module("pyiqa.data.multiscale_trans_util").get_multiscale_patches
    print("pyiqa import:\n  " + "\n  ".join(steps))
    theirs = arch.MUSIQ(pretrained=False).eval()
    print("pyiqa net: MUSIQ(pretrained=False): num_class 1, longer sides [224, 384] + the original, patch 32")

    ours = musiq.build("musiq_koniq")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "musiq_koniq_ckpt-synthetic.pth")
        torch.save(ours.state_dict(), path)
        arch_util.load_pretrained_network(theirs, path, True)  # pyiqa's loader, strict
        scorer = musiq.MusiqScorer(Checkpoint("musiq", path, sha256_of(path), None), d, torch.device("cpu"))
    print(f"weights: cafi's random MUSIQ ({len(ours.state_dict())} entries) saved as a bare state dict, "
          "loaded strictly by both")

    enc_diff, scores = 0.0, []
    shapes = [(args.size, args.size)] * args.faces + [(args.size, int(args.size * 0.7))]
    for i, (h, w) in enumerate(shapes):
        img = np.ascontiguousarray(draw_face(args.size, args.seed + i)[:h, :w])
        x01 = torch.from_numpy(img[None].copy()).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            ref = encode((x01 - 0.5) * 2, **theirs.data_preprocess_opts)[0]  # (L, 3*32*32 + 3)
            patches, spatial, scale, mask = musiq.multiscale_patches((x01 - 0.5) / 0.5, ours.dims)
            assert torch.equal(ref[:, -3].long(), spatial[0]) and torch.equal(ref[:, -2].long(), scale[0])
            assert torch.equal(ref[:, -1].bool(), mask[0])
            enc_diff = max(enc_diff, float((ref[:, :-3] - patches[0].flatten(1)).abs().max()))
            b = theirs(x01).item()
        a = float(scorer(img[None])[0])
        scores.append((a, b))
        print(f"face {i} ({h}x{w}, {int(mask.sum())} of {mask.shape[1]} tokens live): cafi {a:.6f}  pyiqa {b:.6f}  "
              f"|diff| {abs(a - b):.2e}", flush=True)
    square = [abs(a - b) for a, b in scores[:-1]]
    print(f"encoding: max |cafi - pyiqa| patch value = {enc_diff:.3e}; positions, scale ids, masks equal")
    print(f"e2e: max |cafi - pyiqa| = {max(square):.3e} over {args.faces} square faces of {args.size} px, "
          f"{abs(scores[-1][0] - scores[-1][1]):.3e} on a {shapes[-1][0]}x{shapes[-1][1]} one; "
          f"score spread {np.ptp([b for _, b in scores]):.3e}")


if __name__ == "__main__":
    main()
