"""CR-FIQA: cafi's CrFiqaScorer against CR-FIQA's own iResNet, loader and preprocessing, same random weights.

    python bench/crfiqa_parity.py --crfiqa /path/to/CR-FIQA-checkout [--faces 4] [--seed 0]

Nothing to install beyond cafi's environment: CR-FIQA's `backbones/iresnet.py` needs only torch;
`evaluation/QualityModel.py` imports `evaluation/FaceModel.py`, which imports cv2 and
sklearn.preprocessing.normalize (stubbed with numpy's L2 normalisation when scikit-learn is missing).
Nothing is downloaded.

How, for each published variant (CR-FIQA(L) iResNet100, CR-FIQA(S) iResNet50): `cafi weights synth`'s
file (the backbone's plain state dict, `<step>backbone.pth`) is written to a temporary directory, then
  - loaded as QualityModel._get_model loads it: `iresnet100/iresnet50(num_features=512, qs=1,
    use_se=False)` from the checkout, `load_state_dict(torch.load(...))` (strict), eval mode;
  - faces go through CR-FIQA's own preprocessing: FaceModel.get_batch_feature's (N,3,112,112) uint8 blob
    in RGB (the README: RGB input, OpenCV's BGR converted) and QualityModel._getFeatureBlob (/255, -0.5,
    /0.5; its `.cuda()` is a no-op on this CPU run), then sklearn-style L2 normalisation of the features;
  - the same faces as RGB uint8 into cafi's scorer (strict load through cafi.weights).
Printed per variant: max |score diff| and the minimum cosine between the two unit embeddings.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import sys
import tempfile
import types

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafi.config import WeightsConfig  # noqa: E402
from cafi.models.crfiqa import CrFiqaScorer  # noqa: E402
from cafi.models.registry import checkpoint  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.synth import write_checkpoint  # noqa: E402
from cafi.weights import sha256_of  # noqa: E402


def import_crfiqa(root: str):
    steps = [f"sys.path += {root} (QualityModel.py does `from backbones.iresnet import ...`)"]
    sys.path.insert(0, root)
    try:
        import sklearn.preprocessing  # noqa: F401
    except ImportError:
        stubs = {name: types.ModuleType(name) for name in ("sklearn", "sklearn.preprocessing")}
        for name, module in stubs.items():  # a spec: torch's import-time module scans look for one
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stubs["sklearn.preprocessing"].normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
        sys.modules.update(stubs)
        steps.append("stub sklearn.preprocessing.normalize (row-wise L2, as sklearn's default)")
    from backbones import iresnet
    from evaluation import QualityModel

    steps.append("import backbones/iresnet.py and evaluation/QualityModel.py from the checkout")
    return iresnet, QualityModel.QualityModel, sys.modules["evaluation.FaceModel"].normalize, steps


def their_scores(iresnet, quality_model, normalize, arch: str, path: str, rgb: np.ndarray):
    """QualityModel._get_model's construction and load, then get_batch_feature's blob -> _getFeatureBlob."""
    build = iresnet.iresnet100 if arch == "crfiqa_iresnet100" else iresnet.iresnet50
    net = build(num_features=512, qs=1, use_se=False)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict, as theirs
    net.eval()
    model = quality_model.__new__(quality_model)  # no __init__: it puts the net on cuda:<gpu>
    model.model = net
    blob = np.stack([np.transpose(face, (2, 0, 1)) for face in rgb])
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # this CPU box: _getFeatureBlob's .cuda() stays on CPU
    try:
        feat, qs = model._getFeatureBlob(blob)
    finally:
        torch.Tensor.cuda = cuda
    return qs.reshape(-1), normalize(feat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crfiqa", required=True, help="a checkout of github.com/fdbtrs/CR-FIQA")
    ap.add_argument("--faces", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    iresnet, quality_model, normalize, steps = import_crfiqa(os.path.abspath(args.crfiqa))
    print("CR-FIQA import:\n  " + "\n  ".join(steps))
    faces = np.stack([cv2.resize(draw_face(384, args.seed + i), (112, 112), interpolation=cv2.INTER_AREA)
                      for i in range(args.faces)])
    with tempfile.TemporaryDirectory() as d:
        for arch in ("crfiqa_iresnet100", "crfiqa_iresnet50"):
            path = write_checkpoint(arch, d, seed=args.seed)
            ref_q, ref_emb = their_scores(iresnet, quality_model, normalize, arch, path, faces)
            ck = checkpoint("crfiqa", arch, WeightsConfig(uri=path, sha256=sha256_of(path), synthetic=True))
            q, emb = CrFiqaScorer(arch, ck, d, torch.device("cpu"))(faces)
            cos = np.sum(emb.astype(np.float64) * ref_emb, axis=1)
            print(f"{arch}: CR-FIQA scores {np.round(ref_q, 5).tolist()}, cafi {np.round(q, 5).tolist()}")
            print(f"  max |score diff| {np.abs(q - ref_q).max():.3e}, min embedding cosine {cos.min():.9f}")


if __name__ == "__main__":
    main()
