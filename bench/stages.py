"""Per stage: images/s of each stage alone, at its configured batch size, in one process.

Each stage is the class (or function) the Ray job runs, called directly on batches of the
same crops: read+decode, detect (RetinaFace + align), serfiq (head-only), parse (face parsing),
components, dbcnn, decide (spec names, cafi/stages/specs.py). Synthetic weights; torch threads set
per measurement (the machine's CPU count is what the default fused actor and a notebook use; 1 is
what each of four separate pools gets with `torch_threads: 0` and `num_cpus: 0.25`).

    python bench/stages.py [--n 16] [--threads 1,2] [--detector retinaface_resnet50]
                           [--parser bisenet] [--config extra.yaml ...] [key=value ...]
    python bench/stages.py --batch-sizes 1,2,4,8 [--threads 1,2] [--n 16]   # batch-size sweep
    python bench/stages.py --fiqa [--threads 1] [--n 16]   # every FIQA scorer on the same faces: CPU ms per face
    python bench/stages.py --iqa [--threads 2] [--n 2]     # every IQA scorer on the same masked faces: CPU ms per face
    python bench/stages.py --classic [--threads 1] [--n 16]   # classic FQA features and scorer vs the detector

Also the helpers the other benchmarks share (machine line, synthetic setup, measure()).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import torch  # noqa: E402

from cafi.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- shared helpers

def machine_line(threads: int | None = None) -> str:
    import ray

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"machine: {os.cpu_count()} CPUs ({cpu}), load avg {load}; python {platform.python_version()}, "
            f"torch {torch.__version__} ({threads or torch.get_num_threads()} threads), ray {ray.__version__}")


def setup(directory: str, n: int, detector: str, parser: str, crop_sizes: bool = True) -> tuple[str, list[str]]:
    """Synthetic weights (+ config) and `n` sample crops as files; returns (weights config, paths)."""
    from cafi.samples import good_crops
    from cafi.synth import synth

    cfg_path = synth(os.path.join(directory, "weights"), detector=detector, parser=parser)
    in_dir = os.path.join(directory, "in")
    os.makedirs(in_dir, exist_ok=True)
    paths = []
    for name, data in sorted(good_crops(n).items()):
        path = os.path.join(in_dir, name)
        with open(path, "wb") as fh:
            fh.write(data)
        paths.append(path)
    return cfg_path, paths


def every_model(key: str, value) -> list[str]:
    """The same override for every model section: `models.<section>.<key>=<value>`."""
    from cafi.stages.specs import sections

    return [f"models.{m}.{key}={value}" for m in sections()]


def base_overrides(directory: str) -> list[str]:
    return [f"models.cache_dir={os.path.join(directory, 'cache')}", "ray.progress_bars=false"]


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK  # ppid, utime + stime


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (private), RssShmem (shared memory: Ray's object store
    pages this process has touched), RssFile (mapped files: shared libraries' pages) in bytes, from
    /proc/<pid>/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssShmem:", "RssFile:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _object_store_bytes(raylet: int) -> int:
    """Allocated bytes of the raylet's plasma file in /dev/shm (tmpfs pages ever written and not freed)."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{raylet}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if "/dev/shm/plasma" in os.readlink(f"/proc/{raylet}/fd/{fd}"):
                total = max(total, os.stat(f"/proc/{raylet}/fd/{fd}").st_blocks * 512)
        except OSError:
            continue
    return total


class ProcessTree:
    """Polls this process's descendants (an embedded local Ray: GCS, raylet, workers) in a thread.

    Keeps per process the last CPU seconds seen and the peak RSS (VmHWM), so processes that
    exit during the run (Ray tears its actors down at the end) still count. CPU of a process
    that exits between two polls is short by at most one poll interval.
    """

    def __init__(self, interval: float = 0.2, keep_series: bool = False):
        import threading

        self.keep_series = keep_series
        self.series: dict[int, list[tuple[float, int, int]]] = {}  # pid -> (time, RSS, RssAnon) samples
        self.interval = interval
        self.root = os.getpid()
        self.cpu: dict[int, float] = {}
        self.cpu0: dict[int, float] = {}
        self.hwm: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.anon: dict[int, int] = {}  # peak RssAnon seen
        self.shmem: dict[int, int] = {}  # peak RssShmem seen
        self.total_anon_peak = 0
        self.store_peak = 0  # pages of Ray's object store (plasma, in /dev/shm) in use: its physical size
        self.name: dict[int, str] = {}
        self.total_rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._started = False

    def descendants(self) -> dict[int, float]:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _proc_stat(int(entry))
                if st is not None:
                    stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        out, todo = {}, list(children.get(self.root, []))
        while todo:
            pid = todo.pop()
            out[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
        return out

    def poll(self) -> None:
        total = total_anon = 0
        for pid, cpu in self.descendants().items():
            if pid not in self.cpu0 and not self._started:
                self.cpu0[pid] = cpu  # alive before the measurement: count only what follows
            self.cpu[pid] = cpu
            st = _proc_status(pid)
            self.hwm[pid] = max(self.hwm.get(pid, 0), st.get("VmHWM", 0))
            self.rss[pid] = max(self.rss.get(pid, 0), st.get("VmRSS", 0))
            self.anon[pid] = max(self.anon.get(pid, 0), st.get("RssAnon", 0))
            self.shmem[pid] = max(self.shmem.get(pid, 0), st.get("RssShmem", 0))
            if self.keep_series:
                self.series.setdefault(pid, []).append((time.monotonic(), st.get("VmRSS", 0), st.get("RssAnon", 0)))
            total += st.get("VmRSS", 0)
            total_anon += st.get("RssAnon", 0)
            if not self.name.get(pid, "").startswith("ray::") or self.name[pid].startswith("ray::IDLE"):
                self.name[pid] = _cmdline(pid) or self.name.get(pid, "")
        self.total_rss_peak = max(self.total_rss_peak, total)
        self.total_anon_peak = max(self.total_anon_peak, total_anon)
        for pid, name in self.name.items():
            if "/raylet" in name.split(" ", 1)[0]:
                self.store_peak = max(self.store_peak, _object_store_bytes(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self):
        self.poll()
        self._started = True
        self._self_cpu0 = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()
        self.self_cpu = time.process_time() - self._self_cpu0

    def children_cpu(self) -> float:
        return sum(cpu - self.cpu0.get(pid, 0.0) for pid, cpu in self.cpu.items())

    def workers(self) -> dict[int, str]:
        """Ray worker processes (their command line reads `ray::...`)."""
        return {pid: name for pid, name in self.name.items() if name.startswith("ray::")}


def driver_peak_rss() -> int:
    return _proc_status(os.getpid()).get("VmHWM", 0)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take(batch: dict, sl: slice) -> dict:
    return {k: v[sl].copy() for k, v in batch.items()}


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def measure(cfg, paths: list[str], threads: int, repeats: int = 1, only: set[str] | None = None) -> list[dict]:
    """Time each stage alone over all `paths`, in batches of its configured batch size.

    The stages are those the job runs, in its order: read (fetch + header checks, a Ray task),
    decode (in the model actor), each model stage of the config (components alone: the measures
    without the parsing they read), decide. The input of each stage is the output of the stages
    before it (computed once, untimed); every stage gets a fresh copy of its input batch, since
    stages write into their batch. A warm-up call on the first batch precedes each timing.
    Returns one dict per stage: stage, batch_size, images, seconds (best of `repeats`),
    cpu_seconds, images_per_second (and load_seconds for the model stages). `only`: the model stages
    to run besides detection (what the FIQA scorers read), none of the others.
    """
    from cafi.stages.decide import decide
    from cafi.stages.decode import Decode
    from cafi.stages.read import read_objects
    from cafi.stages.specs import specs_for, stage_columns
    from cafi.version import model_version

    n = len(paths)
    rows: list[dict] = []

    def timed(name: str, batch_size: int, fn, batches: list) -> list:
        torch.set_num_threads(threads)
        fn(copy.deepcopy(batches[0]))  # warm-up
        outs: list = []

        def once():
            outs.clear()
            for b in batches:
                outs.append(fn(copy.deepcopy(b)))

        c = time.process_time()
        t = best_of(once, repeats)
        cpu = (time.process_time() - c) / max(1, repeats)
        rows.append({"stage": name, "batch_size": batch_size, "images": n, "seconds": t, "cpu_seconds": cpu,
                     "images_per_second": n / t if t > 0 else float("inf")})
        return list(outs)

    uri_batches = [{"uri": np.asarray(paths[s], dtype=object)} for s in _batches(n, cfg.read.batch_size)]
    batch = _concat(timed("read", cfg.read.batch_size, lambda b: read_objects(b, cfg), uri_batches))
    decode = Decode(cfg.image, torch.device("cpu"), threads)
    parts = [_take(batch, s) for s in _batches(n, cfg.read.batch_size)]
    batch = _concat(timed("decode", cfg.read.batch_size, decode, parts))
    for s in specs_for(cfg):
        if only is not None and s.name not in only and s.family != "detect":
            continue
        st = s.resources(cfg)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        stage = s.stage(s, cfg, load=True, outputs=stage_columns(s, cfg))  # loads the model once, as an actor does
        load = time.perf_counter() - t0
        parts = [_take(batch, sl) for sl in _batches(n, st.batch_size)]
        batch = _concat(timed(s.name, st.batch_size, stage, parts))
        rows[-1]["load_seconds"] = load
        del stage
    batch.pop("image", None)
    batch.pop("face_mask", None)
    version = model_version(cfg)
    parts = [_take(batch, s) for s in _batches(n, 256)]
    timed("decide", 256, lambda b: decide(b, cfg, version, "bench"), parts)
    return rows


def components_overhead(rows: list[dict]) -> float:
    """The components stage's time as a share of every other stage's: what the quality measures
    add to the job's time per crop."""
    comp = sum(r["seconds"] for r in rows if r["stage"] == "components")
    rest = sum(r["seconds"] for r in rows if r["stage"] != "components")
    return comp / rest


def stage_table(rows: list[dict]) -> str:
    lines = [f"  {'stage':<14} {'batch':>5} {'images':>6} {'seconds':>8} {'img/s':>8} {'ms/img':>8} "
             f"{'CPU-ms/img':>10} {'load s':>7}"]
    for r in rows:
        load = f"{r['load_seconds']:>7.2f}" if "load_seconds" in r else f"{'-':>7}"
        lines.append(f"  {r['stage']:<14} {r['batch_size']:>5} {r['images']:>6} {r['seconds']:>8.2f} "
                     f"{r['images_per_second']:>8.2f} {1000 * r['seconds'] / r['images']:>8.1f} "
                     f"{1000 * r['cpu_seconds'] / r['images']:>10.1f} {load}")
    return "\n".join(lines)


def model_seconds(rows: list[dict], key: str = "seconds") -> float:
    return sum(r[key] for r in rows)


def fiqa_costs(cfg_path: str, paths: list[str], d: str, args, threads: list[int]) -> None:
    """Each FIQA scorer on the same detected and aligned faces: wall and CPU ms per face, and the one
    line that compares them (CPU ms per face at the first thread count: what a face costs the box)."""
    from cafi.stages.specs import of_family

    kinds = [s.name for s in of_family("fiqa")]
    order = ["serfiq", "magface", "crfiqa", "sddfiqa"] + [k for k in kinds if k not in
                                                           ("serfiq", "magface", "crfiqa", "sddfiqa")]
    cfg = load_config([cfg_path, *args.config], [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={d}/out",
                                                 *base_overrides(d), "models.fiqa.kind=serfiq",
                                                 f"models.fiqa.also=[{','.join(k for k in order if k != 'serfiq')}]",
                                                 "output.embeddings=true",  # the classic scorer reads SER-FIQ's
                                                 *args.overrides])
    print(f"FIQA scorers: SER-FIQ T={cfg.models.serfiq.samples}, CR-FIQA {cfg.models.crfiqa.arch}, "
          f"MagFace iResNet100, SDD-FIQA IR-50", flush=True)
    costs: dict[int, dict[str, float]] = {}
    for t in threads:
        rows = [r for r in measure(cfg, paths, t, args.repeats, only=set(kinds)) if r["stage"] in kinds]
        costs[t] = {r["stage"]: 1000 * r["cpu_seconds"] / r["images"] for r in rows}
        print(f"\ntorch threads = {t}\n{stage_table(rows)}", flush=True)
    first = costs[threads[0]]
    # the line scripts read names exactly these four; any other FIQA scorer gets its own line
    print(f"\nfiqa cost per face: {', '.join(f'{k} {first[k]:.0f} ms' for k in order[:4] if k in first)}",
          flush=True)
    others = [k for k in order[4:] if k in first]
    if others:
        print(f"other fiqa scorers per face: {', '.join(f'{k} {first[k]:.0f} ms' for k in others)}", flush=True)


def iqa_costs(cfg_path: str, paths: list[str], d: str, args, threads: list[int]) -> None:
    """Each IQA scorer on the same detected, parsed (masked) faces: wall and CPU ms per face, and the one
    line that compares them (CPU ms per face at the first thread count)."""
    from cafi.stages.specs import of_family

    kinds = [s.name for s in of_family("iqa")]
    order = ["dbcnn", "topiq_face", "maniqa", "musiq"] + [k for k in kinds if k not in
                                                          ("dbcnn", "topiq_face", "maniqa", "musiq")]
    cfg = load_config([cfg_path, *args.config], [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={d}/out",
                                                 *base_overrides(d), "models.iqa.kind=dbcnn",
                                                 f"models.iqa.also=[{','.join(k for k in order if k != 'dbcnn')}]",
                                                 *args.overrides])
    m = cfg.models
    print(f"IQA scorers: DBCNN, TOPIQ-face, MANIQA {m.maniqa.arch} ({m.maniqa.crops} crops), MUSIQ {m.musiq.arch}; "
          f"masked faces from parser {m.parser.arch}", flush=True)
    costs: dict[int, dict[str, float]] = {}
    for t in threads:
        rows = [r for r in measure(cfg, paths, t, args.repeats, only={*kinds, "parse"}) if r["stage"] in kinds]
        costs[t] = {r["stage"]: 1000 * r["cpu_seconds"] / r["images"] for r in rows}
        print(f"\ntorch threads = {t}\n{stage_table(rows)}", flush=True)
    first = costs[threads[0]]
    print(f"\niqa cost per face: {', '.join(f'{k} {first[k]:.0f} ms' for k in order if k in first)}", flush=True)


def classic_cost(cfg_path: str, paths: list[str], d: str, args, threads: list[int]) -> None:
    """The classic FQA scorer's CPU cost per face beside the detector's: its features alone (GIST, HOG,
    LBP on 112x112 faces; the CNN feature is the run's stored embedding, no cost here), and the whole
    stage (align + features + classifier) in the pipeline's order after detection and SER-FIQ (which
    makes the embedding it reads). The target: the scorer under 10 % of the detector."""
    import cv2

    from cafi.classic import features
    from cafi.imaging import decode

    cfg = load_config([cfg_path, *args.config], [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={d}/out",
                                                 *base_overrides(d), "models.fiqa.kind=serfiq",
                                                 "models.fiqa.also=[classic]", "output.embeddings=true",
                                                 *args.overrides])
    crops = []
    for p in paths:  # the crops themselves at 112x112: the features' cost does not depend on the content
        with open(p, "rb") as fh:
            crops.append(cv2.resize(decode(fh.read(), cfg.image).image, (112, 112), interpolation=cv2.INTER_AREA))
    faces = np.stack(crops)
    emb = np.random.default_rng(0).normal(size=(len(faces), 512)).astype(np.float32)
    for t in threads:
        torch.set_num_threads(t)
        features.extract(faces[:2], emb[:2])  # warm-up (imports, the Gabor bank)
        c0 = time.process_time()
        wall = best_of(lambda: features.extract(faces, emb), args.repeats)
        feat_cpu = 1000 * (time.process_time() - c0) / max(1, args.repeats) / len(faces)
        rows = [r for r in measure(cfg, paths, t, args.repeats, only={"serfiq", "classic"})
                if r["stage"] in ("detect", "serfiq", "classic")]
        print(f"\ntorch threads = {t}\n{stage_table(rows)}", flush=True)
        cpu = {r["stage"]: 1000 * r["cpu_seconds"] / r["images"] for r in rows}
        print(f"classic features per face: {feat_cpu:.1f} ms", flush=True)  # CPU; the exact line scripts read
        print(f"classic features wall per face: {1000 * wall / len(faces):.1f} ms", flush=True)
        print(f"classic scorer per face: {cpu['classic']:.1f} ms CPU vs detector {cpu['detect']:.1f} ms: "
              f"{cpu['classic'] / cpu['detect']:.3f} of the detector (target < 0.10)", flush=True)


# ---------------------------------------------------------------- main

def sweep(cfg_path: str, paths: list[str], d: str, args, threads: list[int]) -> None:
    """ms per image of each model stage at each batch size (wall, and CPU in brackets)."""
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    for t in threads:
        table: dict[str, dict[int, dict]] = {}
        for b in sizes:
            over = every_model("batch_size", b)
            cfg = load_config([cfg_path, *args.config], [f"input.uri={os.path.dirname(paths[0])}",
                                                         f"output.uri={d}/out", *base_overrides(d),
                                                         *args.overrides, *over])
            for r in measure(cfg, paths, t, args.repeats):
                if r["stage"] not in ("read", "decode", "decide"):
                    table.setdefault(r["stage"], {})[b] = r
        print(f"\ntorch threads = {t}: ms/img wall (CPU-ms/img) by batch size", flush=True)
        print(f"  {'stage':<14}" + "".join(f"{'batch ' + str(b):>18}" for b in sizes))
        for stage, by in table.items():
            cells = "".join(f"{1000 * by[b]['seconds'] / by[b]['images']:>10.0f} "
                            f"({1000 * by[b]['cpu_seconds'] / by[b]['images']:>5.0f})" for b in sizes)
            print(f"  {stage:<14}{cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="crops per stage")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--detector", default="retinaface_resnet50")
    ap.add_argument("--parser", default="bisenet")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-sizes", default="", help="instead: every model stage at each of these batch sizes")
    ap.add_argument("--fiqa", action="store_true", help="instead: every FIQA scorer's cost per face")
    ap.add_argument("--iqa", action="store_true", help="instead: every IQA scorer's cost per face")
    ap.add_argument("--classic", action="store_true", help="instead: the classic FQA scorer's cost vs the detector")
    ap.add_argument("--config", action="append", default=[], help="extra config files, after the synthetic one")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. models.dbcnn.batch_size=4)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]

    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-bench-") as d:
        cfg_path, paths = setup(d, args.n, args.detector, args.parser)
        cfg = load_config([cfg_path, *args.config],
                          [f"input.uri={os.path.dirname(paths[0])}", f"output.uri={d}/out",
                           *base_overrides(d), *args.overrides])
        print(f"{args.n} crops; detector {cfg.models.detector.arch}, parser {cfg.models.parser.arch} "
              f"@{cfg.models.parser.input_size}, crop {cfg.image.crop_size}, SER-FIQ T={cfg.models.serfiq.samples}",
              flush=True)
        modes = {"batch_sizes": sweep, "fiqa": fiqa_costs, "iqa": iqa_costs, "classic": classic_cost}
        chosen = next((fn for flag, fn in modes.items() if getattr(args, flag)), None)
        if chosen is not None:
            chosen(cfg_path, paths, d, args, threads)
            return
        results = {}
        for t in threads:
            rows = measure(cfg, paths, t, args.repeats)
            results[t] = rows
            print(f"\ntorch threads = {t}\n{stage_table(rows)}\n  sum of stages: {model_seconds(rows):.2f} s "
                  f"= {args.n / model_seconds(rows):.2f} img/s", flush=True)
        if len(threads) > 1:
            lo, hi = min(threads), max(threads)
            print(f"\nspeedup of {hi} threads over {lo} thread(s), per stage:")
            for a, b in zip(results[lo], results[hi], strict=True):
                print(f"  {a['stage']:<14} {a['seconds'] / b['seconds']:.2f}x")
            print(f"stages total speedup {hi} vs {lo} threads: "
                  f"{model_seconds(results[lo]) / model_seconds(results[hi]):.2f}x")
        print(f"components overhead: {100 * components_overhead(results[max(threads)]):.2f}%")


if __name__ == "__main__":
    main()
