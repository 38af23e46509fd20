"""Memory: peak RSS of the driver and of the Ray workers, for 1,000 vs 10,000 inputs.

Each input count runs `cafi.pipeline.run` in a fresh child process (so the driver's peak RSS,
VmHWM, is its own) with an embedded local Ray. A thread polls /proc every 0.2 s for every
process the child started (GCS, raylet, the Ray workers) and keeps each one's VmHWM, so
workers that Ray tears down at the end still count.

The full models at 384x384 score ~0.5 image/s here, so 10,000 inputs would take hours. What
is reduced, and why it does not change what is measured (growth with the number of inputs):
  * the crops stay 384x384 (--crop-size), so every row carries its real pixel bytes through
    the object store and the workers: that is what memory growth is about.
  * detector retinaface_mobile0.25, parser input_size 64, SER-FIQ samples 10.
  * --scored-fraction (default 0.01): the models cost ~1 s per face on this CPU even reduced
    (DBCNN runs at the crop size), so only this fraction of the inputs are face crops (K
    distinct crops, hard-linked under unique names);
    the others are 16x16 PNGs, which become status=error rows ("image too small"). Those rows
    still travel through every stage and every actor (with their zero-filled pixel column) but
    skip the model calls. (A no_face split is not possible: with random weights the detector
    gives every crop the same score.) 1.0 runs every model on every input.
Everything else is the library default (the models fused in one actor), or four actor pools with --pools.

    python bench/memory.py [--counts 1000,10000] [--crop-size 384] [--scored-fraction 0.01]
                           [--pools] [--input listing|manifest] [key=value ...]

Prints per count: driver peak RSS (and its RSS after each phase of the run), the peak RSS of
each model actor (and its RSS at 25/50/75/100 % of its life: plateau or growth), the largest
task worker, the sum of peak RSS of all Ray processes (processes that did not all live at the
same time: a longer run starts more task workers; not held to the target), and the peak of
their summed RSS (shared pages such as torch's libraries count once per process). Then the
ratios 10k/1k (target: <= 1.2) and the driver's extra bytes per input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)

MIB = 2**20
POOLS = ["ray.fuse_models=false", *bench.every_model("torch_threads", 0)]


def role(name: str) -> str:
    """Group a process by what it is: model actor, task worker, Ray system actor, or Ray daemon."""
    if not name.startswith("ray::"):
        return "ray daemons (gcs, raylet, dashboard, ...)"
    body = re.sub(r"\)\.\w+$", ")", name[5:].split(" ", 1)[0])
    if body.startswith("MapWorker("):
        inner = re.sub(r"^MapWorker\((?:MapBatches\()?(.*?)\)*$", r"\1", body)
        return f"model actor {inner}"
    if body.startswith("_") or body.endswith("Agent") or body.startswith(("ActorLocationTracker", "StatsActor")):
        return "ray system actors"
    return "task workers (read/decode/decide/write)"


def _status() -> dict[str, int]:
    return bench._proc_status(os.getpid())


def instrument(phases: list) -> None:
    """Record the driver's RSS and peak RSS after each phase of pipeline.run (whichever of these
    functions and input-source methods the current cafi.pipeline calls); bench-side wrappers, the
    library is unchanged."""
    import functools

    from cafi import manifest, pipeline
    from cafi.inputs.files import FileSource
    from cafi.inputs.shards import ShardSource

    def wrap(owner, name: str) -> None:
        fn = owner.__dict__.get(name)  # a module's function or a class's own method
        if fn is None or getattr(fn, "_bench_wrapped", False):
            return

        @functools.wraps(fn)
        def inner(*a, **k):
            out = fn(*a, **k)
            st = _status()
            phases.append([f"{owner.__name__.split('.')[-1]}.{name}", st.get("VmRSS", 0), st.get("VmHWM", 0)])
            return out

        inner._bench_wrapped = True
        setattr(owner, name, inner)

    for name in ("scan_written", "build", "stage_stats", "count_rows"):
        wrap(pipeline, name)
    for source in (FileSource, ShardSource):  # planning and the to-do dataset of either input kind
        for name in ("plan", "dataset"):
            wrap(source, name)
    for name in ("commit",):
        wrap(manifest, name)


def quartiles(samples: list[tuple[float, int, int]], col: int) -> list[int]:
    """Peak RSS (col 1) or RssAnon (col 2) up to 25/50/75/100 % of a process's observed life:
    a plateau or steady growth?"""
    if not samples:
        return []
    t0, t1 = samples[0][0], samples[-1][0]
    return [max(s[col] for s in samples if s[0] <= t0 + q * (t1 - t0)) for q in (0.25, 0.5, 0.75, 1.0)]


def child(args) -> None:
    """One run: start Ray, score, report memory as one JSON line."""
    import logging

    import ray

    from cafi import pipeline
    from cafi.config import load_config

    cfg = load_config([args.weights_cfg], json.loads(args.child_overrides))
    phases: list = []
    instrument(phases)
    ray.init(num_cpus=args.cpus, log_to_driver=False)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    st = _status()
    phases.append(["after ray.init", st.get("VmRSS", 0), st.get("VmHWM", 0)])
    with bench.ProcessTree(keep_series=True) as tree:
        t = time.perf_counter()
        summary = pipeline.run(cfg)
        wall = time.perf_counter() - t
    groups: dict[str, list[tuple[int, int, int]]] = {}
    series: dict[str, list[list[int]]] = {}
    for pid, name in tree.name.items():
        groups.setdefault(role(name), []).append((tree.hwm.get(pid, 0), tree.anon.get(pid, 0), tree.shmem.get(pid, 0)))
        if role(name).startswith("model actor"):
            samples = tree.series.get(pid, [])
            if role(name) not in series or len(samples) > series[role(name)][2]:
                series[role(name)] = [quartiles(samples, 1), quartiles(samples, 2), len(samples)]
    ray.shutdown()
    out = {
        "count": args.child, "wall": wall, "rows": summary["counts"].get("distinct_uris"),
        "statuses": summary["counts"].get("status") or summary["counts"].get("by_status"),
        "driver_peak": bench.driver_peak_rss(),
        "groups": {k: {"max": max(p[0] for p in v), "sum": sum(p[0] for p in v), "processes": len(v),
                       "anon": max(p[1] for p in v), "shmem": max(p[2] for p in v)} for k, v in groups.items()},
        "ray_sum_of_peaks": sum(tree.hwm.values()),
        "ray_total_rss_peak": tree.total_rss_peak,
        "ray_total_anon_peak": tree.total_anon_peak,
        "object_store_peak": tree.store_peak,
        "object_store_cap": (cfg.ray.object_store_mb or 0) * MIB,
        "phases": phases, "actor_rss_quartiles": series,
    }
    print("RESULT " + json.dumps(out), flush=True)


def write_inputs(d: str, crops: list[str], count: int, scored_fraction: float, how: str) -> list[str]:
    """`count` inputs named uniquely, each a hard link to one of the distinct crops (a `scored_fraction`
    of them, spread evenly) or to a 16x16 PNG (an error row); as a listing or a Parquet manifest."""
    from cafi.samples import draw_face, encode

    tiny = os.path.join(d, "tiny.png")
    if not os.path.exists(tiny):
        with open(tiny, "wb") as fh:
            fh.write(encode(draw_face(16, 0), "PNG"))
    folder = os.path.join(d, f"in-{count}")
    os.makedirs(folder, exist_ok=True)
    paths, faces = [], 0
    for i in range(count):
        face = int((i + 1) * scored_fraction) > faces
        faces += face
        src = crops[i % len(crops)] if face else tiny
        dst = os.path.join(folder, f"{i:06d}_{os.path.basename(src)}")
        try:
            os.link(src, dst)
        except OSError:
            with open(src, "rb") as a, open(dst, "wb") as b:
                b.write(a.read())
        paths.append(dst)
    if how == "listing":
        return [f"input.uri={folder}"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = os.path.join(d, f"inputs-{count}.parquet")
    pq.write_table(pa.table({"uri": paths}), manifest)
    return [f"input.manifest={manifest}"]


def fmt(b: float) -> str:
    return f"{b / MIB:8.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--crop-size", type=int, default=384)
    ap.add_argument("--samples", type=int, default=10, help="SER-FIQ T")
    ap.add_argument("--distinct", type=int, default=16, help="distinct crops behind the inputs")
    ap.add_argument("--scored-fraction", type=float, default=0.01)
    ap.add_argument("--pools", action="store_true", help="ray.fuse_models=false: one actor pool per model")
    ap.add_argument("--input", choices=("listing", "manifest"), default="listing")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--weights-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--child-overrides", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    if args.child:
        return child(args)

    counts = [int(c) for c in args.counts.split(",") if c]
    print(bench.machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-bench-mem-") as d:
        weights_cfg, crops = bench.setup(d, args.distinct, "retinaface_mobile0.25", "bisenet")
        common = [*bench.base_overrides(d), f"image.crop_size={args.crop_size}", "models.parser.input_size=64",
                  f"models.serfiq.samples={args.samples}", *(POOLS if args.pools else []), *args.overrides]
        print(f"reduced config: crop {args.crop_size}, retinaface_mobile0.25, bisenet@64, SER-FIQ T={args.samples}, "
              f"DBCNN@{args.crop_size}; {args.distinct} distinct crops, scored fraction {args.scored_fraction} "
              f"(others: 16x16 PNGs -> error rows); "
              f"{'4 actor pools' if args.pools else 'library default (fused)'} stages; "
              f"input by {args.input}; Ray num_cpus={args.cpus}", flush=True)
        results = []
        for count in counts:
            inp = write_inputs(d, crops, count, args.scored_fraction, args.input)
            over = [*inp, f"output.uri={d}/out-{count}", *common]
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(count), "--weights-cfg", weights_cfg,
                   "--child-overrides", json.dumps(over), "--cpus", str(args.cpus)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"run with {count} inputs failed (exit {proc.returncode})")
            r = json.loads(line[7:])
            results.append(r)
            print(f"\n{count} inputs: {r['wall']:.1f} s ({count / r['wall']:.1f} img/s), {r['rows']} rows "
                  f"{r['statuses'] or ''}\n  driver peak RSS {fmt(r['driver_peak'])} MiB", flush=True)
            for name, g in sorted(r["groups"].items()):
                print(f"  {name:<42} {g['processes']:>3} proc., peak RSS {fmt(g['max'])} MiB (private "
                      f"{fmt(g['anon'])}, object store {fmt(g['shmem'])}); sum of peaks {fmt(g['sum'])} MiB",
                      flush=True)
            print(f"  all Ray processes: sum of peaks {fmt(r['ray_sum_of_peaks'])} MiB, peak of summed RSS "
                  f"{fmt(r['ray_total_rss_peak'])} MiB, peak of summed private RSS {fmt(r['ray_total_anon_peak'])} "
                  f"MiB; object store in use (peak) {fmt(r['object_store_peak'])} MiB", flush=True)
            for k, (rss, anon, _) in sorted(r["actor_rss_quartiles"].items()):
                print(f"  {k} over its life, peak RSS at 25/50/75/100 %: " + "/".join(f"{v / MIB:.0f}" for v in rss)
                      + " MiB; private: " + "/".join(f"{v / MIB:.0f}" for v in anon) + " MiB")
            print("  driver RSS / peak RSS after each phase (MiB): " + "; ".join(
                f"{name} {rss / MIB:.0f}/{hwm / MIB:.0f}" for name, rss, hwm in r["phases"]), flush=True)

    if len(results) < 2:
        return
    lo, hi = results[0], results[-1]
    ratio = hi["count"] / lo["count"]
    print(f"\n{'peak RSS (MiB)':<52} {lo['count']:>8} {hi['count']:>8} {'ratio':>7}")
    rows = [("driver", lo["driver_peak"], hi["driver_peak"])]
    for name in sorted(lo["groups"]):
        if name.startswith(("model actor", "task workers")) and name in hi["groups"]:
            rows.append((f"{name}: peak RSS", lo["groups"][name]["max"], hi["groups"][name]["max"]))
            rows.append((f"{name}: private", lo["groups"][name]["anon"], hi["groups"][name]["anon"]))
    rows += [("all Ray processes: sum of peaks", lo["ray_sum_of_peaks"], hi["ray_sum_of_peaks"]),
             ("all Ray processes: peak of summed RSS", lo["ray_total_rss_peak"], hi["ray_total_rss_peak"]),
             ("all Ray processes: peak of summed private", lo["ray_total_anon_peak"], hi["ray_total_anon_peak"]),
             ("object store in use (peak)", lo["object_store_peak"], hi["object_store_peak"])]
    worst = 0.0
    for name, a, b in rows:
        print(f"{name[:52]:<52} {fmt(a)} {fmt(b)} {b / max(a, 1):>6.2f}x")
        # Not in the verdict: a sum over processes that did not all live at once, and the object
        # store below 64 MiB (encoded bytes in flight: a ratio of two near-zero figures says nothing;
        # the store's bound is the cap, checked below).
        if "sum of peaks" not in name and not (name.startswith("object store") and max(a, b) < 64 * MIB):
            worst = max(worst, b / max(a, 1))
    cap = hi.get("object_store_cap")
    if cap:
        print(f"object store peak {hi['object_store_peak'] / MIB:.0f} MiB of its cap ray.object_store_mb = "
              f"{cap / MIB:.0f} MiB: {'within' if hi['object_store_peak'] <= cap else 'OVER'}")
    per_input = (hi["driver_peak"] - lo["driver_peak"]) / (hi["count"] - lo["count"])
    print(f"driver: {per_input:.0f} extra bytes per extra input ({per_input * 1e6 / 2**30:.2f} GiB per million)")
    print(f"memory growth {lo['count']} -> {hi['count']} inputs ({ratio:.0f}x): worst {worst:.2f}x "
          f"(target <= 1.20x: {'met' if worst <= 1.2 else 'missed'})")


if __name__ == "__main__":
    main()
