"""SER-FIQ: head-only repetition vs T full forward passes vs one plain embedding pass.

Same inputs, same (synthetic) weights, same dropout masks, measured in one run:
  full    T complete forward passes of facexlib's IR-SE50 with dropout masks (the reference method)
  head    cafi: the trunk once, the stochastic head T times
  plain   one deterministic embedding pass (what recognition alone would cost)

    python bench/serfiq.py [--faces 16] [--samples 100] [--threads 2] [--repeats 3]

The last line reads `serfiq head-only speedup: <full/head>x`.
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

from cafi.models.registry import published  # noqa: E402
from cafi.models.runtime import to_input  # noqa: E402
from cafi.models.serfiq import SerFiq  # noqa: E402
from cafi.samples import draw_face  # noqa: E402
from cafi.synth import write_checkpoint  # noqa: E402
from cafi.weights import Checkpoint, sha256_of  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=16)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as d:
        path = write_checkpoint("arcface_ir_se50", d)
        model = SerFiq(Checkpoint("serfiq", path, sha256_of(path)), d, torch.device("cpu"),
                       samples=args.samples, dropout=0.5)
    import cv2

    faces = np.stack([cv2.resize(draw_face(384, s), (112, 112)) for s in range(args.faces)])
    net, masks, p = model.net, model.masks, model.dropout
    x = to_input(faces, torch.device("cpu"), published("arcface_ir_se50")).contiguous()

    class Replay(torch.nn.Module):  # nn.Dropout with a given mask, for the reference method
        keep = None

        def forward(self, v):
            return v * self.keep / (1 - p)

    def full():
        original, replay = net.output_layer[1], Replay()
        net.output_layer[1] = replay
        with torch.inference_mode():
            embs = []
            for t in range(args.samples):
                replay.keep = masks[t].view(1, 512, 7, 7)
                embs.append(net(x))
        net.output_layer[1] = original
        return torch.stack(embs, 1)

    t_head = best_of(lambda: model(faces), args.repeats)
    t_plain = best_of(lambda: model.embed(faces), args.repeats)
    t = time.perf_counter()  # the net is warm by now; T full passes are slow enough to time once
    full()
    t_full = time.perf_counter() - t

    per = 1000 / args.faces
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
          f"{args.faces} faces, T={args.samples}")
    print(f"T full passes (reference) : {t_full * per:9.1f} ms/face")
    print(f"head-only (cafi)          : {t_head * per:9.1f} ms/face")
    print(f"one plain embedding pass  : {t_plain * per:9.1f} ms/face")
    print(f"head-only / plain pass    : {t_head / t_plain:.2f}x (target <= 1.3x)")
    print(f"serfiq head-only speedup: {t_full / t_head:.1f}x")


if __name__ == "__main__":
    main()
