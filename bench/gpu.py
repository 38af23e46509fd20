"""One GPU, one prepared run: what bounds the job on the device and how close the job comes to it.

    python bench/gpu.py --all                       # everything, < 8 minutes on one H100/H200
    python bench/gpu.py --dry-run --all             # the same code on the CPU at tiny sizes (the test suite)
    python bench/gpu.py --sections stages,bound     # a part: decode, stages, bound, profile, e2e

Each figure is one line, all from one run on the same synthetic weights (published formats) and crops:
  decode   nvJPEG: the model actor's batched JPEG decode on the device, images/s (and the host's threads);
           its pixels and the scores from them against the host decode's
  stages   every model stage the specs define (cafi/stages/specs.py: optional scorers included, so a
           new scorer appears here by itself), alone on pre-decoded crops: the best batch size of
           --batch-sizes at fp16 eager, then fp16 and bf16, eager and torch.compile'd, at that size
  bound    the stages configs/cluster.yaml runs, back to back at its precision and batch size (eager,
           as it runs them): the crops/s no end-to-end run on this GPU can beat
  profile  torch.profiler over one batch of each of those stages: the slowest one and its top operator
  e2e      `cafi.pipeline.run` on an embedded local Ray with configs/cluster.yaml's settings on one
           GPU (one actor per model at 0.25 GPU, fp16, batch 64, decode on the device): steady-state
           crops/s (--e2e-n/4 vs --e2e-n crops, start-up removed) and its share of the bound
The last line reads `gpu e2e: <c> crops/s, <p> % of the <b> crops/s bound, device <name>`.

Time: compilations (tens of seconds each) run only while --budget-s leaves room for what follows;
one skipped for time prints so. With $OUT set (or --out) every line also goes to $OUT/gpu.txt and
the figures to $OUT/gpu.json.

--dry-run: the CPU, 1 crop per stage and 2 end to end, one batch size, no warm-up, no compilation
(inductor's CPU build takes minutes), no nvJPEG (needs CUDA); each skip prints why. On the CPU
fp16/bf16 run fp32 (cafi.models.runtime).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler's own start/stop log lines

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)
import torch  # noqa: E402

from cafi.config import load_config  # noqa: E402
from cafi.stages.specs import specs_for  # noqa: E402

SECTIONS = ("decode", "stages", "bound", "profile", "e2e")
CLUSTER = os.path.join(bench.ROOT, "configs", "cluster.yaml")


class Report:
    """Prints each line and keeps it (and the figures) for $OUT."""

    def __init__(self, out: str | None):
        self.out, self.lines, self.figures = out, [], {}

    def line(self, text: str, **figures) -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.figures.update(figures)
        if self.out:  # written as it goes: a run cut short still leaves its figures
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "gpu.txt"), "w") as fh:
                fh.write("\n".join(self.lines) + "\n")
            with open(os.path.join(self.out, "gpu.json"), "w") as fh:
                json.dump(self.figures, fh, indent=1, sort_keys=True)


def rate(x: float | None) -> str:
    """Crops/s as printed: whole numbers, two significant digits below 10 (the dry run's)."""
    return "n/a" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu (dry run)"


def every_scorer(cfg_files: list[str]) -> list[str]:
    """Overrides that run every scorer of every family a spec defines (the decision's first, the rest
    as `also`), so each stage alone is measured, whichever scorers exist."""
    from cafi.stages.specs import of_family

    base = load_config(cfg_files, ["input.uri=/unused", "output.uri=/unused"])
    out = []
    for family in ("fiqa", "iqa"):
        kind = getattr(base.models, family).kind
        others = [s.name for s in of_family(family) if s.name != kind]
        out.append(f"models.{family}.also=[{','.join(others)}]")
    return [*out, "output.embeddings=true"]  # the classic scorer reads the embedding another FIQA scorer makes


def write_crops(folder: str, n: int) -> list[str]:
    from cafi.samples import good_crops

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, data in sorted(good_crops(n).items()):
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "wb") as fh:
            fh.write(data)
    return paths


def byte_batch(cfg, paths: list[str], n: int) -> dict:
    """The read tasks' output (encoded bytes, header checked) for `paths`, tiled to n rows."""
    from cafi.stages.read import read_objects

    base = read_objects({"uri": np.asarray(paths, dtype=object)}, cfg)
    reps = -(-n // len(paths))
    return {k: np.concatenate([v] * reps)[:n] for k, v in base.items()}


def slices(batch: dict, size: int) -> list[dict]:
    """Copies of consecutive `size`-row slices (stages write into their batch)."""
    return [bench._take(batch, s) for s in bench._batches(len(batch["uri"]), size)]


def to_host(batch: dict) -> dict:
    return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def build(s, cfg):
    from cafi.stages.specs import stage_columns

    return s.stage(s, cfg, load=True, outputs=stage_columns(s, cfg))


def stage_inputs(cfg, paths: list[str], n: int) -> tuple[list, dict[str, dict], dict]:
    """Every model stage of `cfg` (specs_for, in pipeline order), its input batch and the stage itself
    (fp16, eager: kept for the measurements that use those settings): crops decoded on the host and
    tiled to n, each stage's output computed once (untimed) as the next one's input."""
    from cafi.stages.decode import Decode

    batch = Decode(cfg.image, torch.device("cpu"), os.cpu_count())(byte_batch(cfg, paths, n))
    inputs, stages, specs = {}, {}, specs_for(cfg)
    for s in specs:
        inputs[s.name] = {k: v.copy() for k, v in batch.items()}
        stages[s.name] = build(s, cfg)
        batch = to_host(bench._concat([stages[s.name](p) for p in slices(inputs[s.name], 64)]))
    return specs, inputs, stages


def time_stage(stage, batch: dict, size: int, repeats: int, warmup: int = 2) -> float:
    """Crops/s of `stage` over `batch` in batches of `size` (copies made before the clock starts;
    warm-up batches first: cuDNN's algorithm search and a compiled stage's compilation stay out)."""
    for part in slices(batch, size)[:warmup]:
        stage(part)
    best = float("inf")
    for _ in range(repeats):
        parts = slices(batch, size)
        sync()
        t = time.perf_counter()
        for part in parts:
            stage(part)
        sync()
        best = min(best, time.perf_counter() - t)
    return len(batch["uri"]) / best


def measure_decode(rep: Report, cfg, paths: list[str], n: int, size: int, device: str) -> None:
    from cafi.stages.decode import Decode

    def images_per_s(dec) -> float:
        parts = slices(byte_batch(cfg, paths, n), size)
        dec(bench._take(parts[0], slice(0, size)))  # warm-up
        sync()
        t = time.perf_counter()
        for part in parts:
            dec(part)
        sync()
        return n / (time.perf_counter() - t)

    host = images_per_s(Decode(cfg.image, torch.device("cpu"), os.cpu_count()))
    if device != "cuda":
        rep.line(f"nvJPEG decode: skipped (needs CUDA), and its agreement with the host decode; host threads "
                 f"{rate(host)} images/s, batch {size}",
                 decode_host=host)
        return
    dev = images_per_s(Decode(cfg.image, torch.device(device), os.cpu_count(), jpeg_batches=True))
    rep.line(f"nvJPEG decode: {rate(dev)} images/s (batches of {size}, {cfg.image.crop_size}x{cfg.image.crop_size} "
             f"out); host threads {rate(host)} images/s", decode_nvjpeg=dev, decode_host=host)
    rep.line(decode_agreement(cfg, paths[:64], device))


def decode_agreement(cfg, paths: list[str], device: str) -> str:
    """The device decode against the host's on the same files: pixel levels, and every score of the
    job's models (on the device) from each."""
    from cafi.stages.actor import FusedModels
    from cafi.stages.decode import Decode

    files = byte_batch(cfg, paths, len(paths))
    host = Decode(cfg.image, torch.device("cpu"))(bench._take(files, slice(None)))
    dev = Decode(cfg.image, torch.device(device), jpeg_batches=True)(bench._take(files, slice(None)))
    diff = np.abs(host["image"].astype(int) - dev["image"].cpu().numpy().astype(int))
    models = FusedModels(cfg, decode=False)
    a, b = models(host), models(dev)
    cols = [c for c in ("det_score", "serfiq_raw", "mask_fraction", "dbcnn", "sharpness") if c in a]
    scores = ", ".join(f"{c} {np.nanmax(np.abs(a[c] - b[c])):.2g}" for c in cols)
    return (f"device vs host decode, {len(paths)} files: pixels mean |diff| {diff.mean():.3f} levels, max "
            f"{diff.max()}; max |score diff| through the same models: {scores}")


def measure_stages(rep: Report, cfg_files: list[str], over: list[str], specs: list, inputs: dict, fp16: dict,
                   first: list[str], args, deadline: float, reserve: float) -> dict:
    """Per stage: the best batch size at fp16 eager, then fp16/bf16 x eager/compiled there; one line
    per stage. Compilations come last, the stages in `first` (the bound's) first, and only while the
    budget leaves `reserve` seconds. Returns {(stage, precision, batch, compiled): crops/s}."""
    table: dict[tuple, float] = {}
    built: dict[tuple, object] = {}  # one load per stage, precision and compile flag

    def run(s, precision: str, size: int, compiled: bool) -> float:
        key = (s.name, precision, compiled)
        if key == (s.name, "fp16", False):
            built[key] = fp16[s.name]
        if key not in built:
            built.clear()  # one extra model on the device at a time
            cfg = load_config(cfg_files, [*over, f"models.precision={precision}", f"models.compile={compiled}"])
            built[key] = build(s, cfg)
        r = time_stage(built[key], inputs[s.name], size, args.repeats, args.warmup)
        table[(s.name, precision, size, compiled)] = r
        return r

    best, notes = {}, {}
    for s in specs:  # eager: every stage
        sweep = {size: run(s, "fp16", size, False) for size in args.sizes}
        best[s.name] = max(sweep, key=sweep.get)
        if args.dry_run:  # on the CPU every precision runs fp32 (cafi.models.runtime.autocast)
            notes[(s.name, "bf16", False)] = "skipped (dry run: the CPU runs fp32)"
        else:
            run(s, "bf16", best[s.name], False)
    order = sorted(specs, key=lambda s: s.name not in first)  # stable: pipeline order within each group
    for precision in ("fp16", "bf16"):
        for s in order:
            key = (s.name, precision, True)
            if s.arch is None:
                notes[key] = "n/a (no model)"
            elif args.dry_run:
                notes[key] = "skipped (dry run)"
            elif time.perf_counter() > deadline - reserve:
                notes[key] = "skipped (time budget)"
            else:
                run(s, precision, best[s.name], True)
    for s in specs:
        b, parts = best[s.name], []
        for precision, compiled in (("fp16", False), ("bf16", False), ("fp16", True), ("bf16", True)):
            got = table.get((s.name, precision, b, compiled))
            text = rate(got) if got is not None else notes.get((s.name, precision, compiled), "n/a")
            parts.append(f"{precision} {'compiled' if compiled else 'eager'} {text}")
        figures = {f"stage_{s.name}_{p}_{'compiled' if c else 'eager'}": r
                   for (name, p, size, c), r in table.items() if name == s.name and size == b}
        rep.line(f"stage {s.name}: {', '.join(parts)} crops/s at batch {b} (best of "
                 f"{','.join(map(str, args.sizes))} at fp16 eager)", **figures, **{f"stage_{s.name}_batch": b})
    return table


def bound_of(e2e_cfg, table: dict, precision: str, size: int) -> tuple[float | None, list[str]]:
    """Crops/s of the stages e2e_cfg runs, back to back at its precision and batch size, eager."""
    names = [s.name for s in specs_for(e2e_cfg)]
    rates = [table.get((n, precision, size, e2e_cfg.models.compile)) for n in names]
    if not all(rates):
        return None, names
    return 1.0 / sum(1.0 / r for r in rates), names


def profile_stages(rep: Report, e2e_cfg, inputs: dict, fp16: dict, size: int, device: str, warmup: int) -> None:
    """One batch of each stage the job runs under torch.profiler: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    spent: dict[str, tuple[float, str, float]] = {}
    for s in specs_for(e2e_cfg):
        m = e2e_cfg.models
        stage = fp16[s.name] if (m.precision, m.compile) == ("fp16", False) else build(s, e2e_cfg)
        part = slices(inputs[s.name], size)[0]
        for _ in range(warmup):
            stage(bench._take(part, slice(None)))
        sync()
        with profile(activities=activities) as prof:
            stage(part)
            sync()
        events = list(prof.key_averages())
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, attr) for e in events) / 1000.0  # ms
        top = max(events, key=lambda e: getattr(e, attr), default=None)  # none: no torch operator (components)
        spent[s.name] = (total, top.key if top else "-", getattr(top, attr) / 1000.0 if top else 0.0)
    name, (ms, op, op_ms) = max(spent.items(), key=lambda kv: kv[1][0])
    every = sum(v[0] for v in spent.values())
    where = "device" if cuda else "CPU"
    rep.line(f"slowest stage (torch.profiler, {where} time, one batch of {size}): {name}, {ms:.1f} ms of "
             f"{every:.1f} ms for all; its top operator {op} {100 * op_ms / max(ms, 1e-9):.0f} %",
             profile_ms={k: v[0] for k, v in spent.items()}, slowest_stage=name)


def end_to_end(rep: Report, d: str, cfg_files: list[str], over: list[str], crops: list[str], args,
               device: str) -> float | None:
    """configs/cluster.yaml on one GPU, end to end: steady-state crops/s (N/4 vs N crops; the dry run: N
    crops, start-up included)."""
    import ray
    from memory import write_inputs  # bench/memory.py: inputs as hard links

    from cafi import pipeline
    from cafi.stages.specs import sections

    gpus = 0.25 if device == "cuda" else 0
    one_gpu = [f"models.{m}.{k}={v}" for m in sections() for k, v in
               (("num_gpus", gpus), ("min_actors", 1), ("max_actors", 1),
                *([] if device == "cuda" else [("num_cpus", 0.25)]))]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False,
                 **({"num_gpus": 1} if device == "cuda" else {}))
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []  # memory advice lines
    # the dry run: one run of a fused actor (starting four pools' actors costs a CPU test too much)
    dry = ["ray.fuse_models=true"] if args.dry_run else []
    walls = {}
    counts = (args.e2e_n,) if args.dry_run else (max(1, args.e2e_n // 4), args.e2e_n)
    for count in counts:
        src = write_inputs(d, crops, count, scored_fraction=1.0, how="listing")
        c = load_config([*cfg_files, CLUSTER], [*over, *one_gpu, *dry, *src, f"output.uri={d}/e2e-{count}"])
        t = time.perf_counter()
        s = pipeline.run(c)
        walls[count] = time.perf_counter() - t
        rep.line(f"e2e run, {count} crops: {walls[count]:.1f} s = {rate(count / walls[count])} crops/s with "
                 f"start-up; statuses {s['counts'].get('status')}")
    if started:
        ray.shutdown()
    if len(counts) == 1:  # the dry run: start-up included
        return counts[0] / walls[counts[0]]
    lo, hi = counts
    if walls[hi] <= walls[lo]:  # start-up noise swamped the extra crops
        return None
    return (hi - lo) / (walls[hi] - walls[lo])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help=f"every section: {','.join(SECTIONS)}")
    ap.add_argument("--sections", default="", help=f"some of {','.join(SECTIONS)} (bound needs stages)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the test suite's run of this script")
    ap.add_argument("--config", action="append", default=[],
                    help="config files after the synthetic weights' (or instead of writing them: a "
                         "synthetic.yaml of `cafi weights synth`)")
    ap.add_argument("--n", type=int, default=1024, help="crops per stage measurement")
    ap.add_argument("--distinct", type=int, default=256, help="distinct generated crops")
    ap.add_argument("--batch-sizes", default="32,64,128")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per measurement (best counts)")
    ap.add_argument("--e2e-n", type=int, default=8192, help="crops end to end (the steady state from N/4 vs N)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="compilations only while this leaves room")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.txt and gpu.json (default $OUT)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for everything")
    args = ap.parse_args(argv)
    chosen = list(SECTIONS) if args.all else [s for s in args.sections.split(",") if s]
    if not chosen or set(chosen) - set(SECTIONS):
        ap.error(f"--all or --sections from {SECTIONS}")
    if "bound" in chosen and "stages" not in chosen:
        chosen.append("stages")
    args.warmup = 2
    if args.dry_run:  # every code path once, at sizes a CPU test can afford
        args.n, args.distinct, args.batch_sizes, args.repeats, args.warmup = 1, 1, "1", 1, 0
        args.e2e_n = min(args.e2e_n, 2)
    args.sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        ap.error("no CUDA here: run with --dry-run")
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    rep = Report(args.out)
    rep.line(bench.machine_line(), device=device_name(device), date=time.strftime("%Y-%m-%d"))

    with tempfile.TemporaryDirectory(prefix="cafi-gpu-bench-") as d:
        detector = "retinaface_mobile0.25" if args.dry_run else "retinaface_resnet50"
        cfg_files = args.config or [bench.setup(d, 0, detector, "bisenet")[0]]  # synthetic weights unless given
        crops = write_crops(os.path.join(d, "in"), args.distinct)
        over = [f"input.uri={os.path.dirname(crops[0])}", f"output.uri={d}/out", *bench.base_overrides(d),
                f"models.device={device}",
                *([*bench.every_model("batch_size", args.sizes[0]), f"read.batch_size={args.sizes[0]}"]
                  if args.dry_run else []), *args.overrides]
        e2e_cfg = load_config([*cfg_files, CLUSTER], over)  # the job's settings: the bound's and the e2e run's
        precision = e2e_cfg.models.precision
        size = min(s.resources(e2e_cfg).batch_size for s in specs_for(e2e_cfg))
        all_over = [*over, *every_scorer(cfg_files)]
        cfg = load_config(cfg_files, [*all_over, "models.precision=fp16"])
        m = cfg.models
        rep.line(f"setup {time.perf_counter() - t0:.1f} s: {args.distinct} distinct crops, crop {cfg.image.crop_size}, "
                 f"parser {m.parser.arch}@{m.parser.input_size}, SER-FIQ T={m.serfiq.samples}; "
                 f"the job (configs/cluster.yaml): {precision}, batch {size}, compile {e2e_cfg.models.compile}")

        if "decode" in chosen:
            measure_decode(rep, cfg, crops, args.n, size, device)
        table, bound = {}, None
        if "stages" in chosen or "profile" in chosen:
            specs, inputs, fp16 = stage_inputs(cfg, crops, args.n)
        if "stages" in chosen:
            reserve = 150.0 if "e2e" in chosen else 30.0  # what the e2e run and the profile need after
            args.sizes = sorted({*args.sizes, size})  # the job's batch size too: the bound's
            first = [s.name for s in specs_for(e2e_cfg)]
            table = measure_stages(rep, cfg_files, all_over, specs, inputs, fp16, first, args, deadline, reserve)
            bound, names = bound_of(e2e_cfg, table, precision, size)
            if bound is not None:
                rep.line(f"bound: {rate(bound)} crops/s = {' + '.join(names)} back to back ({precision}, batch {size}, "
                         f"{'compiled' if e2e_cfg.models.compile else 'eager'})", bound=bound)
        if "profile" in chosen:
            profile_stages(rep, e2e_cfg, inputs, fp16, size, device, args.warmup)
        steady = None
        if "e2e" in chosen:
            if "stages" in chosen or "profile" in chosen:  # the job's actors get the device's memory
                fp16.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            steady = end_to_end(rep, d, cfg_files, over, crops, args, device)
            share = f"{100 * steady / bound:.0f}" if steady and bound else "n/a"
            what = ("steady state (configs/cluster.yaml on one GPU, decode on the device)" if not args.dry_run else
                    "with start-up (dry run: configs/cluster.yaml fused, on the CPU, decode on the host)")
            rep.line(f"e2e {what}: {rate(steady)} crops/s, {share} % of the bound",
                     e2e=steady, e2e_share=steady / bound if steady and bound else None)
        rep.line(f"elapsed {time.perf_counter() - t0:.0f} s")
        c = rate(steady)
        p = f"{100 * steady / bound:.0f}" if steady and bound else "n/a"
        b = rate(bound)
        rep.line(f"gpu e2e: {c} crops/s, {p} % of the {b} crops/s bound, device {device_name(device)}")


if __name__ == "__main__":
    main()
