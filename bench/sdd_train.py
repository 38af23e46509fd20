"""Training speed of the SDD-FIQA regressor: images per second of the training step (forward, Smooth L1,
backward, Adam) on random 112x112 faces, the step cafi/train/sdd_fit.py runs in each Ray Train worker. The
published IR-50 by default; --width/--units time a reduced net (as the test uses).

    PYTHONPATH=. python bench/sdd_train.py --batch-size 16 --steps 4
    PYTHONPATH=. python bench/sdd_train.py --width 8 --units 1,1,1,1
"""

from __future__ import annotations

import argparse
import time

import torch

from cafi.models import sddfiqa
from cafi.train.faces import to_input


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=sddfiqa.IR50_WIDTH)
    ap.add_argument("--units", default=",".join(map(str, sddfiqa.IR50_UNITS)))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    units = tuple(int(u) for u in args.units.split(","))
    net = sddfiqa.build(args.width, units).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.SmoothL1Loss()
    faces = torch.randint(0, 256, (args.batch_size, 112, 112, 3), dtype=torch.uint8, device=device)
    labels = torch.rand(args.batch_size, device=device) * 100

    def step() -> None:
        loss = loss_fn(net(to_input(faces, flip=True)).view(-1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    name = "IR-50 (published layout)" if (args.width, units) == (sddfiqa.IR50_WIDTH, sddfiqa.IR50_UNITS) else \
        f"reduced net (width {args.width}, units {list(units)})"
    print(f"sddfiqa training step, {name}, batch {args.batch_size}, {device.type}, "
          f"{torch.get_num_threads()} threads: {args.steps * args.batch_size / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
