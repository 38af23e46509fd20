"""MagFace: cafi's MagFaceScorer against MagFace's own iResNet and loader on the same random weights.

    python bench/magface_parity.py --magface /path/to/MagFace-checkout [--faces 4] [--seed 0]

Nothing to install: MagFace's `models/iresnet.py` needs only torch, and `inference/network_inf.py`
(its inference model and checkpoint loader) also termcolor and tqdm (termcolor is stubbed when
missing). Nothing is downloaded.

How: `cafi weights synth`'s MagFace file (MagFace's DDP training checkpoint layout: epoch, arch,
optimizer, state_dict = `features.module.<k>` + the margin-head shard `parallel_fc.weight`) is
written to a temporary directory, then
  - loaded by MagFace's own `builder_inf` (NetworkBuilder_inf + load_dict_inf/clean_dict_inf, which
    exits unless every backbone key is matched) and by cafi's MagFaceScorer (strict, renamed);
    the same again for the DataParallel layout (`module.features.<k>` + `module.fc.weight`);
  - faces go through MagFace's preprocessing (BGR uint8 -> torchvision ToTensor -> Normalize(0, 1),
    as inference/gen_feat.py) into MagFace's net, and as RGB uint8 into cafi's scorer.
Printed: max |norm diff|, max relative norm diff, max |unit-embedding diff|, for each layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafi.models.magface import MagFaceScorer  # noqa: E402
from cafi.models.registry import PUBLISHED  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.synth import write_checkpoint  # noqa: E402
from cafi.weights import Checkpoint, sha256_of  # noqa: E402


def import_magface(root: str):
    steps = [f"sys.path += {root} (network_inf.py does `from models import iresnet`)"]
    sys.path.insert(0, root)
    try:
        import termcolor  # noqa: F401
    except ImportError:
        stub = types.ModuleType("termcolor")
        stub.cprint = lambda *a, **k: print(*a[:1])
        sys.modules["termcolor"] = stub
        steps.append("stub termcolor.cprint (print)")
    from inference import network_inf

    steps.append("import inference/network_inf.py and models/iresnet.py from the checkout")
    return network_inf, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--magface", required=True, help="a checkout of github.com/IrvingMeng/MagFace")
    ap.add_argument("--faces", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    network_inf, steps = import_magface(os.path.abspath(args.magface))
    print("MagFace import:\n  " + "\n  ".join(steps))
    from torchvision import transforms

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=[0.0] * 3, std=[1.0] * 3)])
    faces = np.stack([cv2.resize(draw_face(384, args.seed + i), (112, 112), interpolation=cv2.INTER_AREA)
                      for i in range(args.faces)])
    rec = PUBLISHED["magface_iresnet100"]

    with tempfile.TemporaryDirectory() as d:
        ddp = write_checkpoint("magface_iresnet100", d, seed=args.seed)
        raw = torch.load(ddp, weights_only=True)
        dp_state = {"module.features." + k.removeprefix("features.module."): v
                    for k, v in raw["state_dict"].items() if k != "parallel_fc.weight"}
        dp_state["module.fc.weight"] = torch.randn(16, 512)
        dp = os.path.join(d, "magface_dp.pth")
        torch.save({**raw, "state_dict": dp_state}, dp)

        for label, path in (("DDP (published) layout", ddp), ("DataParallel layout", dp)):
            margs = types.SimpleNamespace(arch="iresnet100", embedding_size=512, resume=path, cpu_mode=True)
            theirs = network_inf.builder_inf(margs).eval()
            ck = Checkpoint("magface", path, sha256_of(path), rec.state_key, strip_prefixes=rec.strip_prefixes,
                            drop_prefixes=rec.drop_prefixes)
            ours = MagFaceScorer(ck, d, torch.device("cpu"))
            bgr = [f[..., ::-1].copy() for f in faces]  # cv2.imread gives BGR
            with torch.inference_mode():
                emb = theirs(torch.stack([to_tensor(b) for b in bgr])).numpy()
            their_norm = np.linalg.norm(emb, axis=1)
            norm, quality, unit = ours(faces)
            unit_diff = np.abs(unit - emb / their_norm[:, None]).max()
            print(f"{label}: MagFace norms {np.round(their_norm, 4).tolist()}, cafi {np.round(norm, 4).tolist()}")
            print(f"  max |norm diff| {np.abs(norm - their_norm).max():.3e}, "
                  f"max relative {np.max(np.abs(norm - their_norm) / their_norm):.3e}, "
                  f"max |unit embedding diff| {unit_diff:.3e}")


if __name__ == "__main__":
    main()
