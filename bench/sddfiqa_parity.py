"""SDD-FIQA: cafi's SddFiqaScorer against TFace's own IR-50 regressor, loader and preprocessing, same
random weights.

    python bench/sddfiqa_parity.py --tface /path/to/TFace-checkout [--faces 4] [--seed 0]

Nothing to install beyond cafi's environment: TFace's `quality/eval.py` needs torch, torchvision, scipy,
PIL and its own `generate_pseudo_labels/extract_embedding/model/model.py`. Nothing is downloaded.

How: `cafi weights synth`'s SDD-FIQA file (the training script's `net.state_dict()` under DataParallel:
`module.` + TFace's key names) is written to a temporary directory, then
  - loaded by TFace's own `eval.network` (R50(use_type="Qua"), `module.` stripped) — which merges the
    file into the net's state without checking — after checking here that the file's keys and shapes
    are exactly the net's (what a strict load checks);
  - each face is written as a PNG and read by TFace's `eval.read_img` (PIL RGB, Resize(112), ToTensor,
    Normalize(0.5, 0.5)), then scored by TFace's net;
  - the same faces as RGB uint8 into cafi's scorer (strict load through cafi.weights).
Printed: max |score diff| (SDD-FIQA yields no embedding).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafi.config import WeightsConfig  # noqa: E402
from cafi.models.registry import checkpoint  # noqa: E402
from cafi.models.sddfiqa import SddFiqaScorer  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.synth import write_checkpoint  # noqa: E402
from cafi.weights import sha256_of  # noqa: E402


def import_tface(root: str):
    quality = os.path.join(root, "quality")
    sys.path.insert(0, quality)
    import eval as tface_eval  # quality/eval.py: `from generate_pseudo_labels.extract_embedding.model import model`

    return tface_eval, [f"sys.path += {quality}", "import quality/eval.py (and its model.py) from the checkout"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tface", required=True, help="a checkout of github.com/Tencent/TFace")
    ap.add_argument("--faces", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tface_eval, steps = import_tface(os.path.abspath(args.tface))
    print("TFace import:\n  " + "\n  ".join(steps))
    faces = np.stack([cv2.resize(draw_face(384, args.seed + i), (112, 112), interpolation=cv2.INTER_AREA)
                      for i in range(args.faces)])
    with tempfile.TemporaryDirectory() as d:
        path = write_checkpoint("sddfiqa_ir50", d, seed=args.seed)
        theirs = tface_eval.network(path, "cpu")
        published = {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True).items()}
        expected = theirs.state_dict()
        assert list(published) == list(expected), "key names or order differ from TFace's R50(use_type='Qua')"
        assert all(published[k].shape == v.shape for k, v in expected.items()), "shapes differ"
        print(f"synth file: {len(published)} tensors, TFace's names and shapes, all with the `module.` prefix")
        ref = []
        with torch.inference_mode():
            for i, face in enumerate(faces):
                png = os.path.join(d, f"{i}.png")
                cv2.imwrite(png, face[..., ::-1])  # PNG on disk; PIL reads it back as RGB
                ref.append(float(theirs(tface_eval.read_img(png)).squeeze()))
        ck = checkpoint("sddfiqa", "sddfiqa_ir50", WeightsConfig(uri=path, sha256=sha256_of(path), synthetic=True))
        ours = SddFiqaScorer(ck, d, torch.device("cpu"))(faces)
        ref = np.array(ref, np.float32)
        print(f"TFace scores {np.round(ref, 5).tolist()}, cafi {np.round(ours, 5).tolist()}")
        print(f"  max |score diff| {np.abs(ours - ref).max():.3e}")


if __name__ == "__main__":
    main()
