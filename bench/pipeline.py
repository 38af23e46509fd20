"""End to end: the cafi Ray Data job against the per-image notebook loop, on the same crops and weights.

Measured in one run, on N sample crops and the same synthetic weights (published formats):
  loop      the original team's notebook: for each file, one image at a time -- read, decode,
            detect (batch of 1), align, SER-FIQ as T full forward passes of IR-SE50 with the
            dropout masks (the reference method), parse + mask, DBCNN; torch on all threads.
            Models are loaded and warmed up before the clock starts.
  stages    each cafi stage alone on the same N crops at its configured batch size, all threads
            (bench/stages.py); their sum is the pipeline's compute, for the overhead ratio.
  cafi      `cafi.pipeline.run` on an embedded local Ray, once per configuration (--configs);
            end-to-end wall time of run(): listing, actor start-up and model loading, scoring,
            Parquet write, counts, commit.

    python bench/pipeline.py [--n 16] [--loop-n 4] [--configs default,local,fused-t2,...]
                             [--rounds 2] [--steady-all]
                             [--detector retinaface_resnet50] [--parser bisenet] [key=value ...]

--rounds R runs the configurations interleaved (A/B/A/B: a shared machine's load hits both);
--steady-all measures the steady state (N/4 vs N crops) of every configuration, not only the first.

The loop's cost per image does not depend on N (nothing is amortised), so it runs on the first
--loop-n crops only (0 = all N) and the speedup is a ratio of seconds per image. CPU seconds
(user+system of the driver and every Ray process it started) are printed beside wall seconds:
they are far less sensitive to other load on the machine. The last line reads
`pipeline speedup vs per-image loop: <ratio>x` for the first configuration in --configs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)
import torch  # noqa: E402

from cafi.config import load_config  # noqa: E402

# name -> (extra config files, overrides, what it is)
PRESETS: dict[str, tuple[list[str], list[str], str]] = {
    "default": ([], [], "library defaults: the four models fused in one actor, torch on every CPU"),
    "fused-t1": ([], bench.every_model("torch_threads", 1), "fused, 1 torch thread"),
    "pools": ([], ["ray.fuse_models=false", *bench.every_model("torch_threads", 0)],
              "4 actor pools, num_cpus 0.25, 1 torch thread each"),
    "pools-t2": ([], ["ray.fuse_models=false", *bench.every_model("torch_threads", 2)],
                 "4 actor pools, num_cpus 0.25, 2 torch threads each"),
    "threads": ([], ["ray.cpu_replicas=1"], "fused, one batch at a time on every torch thread"),
    "replicas": ([], ["ray.cpu_replicas=0"], "fused, one single-thread replica per torch thread (shared weights)"),
    "fused-2x1": ([], [*bench.every_model("num_cpus", 0.75), *bench.every_model("min_actors", 2),
                       *bench.every_model("max_actors", 2), *bench.every_model("torch_threads", 1)],
                  "fused, 2 actors, num_cpus 0.75, 1 torch thread each"),
}
DEFAULT_CONFIGS = "default,pools"


# ---------------------------------------------------------------- (a) the per-image loop

class Replay(torch.nn.Module):
    """nn.Dropout with given keep masks (one per batch row): replays cafi's masks through full passes."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.keep = p, None

    def forward(self, v):
        return v * self.keep / (1 - self.p)


class NotebookLoop:
    """The per-image reference: models loaded once, then one image at a time through everything."""

    def __init__(self, cfg, reference: str, device: torch.device | None = None):
        from cafi.models.dbcnn import DbcnnScorer
        from cafi.models.face_parsing import FaceMasker
        from cafi.models.registry import checkpoint, published
        from cafi.models.retinaface import FaceDetector
        from cafi.models.serfiq import SerFiq

        m, cpu = cfg.models, device or torch.device("cpu")
        self.device = cpu
        self.cfg, self.reference, self.record = cfg, reference, published("arcface_ir_se50")
        self.detector = FaceDetector(m.detector.arch, checkpoint("detector", m.detector.arch, m.detector.weights),
                                     m.cache_dir, cpu)
        s = m.serfiq
        serfiq = SerFiq(checkpoint("serfiq", "arcface_ir_se50", s.weights), m.cache_dir, cpu, samples=s.samples,
                        dropout=s.dropout, alpha=s.alpha, r=s.r, seed=s.seed)
        # the same weights and masks as cafi; facexlib's Flatten needs the default memory format
        self.serfiq, self.masks = serfiq, serfiq.masks
        self.net = copy.deepcopy(serfiq.net).to(memory_format=torch.contiguous_format)
        self.replay = Replay(s.dropout)
        self.net.output_layer[1] = self.replay
        p = m.parser
        self.masker = FaceMasker(p.arch, checkpoint("parser", p.arch, p.weights), m.cache_dir, cpu,
                                 face_labels=list(p.face_labels), fill=list(p.fill), input_size=p.input_size)
        self.dbcnn = DbcnnScorer(checkpoint("dbcnn", "dbcnn", m.dbcnn.weights), m.cache_dir, cpu)

    @torch.inference_mode()
    def serfiq_full(self, face: np.ndarray) -> float:
        """Raw SER-FIQ of one aligned face from T complete forward passes."""
        from cafi.models.runtime import to_input
        from cafi.models.serfiq import quality_from_embeddings

        x = to_input(face[None], self.device, self.record).contiguous()
        t = self.masks.shape[0]
        if self.reference == "batched":  # the T passes as one batch of T copies
            self.replay.keep = self.masks.view(t, 512, 7, 7)
            emb = self.net(x.expand(t, -1, -1, -1).contiguous())
        else:  # T passes one after another
            embs = []
            for i in range(t):
                self.replay.keep = self.masks[i].view(1, 512, 7, 7)
                embs.append(self.net(x))
            emb = torch.cat(embs)
        return float(quality_from_embeddings(emb[None])[0])

    def score(self, path: str) -> dict:
        from cafi import imaging
        from cafi.faces.align import align_faces
        from cafi.models.face_parsing import apply_mask

        with open(path, "rb") as fh:
            data = fh.read()
        dec = imaging.decode(data, self.cfg.image)
        if dec.error:
            return {"status": "error"}
        img = dec.image[None].copy()
        det = self.detector(img)
        found = det.score >= self.cfg.models.detector.conf_threshold
        if not found[0]:
            return {"status": "no_face", "det_score": float(det.score[0])}
        aligned = align_faces(img, det.landmarks, found)
        raw = self.serfiq_full(aligned[0])
        mask, fraction = self.masker(img)
        masked = apply_mask(img, mask, list(self.cfg.models.parser.fill), self.device).numpy()
        return {"status": "scored", "det_score": float(det.score[0]), "serfiq_raw": raw,
                "mask_fraction": float(fraction[0]), "dbcnn": float(self.dbcnn(masked)[0])}

    def check(self, path: str) -> float:
        """|T full passes - cafi's head-only| of raw SER-FIQ on one face: the two compute the same thing."""
        from cafi import imaging
        from cafi.faces.align import align_faces

        with open(path, "rb") as fh:
            img = imaging.decode(fh.read(), self.cfg.image).image[None].copy()
        det = self.detector(img)
        aligned = align_faces(img, det.landmarks, np.ones(1, bool))
        return abs(self.serfiq_full(aligned[0]) - float(self.serfiq(aligned)[0][0]))

    def run(self, paths: list[str]) -> tuple[list[float], list[float], dict]:
        """Per image: wall seconds, CPU seconds; and the scores."""
        self.score(paths[0])  # warm-up, untimed: generous to the loop
        out, walls, cpus = {}, [], []
        for path in paths:
            t, c = time.perf_counter(), time.process_time()
            out[path] = self.score(path)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        return walls, cpus, out


# ---------------------------------------------------------------- (b) the cafi job

def run_cafi(name: str, weights_cfg: str, paths: list[str], d: str, extra: list[str], rnd: int = 0) -> dict:
    from cafi import pipeline

    files, overrides, _ = PRESETS[name]
    out = os.path.join(d, f"out-{name}-{rnd}")  # a fresh output: the same model version would resume
    cfg = load_config([weights_cfg, *[os.path.join(bench.ROOT, f) for f in files]],
                      [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={out}", *bench.base_overrides(d),
                       *overrides, *extra])
    with bench.ProcessTree() as tree:
        t = time.perf_counter()
        summary = pipeline.run(cfg)
        wall = time.perf_counter() - t
    return {"name": name, "wall": wall, "cpu": tree.self_cpu + tree.children_cpu(), "summary": summary,
            "scores": read_scores(out)}


def read_scores(out: str) -> dict:
    import pyarrow.dataset as pds

    table = pds.dataset(os.path.join(out, "manifest"), format="parquet", partitioning="hive").to_table(
        columns=["uri", "status", "det_score", "serfiq_raw", "mask_fraction", "dbcnn"])
    return {os.path.basename(row.pop("uri")): row for row in table.to_pylist()}


def compare(loop: dict, cafi: dict) -> str:
    diffs: dict[str, float] = {}
    for path, ref in loop.items():
        got = cafi.get(os.path.basename(path)) or {}
        for key, value in ref.items():
            if key != "status" and got.get(key) is not None:
                diffs[key] = max(diffs.get(key, 0.0), abs(value - got[key]))
    return ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) or "no common rows"


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_stats(text: str) -> list[dict]:
    """Per operator from Ray Data's ds.stats() text (verbose): its span ("blocks produced in"), the
    total remote wall and CPU time of its tasks or actor calls, output rows and bytes, and the
    time Ray Data held its task submissions or outputs back (backpressure)."""
    import re

    ops: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        head = re.match(r"^Operator \d+ (.+?): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s", line)
        if head:
            ops.append({"operator": head.group(1), "span": float(head.group(4)), "wall": 0.0, "cpu": 0.0,
                        "rows": 0, "bytes": 0, "submit_bp": 0.0, "output_bp": 0.0})
            continue
        if not ops:
            continue
        total = re.search(r"([\d.]+)(us|ms|s) total", line)
        if line.startswith("* Remote wall time") and total:
            ops[-1]["wall"] = float(total.group(1)) * _UNITS[total.group(2)]
        elif line.startswith("* Remote cpu time") and total:
            ops[-1]["cpu"] = float(total.group(1)) * _UNITS[total.group(2)]
        elif line.startswith("* Output num rows per block"):
            ops[-1]["rows"] = int(float(line.rsplit(",", 1)[1].split()[0]))
        elif line.startswith("* Output size bytes per block"):
            ops[-1]["bytes"] = int(float(line.rsplit(",", 1)[1].split()[0]))
        for key, name in (("submit_bp", "task_submission_backpressure_time"),
                          ("output_bp", "task_output_backpressure_time")):
            found = re.search(rf"'{name}': ([\d.e+-]+)", line)
            if found:
                ops[-1][key] = float(found.group(1))
    return ops


def operator_table(summary: dict) -> str:
    """The diagnosis table: per operator, where its time went and what it sent on."""
    ops = operator_stats((summary.get("stages") or {}).get("ray_data_stats", ""))
    busy = sum(op["wall"] for op in ops) or 1.0
    lines = [f"    {'operator (from ds.stats())':<48} {'span s':>7} {'remote wall s':>13} {'share':>6} "
             f"{'CPU-ms/row':>10} {'KB out/row':>10} {'held back s (submit/output)':>27}"]
    for op in ops:
        per_row = op["bytes"] / op["rows"] / 1024 if op["rows"] else 0.0
        cpu_row = 1000 * op["cpu"] / op["rows"] if op["rows"] else 0.0
        lines.append(f"    {op['operator'][:48]:<48} {op['span']:>7.2f} {op['wall']:>13.2f} "
                     f"{100 * op['wall'] / busy:>5.1f}% {cpu_row:>10.1f} {per_row:>10.1f} "
                     f"{op['submit_bp']:>13.2f} / {op['output_bp']:<11.2f}")
    for actor, b in sorted((summary.get("model_actors") or {}).items()):
        share = b.get("steady_busy_share")
        lines.append(f"    model actor pid {actor}: {b['calls']} calls, {b['rows']} rows, busy "
                     f"{b['busy_seconds']:.2f} s of a {b['span_seconds']:.2f} s span; steady phase "
                     f"{b['steady_seconds']:.2f} s, busy "
                     f"{'-' if share is None else f'{100 * share:.1f}%'}")
    return "\n".join(lines)


def read_bytes_per_row(summary: dict) -> float | None:
    """Object-store bytes per row leaving the read operator (what travels to the first model actor)."""
    for op in operator_stats((summary.get("stages") or {}).get("ray_data_stats", "")):
        if "read_objects" in op["operator"] and op["rows"]:
            return op["bytes"] / op["rows"]
    return None


def busy_share(summary: dict) -> float | None:
    """The least busy model actor's share of its steady phase spent in its models."""
    shares = [b["steady_busy_share"] for b in (summary.get("model_actors") or {}).values()
              if b.get("steady_busy_share") is not None]
    return min(shares) if shares else None


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="crops scored by cafi and by each stage alone")
    ap.add_argument("--loop-n", type=int, default=4, help="crops run through the per-image loop (0 = all N)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from: {', '.join(PRESETS)}")
    ap.add_argument("--detector", default="retinaface_resnet50")
    ap.add_argument("--parser", default="bisenet")
    ap.add_argument("--reference", choices=("batched", "sequential"), default="batched",
                    help="SER-FIQ reference: the T full passes as one batch of T copies (faster on this CPU) "
                         "or one pass after another")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the embedded Ray")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the loop and the stages")
    ap.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, interleaved")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes of each stage alone (best counts)")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--no-marginal", dest="marginal", action="store_false",
                    help="skip the extra run of the first configuration on N/4 crops (start-up vs per-image cost)")
    ap.add_argument("--steady-all", action="store_true",
                    help="the N/4-crop run for every configuration (each one's steady state), in order")
    ap.add_argument("--stats", action="store_true", help="print Ray Data's full ds.stats() of each configuration")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every configuration")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in PRESETS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; known: {list(PRESETS)}")

    import ray
    import ray.data

    torch.set_num_threads(args.threads)
    print(bench.machine_line(args.threads), flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-bench-") as d:
        weights_cfg, paths = bench.setup(d, args.n, args.detector, args.parser)
        mean_file = float(np.mean([os.path.getsize(p) for p in paths]))
        cfg = load_config([weights_cfg], [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={d}/out",
                                          *bench.base_overrides(d), *args.overrides])
        m = cfg.models
        print(f"{args.n} crops (sizes 200-512, JPEG/PNG, degraded); crop {cfg.image.crop_size}; detector "
              f"{m.detector.arch}, parser {m.parser.arch}@{m.parser.input_size}, SER-FIQ T={m.serfiq.samples}, "
              f"DBCNN; synthetic weights; Ray num_cpus={args.cpus}", flush=True)

        # (a) the per-image loop
        loop_paths = paths[: args.loop_n or args.n]
        loop = None
        if not args.skip_loop:
            nb = NotebookLoop(cfg, args.reference)
            torch.set_num_threads(args.threads)
            walls, cpus, scores = nb.run(loop_paths)
            check = nb.check(loop_paths[0])
            del nb
            # Every crop is the same work (decoded to the same size): the fastest one is the loop's cost
            # on a quiet machine. Taking it (not the mean) is generous to the loop.
            loop = {"wall": min(walls), "cpu": min(cpus), "scores": scores}
            print(f"\n(a) per-image loop ({args.reference} SER-FIQ reference), {len(loop_paths)} crops: "
                  f"{min(walls):.2f} s/img wall (fastest; mean {np.mean(walls):.2f}), "
                  f"{min(cpus):.2f} CPU-s/img (mean {np.mean(cpus):.2f})\n"
                  f"    reference check: |T full passes - head-only| of raw SER-FIQ = {check:.2g}", flush=True)

        # standalone stages at their configured batch sizes
        rows = bench.measure(cfg, paths, args.threads, args.repeats)
        compute, compute_cpu = bench.model_seconds(rows), bench.model_seconds(rows, "cpu_seconds")
        print(f"\nstages alone, {args.threads} torch threads, configured batch sizes (best of {args.repeats}):\n"
              f"{bench.stage_table(rows)}\n  sum: {compute:.2f} s = {compute / args.n:.3f} s/img = "
              f"{args.n / compute:.2f} img/s; {compute_cpu / args.n:.2f} CPU-s/img", flush=True)

        # (b) the cafi job, per configuration, in rounds (the best round counts)
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, log_to_driver=False)
        ray.data.DataContext.get_current().verbose_stats_logs = True  # backpressure times in ds.stats()
        print(f"\nray.init (embedded local Ray, not counted below): {time.perf_counter() - t:.1f} s", flush=True)
        for name in ("ray", "ray.data"):  # Ray Data's progress and advice lines
            logging.getLogger(name).setLevel(logging.ERROR)
        best: dict[str, dict] = {}
        for rnd in range(args.rounds):
            for name in configs:
                r = run_cafi(name, weights_cfg, paths, d, args.overrides, rnd)
                s = r["summary"]
                print(f"\n(b) cafi [{name}] round {rnd + 1}: {PRESETS[name][2]}\n"
                      f"    {r['wall']:.2f} s end to end ({s['wall_seconds']:.2f} s in the Ray Data job) = "
                      f"{args.n / r['wall']:.2f} img/s; {r['cpu'] / args.n:.2f} CPU-s/img; vs stages alone "
                      f"{r['wall'] / compute:.2f}x wall, {r['cpu'] / compute_cpu:.2f}x CPU", flush=True)
                if loop:
                    print(f"    vs loop: {loop['wall'] / (r['wall'] / args.n):.1f}x wall, "
                          f"{loop['cpu'] / (r['cpu'] / args.n):.1f}x CPU; max |diff| vs loop: "
                          f"{compare(loop['scores'], r['scores'])}", flush=True)
                print(operator_table(s), flush=True)
                if args.stats:
                    print((s.get("stages") or {}).get("ray_data_stats", ""), flush=True)
                prev = best.get(name, r)
                best[name] = {**(r if r["wall"] <= prev["wall"] else prev), "cpu": min(r["cpu"], prev["cpu"])}
        smalls: dict[str, dict] = {}
        if args.marginal:  # again on N/4 crops: start-up cost vs cost per image
            n_small = max(1, args.n // 4)
            for name in configs if args.steady_all else configs[:1]:
                r = run_cafi(name, weights_cfg, paths, d, [*args.overrides, f"input.limit={n_small}"], -1)
                smalls[name] = {**r, "n": n_small}
                print(f"\n(b) cafi [{name}] on {n_small} crops: {r['wall']:.2f} s end to end, "
                      f"{r['cpu']:.2f} CPU-s", flush=True)
        small = smalls.get(configs[0])
        ray.shutdown()
        results = [best[name] for name in configs]

    print(f"\nsummary, {args.n} crops (end to end; best of {args.rounds} round(s)):")
    print(f"  {'configuration':<12} {'wall s':>7} {'img/s':>6} {'CPU-s/img':>9} {'/stages wall':>12} "
          f"{'/stages CPU':>11} {'vs loop wall':>12} {'vs loop CPU':>11}")
    for r in results:
        vs = (f"{loop['wall'] / (r['wall'] / args.n):>11.1f}x {loop['cpu'] / (r['cpu'] / args.n):>10.1f}x"
              if loop else f"{'-':>12} {'-':>11}")
        print(f"  {r['name']:<12} {r['wall']:>7.2f} {args.n / r['wall']:>6.2f} {r['cpu'] / args.n:>9.2f} "
              f"{r['wall'] / compute:>11.2f}x {r['cpu'] / compute_cpu:>10.2f}x {vs}")
    for r in results[1:] if len(smalls) > 1 else []:  # the first one's steady state is printed below
        sm = smalls.get(r["name"])
        if sm is not None and args.n > sm["n"]:
            per = (r["wall"] - sm["wall"]) / (args.n - sm["n"])
            per_cpu = (r["cpu"] - sm["cpu"]) / (args.n - sm["n"])
            print(f"steady state [{r['name']}] from {sm['n']} vs {args.n} crops: {per:.2f} s/img "
                  f"({per_cpu:.2f} CPU-s/img); vs stages alone {per / (compute / args.n):.2f}x wall, "
                  f"{per_cpu / (compute_cpu / args.n):.2f}x CPU")
    fastest = min(results, key=lambda r: r["wall"])
    print(f"fastest configuration: {fastest['name']} ({args.n / fastest['wall']:.2f} img/s)")
    head = results[0]
    print(f"pipeline overhead vs stages alone [{head['name']}]: {head['wall'] / compute:.2f}x wall, "
          f"{head['cpu'] / compute_cpu:.2f}x CPU (target <= 1.3x)")
    if small is not None and args.n > small["n"]:
        per = (head["wall"] - small["wall"]) / (args.n - small["n"])
        per_cpu = (head["cpu"] - small["cpu"]) / (args.n - small["n"])
        print(f"steady state [{head['name']}] from {small['n']} vs {args.n} crops: {per:.2f} s/img "
              f"({per_cpu:.2f} CPU-s/img) after a fixed {head['wall'] - per * args.n:.1f} s "
              f"({head['cpu'] - per_cpu * args.n:.1f} CPU-s) of start-up; vs stages alone "
              f"{per / (compute / args.n):.2f}x wall, {per_cpu / (compute_cpu / args.n):.2f}x CPU")
        if loop:
            print(f"steady-state speedup vs per-image loop [{head['name']}]: {loop['wall'] / per:.1f}x wall, "
                  f"{loop['cpu'] / per_cpu:.1f}x CPU")
    if loop:
        print(f"pipeline speedup vs per-image loop [{head['name']}], CPU seconds: "
              f"{loop['cpu'] / (head['cpu'] / args.n):.1f}x")
        print(f"pipeline speedup vs per-image loop: {loop['wall'] / (head['wall'] / args.n):.1f}x")
    if small is not None and args.n > small["n"]:
        print(f"overhead vs stages alone (steady state): {per / (compute / args.n):.2f}x")
    share = busy_share(head["summary"])
    print(f"model actor busy (steady state): {'n/a' if share is None else f'{100 * share:.1f}%'}")
    per_row = read_bytes_per_row(head["summary"])
    print(f"object-store bytes per row (read -> model): {'n/a' if per_row is None else f'{per_row:.0f}'} "
          f"(mean input file: {mean_file:.0f})")


if __name__ == "__main__":
    main()
