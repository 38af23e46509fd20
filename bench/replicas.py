"""CPU replicas (`ray.cpu_replicas`) without Ray: the model actor's class in a fresh process per run.

Each run builds `FusedModels` (the four models at the library defaults: RetinaFace R50, SER-FIQ T=100,
BiSeNet at 512, DBCNN at 384, batch 8; synthetic weights), runs one warm-up batch per replica at once,
then --timed batches from as many call threads as Ray's threaded actor gets. Printed per run:
resident memory after loading, the peak with the warm-up batches in flight (VmHWM), wall and CPU
seconds per crop of the timed batches; then the peak's growth per extra batch in flight -- what one
more replica costs (the replicas share one set of weights). --rounds interleaves the modes (A/B/A/B)
so a shared machine's load falls on both. The job's own comparison is bench/pipeline.py --configs
replicas,threads.

    python bench/replicas.py [--replicas 1,2] [--batch 8] [--timed 2] [--rounds 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)


def status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(key + ":")) / 1024


def child(weights: str, folder: str, replicas: int, batch: int, timed: int, overrides: list[str]) -> dict:
    """One mode, in this (fresh) process: a warm-up batch on each replica at once, then `timed`
    batches from as many call threads as Ray's actor would get (replicas + actor_concurrency - 1)."""
    import queue

    import numpy as np

    from cafi.config import load_config
    from cafi.stages.actor import FusedModels
    from cafi.stages.read import read_objects

    cfg = load_config([weights], [f"input.uri={folder}", "output.uri=/unused", f"ray.cpu_replicas={replicas}",
                                  *bench.every_model("batch_size", batch), *overrides])
    base = status_mib("VmRSS")
    models = FusedModels(cfg)
    loaded = status_mib("VmRSS")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))[:batch]

    def run(batches: int, threads: int) -> None:
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(batches):
            todo.put(read_objects({"uri": np.asarray(paths, dtype=object)}, cfg))

        def call() -> None:
            while True:
                try:
                    models(todo.get_nowait())
                except queue.Empty:
                    return

        calls = [threading.Thread(target=call) for _ in range(threads)]
        for th in calls:
            th.start()
        for th in calls:
            th.join()

    run(models.replicas, models.replicas)  # warm-up: each replica's first batch, all at once
    peak = status_mib("VmHWM")
    t, c = time.perf_counter(), time.process_time()
    run(timed, models.replicas + cfg.ray.actor_concurrency - 1)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = batch * timed
    return {"replicas": models.replicas, "threads_each": models.replica_threads, "before_mib": base,
            "loaded_mib": loaded, "peak_mib": peak, "batches": models.replicas,
            "s_per_crop": wall / n, "cpu_s_per_crop": cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2", help="ray.cpu_replicas values, one fresh process each")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--timed", type=int, default=2, help="timed batches per mode, after the warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="the modes interleaved this many times (A/B/A/B)")
    ap.add_argument("--child", nargs=3, metavar=("WEIGHTS", "FOLDER", "REPLICAS"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        weights, folder, replicas = args.child
        print(json.dumps(child(weights, folder, int(replicas), args.batch, args.timed, args.overrides)))
        return
    print(bench.machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-replicas-") as d:
        weights, paths = bench.setup(d, args.batch, "retinaface_resnet50", "bisenet")
        rows = []
        for r in [int(x) for x in args.replicas.split(",")] * args.rounds:
            out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--timed", str(args.timed),
                                  "--child", weights,
                                  os.path.dirname(paths[0]), str(r), *bench.base_overrides(d), *args.overrides],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            m = rows[-1]
            print(f"cpu_replicas={r}: {m['replicas']} replica(s) x {m['threads_each'] or 'all'} torch thread(s); "
                  f"RSS {m['before_mib']:.0f} MiB before, {m['loaded_mib']:.0f} loaded, peak {m['peak_mib']:.0f} "
                  f"with {m['batches']} batch(es) of {args.batch} in flight; then {args.timed} batches: "
                  f"{m['s_per_crop']:.2f} s/crop, {m['cpu_s_per_crop']:.2f} CPU-s/crop", flush=True)
    one = next((m for m in rows if m["batches"] == 1), None)
    for m in rows[:len(rows) // args.rounds]:
        if one is not None and m["batches"] > 1:
            extra = (m["peak_mib"] - one["peak_mib"]) / (m["batches"] - 1)
            print(f"memory per extra replica (batch {args.batch}, peak over one batch in flight): {extra:.0f} MiB; "
                  f"loaded models {one['loaded_mib'] - one['before_mib']:.0f} MiB, shared")


if __name__ == "__main__":
    main()
