"""CUDA fast paths on one GPU: each model stage alone by precision and batch size, torch.compile,
the per-image loop, and the cafi job end to end on an embedded local Ray.

Everything is measured in one run on the same synthetic weights (published formats) and the
same crops (--distinct generated crops, repeated as files under distinct names up to --e2e-n):
  stages   each cafi model stage class (what an actor runs) called on pre-decoded 384x384
           crops in batches; fp32 is the baseline each precision is compared with
  compile  the dbcnn stage with models.compile=true: compile time, then crops/s against eager
  loop     the per-image notebook loop of bench/pipeline.py on the GPU (batch 1; SER-FIQ as T
           full passes in one batch of T copies, the generous reference)
  cafi     cafi.pipeline.run end to end (listing, actors, model loads, scoring, Parquet,
           commit): the four models fused in one actor holding the GPU, against four actor
           pools sharing it

    python bench/gpu.py [--n 1024] [--batch-sizes 32,64,128] [--precisions fp32,fp16,bf16]
                        [--compile] [--loop-n 8] [--e2e-n 8192] [--e2e fused,pools]

Needs CUDA. Targets (issue 7, H100): DBCNN stage >= 1,500 crops/s at 384x384; end to end
>= 500 crops/s per GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)
import torch  # noqa: E402
from memory import write_inputs  # noqa: E402  (bench/memory.py: inputs as hard links)

from cafi.config import load_config  # noqa: E402
from cafi.stages.specs import specs_for  # noqa: E402

GPUS = 1 if torch.cuda.is_available() else 0
# Every FIQA scorer is timed alone (issue 21); the bounds below count only the configured job's stages.
FIQA_KINDS = "models.fiqa.also=[magface,crfiqa,sddfiqa]"
E2E = {
    "fused": ["ray.fuse_models=true", *bench.every_model("num_gpus", GPUS), *bench.every_model("num_cpus", 1)],
    "pools": ["ray.fuse_models=false", *bench.every_model("num_gpus", GPUS / 4),
              *bench.every_model("num_cpus", 1 if GPUS else 0.25)],
}


def gpu_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch {torch.__version__}"


def byte_batch(cfg, paths: list[str], n: int) -> dict:
    """The read tasks' output (encoded bytes, header checked) for `paths`, tiled to n rows."""
    from cafi.stages.read import read_objects

    base = read_objects({"uri": np.asarray(paths, dtype=object)}, cfg)
    reps = -(-n // len(paths))
    return {k: np.concatenate([v] * reps)[:n] for k, v in base.items()}


def stage_inputs(cfg, paths: list[str], n: int) -> dict[str, dict]:
    """The input batch of every model stage: crops decoded on the host and tiled to n, then each
    stage's output computed once (fp32, untimed) as the next one's input."""
    from cafi.stages.decode import Decode
    from cafi.stages.specs import specs_for, stage_columns

    batch = Decode(cfg.image, torch.device("cpu"), os.cpu_count())(byte_batch(cfg, paths, n))
    inputs = {}
    for s in specs_for(cfg):
        inputs[s.name] = {k: v.copy() for k, v in batch.items()}
        stage = s.stage(s, cfg, load=True, outputs=stage_columns(s, cfg))
        batch = _run(stage, inputs[s.name], 64)
        batch = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        del stage
    return inputs


def time_decode(cfg, paths: list[str], n: int, size: int, device: str) -> dict[str, float]:
    """Crops/s of the actor's decode: host threads (every CPU) vs batched JPEGs on the device."""
    from cafi.stages.decode import Decode

    out = {}
    for name, dec in (("host threads", Decode(cfg.image, torch.device("cpu"), os.cpu_count())),
                      ("device JPEG batches", Decode(cfg.image, torch.device(device), os.cpu_count(),
                                                     jpeg_batches=True))):
        parts = _slices(byte_batch(cfg, paths, n), size)
        dec(bench._take(parts[0], slice(0, size)))  # warm-up
        sync()
        t = time.perf_counter()
        for part in parts:
            dec(part)
        sync()
        out[name] = n / (time.perf_counter() - t)
    return out


def decode_agreement(cfg, paths: list[str], device: str) -> str:
    """The device path against the host path on the same files: pixel levels and every score."""
    from cafi.stages.actor import FusedModels
    from cafi.stages.decode import Decode

    files = byte_batch(cfg, paths, len(paths))
    host = Decode(cfg.image, torch.device("cpu"))(bench._take(files, slice(None)))
    dev = Decode(cfg.image, torch.device(device), jpeg_batches=True)(bench._take(files, slice(None)))
    diff = np.abs(host["image"].astype(int) - dev["image"].cpu().numpy().astype(int))
    models = FusedModels(cfg, decode=False)
    a, b = models(host), models(dev)
    scores = ", ".join(f"{c} {np.nanmax(np.abs(a[c] - b[c])):.2g}" for c in
                       ("det_score", "serfiq_raw", "mask_fraction", "dbcnn", "sharpness") if c in a)
    return (f"device vs host decode on {len(paths)} files: pixels mean |diff| {diff.mean():.3f} levels, "
            f"max {diff.max()}; max |score diff|: {scores}")


def _slices(batch: dict, size: int) -> list[dict]:
    """Copies of consecutive `size`-row slices (stages write into their batch)."""
    return [bench._take(batch, s) for s in bench._batches(len(batch["uri"]), size)]


def _run(stage, batch: dict, size: int) -> dict:
    return bench._concat([stage(p) for p in _slices(batch, size)])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_stage(stage, batch: dict, size: int, repeats: int = 2) -> float:
    """Crops/s of `stage` over `batch` in batches of `size` (copies made before the clock starts;
    two warm-up batches first so cuDNN's algorithm search stays out of the numbers)."""
    for part in _slices(batch, size)[:2]:
        stage(part)
    best = float("inf")
    for _ in range(repeats):
        parts = _slices(batch, size)
        sync()
        t = time.perf_counter()
        for part in parts:
            stage(part)
        sync()
        best = min(best, time.perf_counter() - t)
    return len(batch["uri"]) / best


def bench_stages(cfg_files: list[str], over: list[str], inputs: dict, sizes: list[int],
                 precisions: list[str]) -> dict:
    from cafi.stages.specs import specs_for, stage_columns

    table: dict[tuple[str, str, int], float] = {}
    for precision in precisions:
        cfg = load_config(cfg_files, [*over, f"models.precision={precision}"])
        for s in specs_for(cfg):
            stage = s.stage(s, cfg, load=True, outputs=stage_columns(s, cfg))
            for size in sizes:
                table[(s.name, precision, size)] = rate = time_stage(stage, inputs[s.name], size)
                print(f"  {s.name:<12} {precision:<5} batch {size:>4}: {rate:>8.0f} crops/s", flush=True)
            del stage
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="crops per stage measurement")
    ap.add_argument("--distinct", type=int, default=256, help="distinct generated crops")
    ap.add_argument("--batch-sizes", default="32,64,128")
    ap.add_argument("--precisions", default="fp32,fp16,bf16")
    ap.add_argument("--compile", action="store_true", help="also time the dbcnn stage with models.compile=true")
    ap.add_argument("--loop-n", type=int, default=8, help="crops through the per-image loop (0 = skip)")
    ap.add_argument("--e2e-n", type=int, default=8192, help="crops scored end to end (0 = skip)")
    ap.add_argument("--e2e", default="fused,pools", help=f"end-to-end configurations, from {list(E2E)}")
    ap.add_argument("--e2e-precision", default="fp16")
    ap.add_argument("--e2e-batch", type=int, default=64)
    ap.add_argument("--e2e-compile", default="false", choices=["false", "true"], help="models.compile end to end")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for everything")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script, tiny sizes
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]

    print(bench.machine_line(), flush=True)
    print(gpu_line() if device == "cuda" else "no CUDA: dry run on the CPU", flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-gpu-bench-") as d:
        t = time.perf_counter()
        weights_cfg, crops = bench.setup(d, args.distinct, "retinaface_resnet50", "bisenet")
        over = [f"input.uri={os.path.dirname(crops[0])}", f"output.uri={d}/out", *bench.base_overrides(d),
                f"models.device={device}", *args.overrides]
        cfg = load_config([weights_cfg], over)
        print(f"setup {time.perf_counter() - t:.1f} s: {args.distinct} distinct crops, crop {cfg.image.crop_size}, "
              f"parser bisenet@{cfg.models.parser.input_size}, SER-FIQ T={cfg.models.serfiq.samples}", flush=True)

        # ---- each stage alone
        inputs = stage_inputs(load_config([weights_cfg], [*over, FIQA_KINDS]), crops, args.n)
        print(f"\nstages alone on the GPU, {args.n} crops (crops/s, best of 2):", flush=True)
        table = bench_stages([weights_cfg], [*over, FIQA_KINDS], inputs, sizes, precisions)
        job = {s.name for s in specs_for(cfg)}
        if "fp32" in precisions:
            print("\nspeedup over fp32 at the same batch size:")
            for (name, precision, size), rate in table.items():
                if precision != "fp32":
                    print(f"  {name:<12} {precision:<5} batch {size:>4}: {rate / table[(name, 'fp32', size)]:.2f}x")
        best = {}
        for (name, precision, size), rate in table.items():
            if name in job and rate > best.get(name, (0, None, None))[0]:
                best[name] = (rate, precision, size)
        decode = time_decode(cfg, crops, args.n, args.e2e_batch, device)
        print("\n".join(f"decode, {k}: {v:.0f} crops/s" for k, v in decode.items()), flush=True)
        print(decode_agreement(cfg, crops[:64], device), flush=True)
        chain = 1.0 / sum(1.0 / r for r, _, _ in best.values())
        for name, (rate, precision, size) in best.items():
            print(f"best {name}: {rate:.0f} crops/s ({precision}, batch {size})")
        # the bound the job is held to: the same models at the job's precision and batch size, back to back
        at_e2e = [table.get((name, args.e2e_precision, args.e2e_batch)) for name in best]
        bound = 1.0 / (sum(1.0 / r for r in at_e2e) + 1.0 / max(decode.values())) if all(at_e2e) else None
        print(f"the stages back to back at their best: {chain:.0f} crops/s; at {args.e2e_precision}, batch "
              f"{args.e2e_batch}, with device decoding: {bound and round(bound)} crops/s (the end-to-end bound)")
        dbcnn_best = best["dbcnn"]
        print(f"DBCNN stage at {cfg.image.crop_size}x{cfg.image.crop_size}: {dbcnn_best[0]:.0f} crops/s "
              f"(target >= 1500)", flush=True)

        # ---- the per-image loop
        loop_s = None
        if args.loop_n:
            from pipeline import NotebookLoop

            nb = NotebookLoop(cfg, "batched", torch.device(device))
            walls, _, _ = nb.run(crops[: args.loop_n])
            loop_s = float(np.median(walls))
            print(f"\nper-image loop on the GPU ({args.loop_n} crops, fp32, batch 1): {loop_s * 1000:.0f} ms/img "
                  f"median = {1 / loop_s:.1f} img/s", flush=True)
            del nb

        # ---- the cafi job end to end
        if args.e2e_n:
            import ray
            from pipeline import operator_table

            ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
            ray.data.DataContext.get_current().issue_detectors_config.detectors = []  # memory advice lines
            from cafi import pipeline

            e2e_over = [f"models.precision={args.e2e_precision}", *bench.every_model("batch_size", args.e2e_batch),
                        f"read.batch_size={args.e2e_batch}", "read.num_cpus=1", f"models.compile={args.e2e_compile}",
                        "ray.object_store_mb=8192"]  # as configs/cluster.yaml
            walls: dict[str, dict[int, float]] = {}
            counts = (args.e2e_n // 4, args.e2e_n)
            for count in counts:
                src = write_inputs(d, crops, count, scored_fraction=1.0, how="listing")
                for name in [e for e in args.e2e.split(",") if e]:
                    c = load_config([weights_cfg], [*over, *e2e_over, *E2E[name], *src,
                                                    f"output.uri={d}/out-{name}-{count}"])
                    t = time.perf_counter()
                    s = pipeline.run(c)
                    wall = time.perf_counter() - t
                    walls.setdefault(name, {})[count] = wall
                    print(f"\ncafi [{name}] {count} crops: {wall:.1f} s end to end = {count / wall:.0f} crops/s"
                          f"{f'; vs per-image loop {loop_s * count / wall:.0f}x' if loop_s else ''}; "
                          f"statuses {s['counts'].get('status')}", flush=True)
                    print(operator_table(s), flush=True)
            ray.shutdown()
            lo, hi = counts
            for name, w in walls.items():
                if w[hi] <= w[lo]:  # start-up noise swamped the extra crops: no steady-state estimate
                    print(f"cafi [{name}] end to end: {hi / w[hi]:.0f} crops/s over {hi} crops; steady state n/a "
                          f"({lo} crops took {w[lo]:.1f} s, {hi} took {w[hi]:.1f} s)", flush=True)
                    continue
                steady = (hi - lo) / (w[hi] - w[lo])
                print(f"cafi [{name}] end to end: {hi / w[hi]:.0f} crops/s over {hi} crops; steady state "
                      f"{steady:.0f} crops/s (from {lo} vs {hi} crops) after {w[hi] - hi / steady:.1f} s of "
                      f"start-up (targets: >= 600 per GPU with models.compile, >= 90 % of the bound)", flush=True)
                if args.n and bound:
                    print(f"cafi [{name}] steady state vs the stages back to back: {100 * steady / bound:.0f}%",
                          flush=True)

        # ---- torch.compile
        if args.compile:
            from cafi.stages.specs import spec, stage_columns

            prec, size = args.e2e_precision, args.e2e_batch
            dbcnn = spec("dbcnn")
            for flag in ("false", "true"):
                c = load_config([weights_cfg], [*over, f"models.precision={prec}", f"models.compile={flag}"])
                stage = dbcnn.stage(dbcnn, c, outputs=stage_columns(dbcnn, c))
                t = time.perf_counter()
                stage(_slices(inputs["dbcnn"], size)[0])
                first = time.perf_counter() - t
                rate = time_stage(stage, inputs["dbcnn"], size)
                print(f"dbcnn stage compile={flag} {prec} batch {size}: first batch {first:.1f} s, "
                      f"then {rate:.0f} crops/s", flush=True)
                del stage


if __name__ == "__main__":
    main()
