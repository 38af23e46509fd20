"""A million-row re-score after a threshold change: reads no image, runs no model, commits.

Measured in one run, on local disk and on the S3 server on loopback (moto, started here):
  build    a committed run of N rows written by the project's own writer (decide() rows of
           fabricated stage results, manifest.write_dataset through Ray Data, manifest.commit):
           real manifest files and commit records, and an input manifest of the N URIs
  rescore  `cafi.pipeline.run` with only decision thresholds changed, in a fresh child process
           (its own embedded Ray): wall time, the driver's peak RSS and its growth over the RSS
           it had before the run (after Ray Data ran once on 1,000 rows and the storage client
           made one request: fixed costs, not the run's), split into private memory, mapped
           object-store pages and mapped libraries; the object store's peak; the run's phases

    python bench/rescore.py [--rows 1000000] [--where local,s3]

The last line reads `threshold-only re-score of <N> rows: <seconds> s, driver peak <MiB> MiB`
(the slower of the places measured). Targets: <= 5 minutes, driver memory bounded by the keys
(<= 64 bytes per row above the driver's RSS before the run).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

MIB = 2**20
BASE = ["ray.progress_bars=false", "decision.min_serfiq=0.3"]
CHANGED = ["decision.min_serfiq=0.5", "decision.max_yaw=40", "decision.min_sharpness=20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fabricated_rows(batch: dict, cfg, version: str, run_id: str, prefix: str) -> pa.Table:
    """Every stage's results for a block of row numbers, through the job's own decide()."""
    from cafi.stages.decide import decide

    ids = batch["id"]
    n = len(ids)
    rng = np.random.default_rng(int(ids[0]) if n else 0)
    status = np.where(ids % 50 == 0, "error", np.where(ids % 23 == 0, "no_face", "ok")).astype(object)
    live = status == "ok"

    def scores(lo: float, hi: float) -> np.ndarray:
        return np.where(live, rng.uniform(lo, hi, n), np.nan).astype(np.float32)

    cols = {
        "uri": np.array([f"{prefix}/crops/{i:09d}.jpg" for i in ids], dtype=object), "status": status,
        "error": np.where(status == "error", "cannot decode image: truncated", "").astype(object),
        "width": np.full(n, 384, np.int32), "height": np.full(n, 384, np.int32),
        "det_score": scores(0.8, 1.0), "landmarks": np.where(live[:, None], rng.uniform(100, 280, (n, 10)),
                                                             np.nan).astype(np.float32),
        "mask_fraction": scores(0.1, 0.6), "serfiq_raw": scores(0.84, 0.92), "dbcnn": scores(20, 80),
        "yaw": scores(-70, 70), "pitch": scores(-30, 30), "roll": scores(-20, 20), "inter_eye_px": scores(20, 120),
        "face_fraction": scores(0.2, 0.8), "sharpness": scores(5, 500), "luma_mean": scores(0.2, 0.8),
        "luma_std": scores(0.05, 0.3), "under_exposed": scores(0, 0.1), "over_exposed": scores(0, 0.1),
        "dynamic_range": scores(4, 8),
    }
    return decide(cols, cfg, version, run_id)


def build(where: str, rows: int, root: str, storage_over: list[str]) -> dict:
    """The committed run to re-score and the input manifest; returns the paths and its summary."""
    import ray

    from cafi import manifest, pipeline
    from cafi.config import load_config, to_dict
    from cafi.storage import filesystem, join
    from cafi.synth import synth
    from cafi.version import is_synthetic, model_version, stage_fingerprints

    weights = synth(os.path.join(tempfile.gettempdir(), "cafi-rescore-weights"), detector="retinaface_mobile0.25")
    out, listing = join(root, "out"), join(root, "inputs.parquet")
    cfg = load_config([weights], [*BASE, *storage_over, f"input.manifest={listing}", f"output.uri={out}"])
    version, run_id = model_version(cfg), pipeline.make_run_id()
    prefix = root.rstrip("/")
    t = time.perf_counter()
    fs, path = filesystem(listing, cfg.storage)
    fs.makedirs(fs._parent(path), exist_ok=True)
    uris = pa.array([f"{prefix}/crops/{i:09d}.jpg" for i in range(rows)], pa.string())
    with fs.open(path, "wb") as fh:
        pq.write_table(pa.table({"uri": uris}), fh, row_group_size=100_000)
    del uris
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // 50_000)).map_batches(
        fabricated_rows, batch_size=None, fn_kwargs={"cfg": cfg, "version": version, "run_id": run_id,
                                                     "prefix": prefix})
    manifest.write_dataset(ds, out, run_id, cfg.storage, cfg.output.partition_by, 50_000)
    counts = manifest.run_counts(out, [run_id], version, cfg.storage)
    manifest.commit(out, run_id, {"run_id": run_id, "model_version": version, "synthetic_weights": is_synthetic(cfg),
                                  "stage_fingerprints": stage_fingerprints(cfg), "inputs": rows, "counts": counts,
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": to_dict(cfg)},
                    cfg.storage)
    ray.shutdown()
    return {"weights": weights, "out": out, "listing": listing, "rows": counts["rows"],
            "seconds": time.perf_counter() - t, "version": version}


def child(args) -> None:
    """The re-score itself, in a fresh process: its peak RSS is the run's driver's."""
    import ray
    from stages import ProcessTree, _proc_status, driver_peak_rss  # bench/stages.py

    from cafi import pipeline
    from cafi.config import load_config
    from cafi.summary import Phases

    spec = json.loads(args.child)
    cfg = load_config([spec["weights"]], [*BASE, *spec["storage"], f"input.manifest={spec['listing']}",
                                          f"output.uri={spec['out']}", *CHANGED])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # The library's fixed costs are paid before "before" -- Ray Data's executor and its imports, the
    # object-store client (botocore's service models) -- so what is left above it is what the run holds.
    ray.data.range(1000).map_batches(lambda b: b, batch_format="pyarrow").materialize()
    from cafi.storage import filesystem

    fs, path = filesystem(spec["listing"], cfg.storage)
    fs.info(path)
    before = _proc_status(os.getpid())
    driver = DriverPeaks()
    by_phase: dict[str, int] = {}  # the driver's private peak (MiB above before) in each phase of the run
    mark = Phases.mark

    def marked(self, name):
        mark(self, name)
        by_phase[name] = round((driver.peak["RssAnon"] - before["RssAnon"]) / MIB)
        driver.peak["RssAnon"] = 0

    Phases.mark = marked  # cafi.summary.Phases: the class pipeline.run uses
    with ProcessTree() as tree, driver:  # polls the embedded Ray's processes: the object store's peak
        t = time.perf_counter()
        summary = pipeline.run(cfg)
        wall = time.perf_counter() - t
    ray.shutdown()
    print("RESULT " + json.dumps({"seconds": wall, "rss_before": before["VmRSS"], "rss_peak": driver_peak_rss(),
                                  "anon_before": before["RssAnon"],
                                  "anon_peak": before["RssAnon"] + max(by_phase.values(), default=0) * MIB,
                                  "private_by_phase": by_phase,
                                  "shmem_peak": driver.peak["RssShmem"], "file_before": before["RssFile"],
                                  "file_peak": driver.peak["RssFile"],
                                  "store_peak": tree.store_peak, "stages_run": summary["stages_run"],
                                  "rows": summary["counts"]["rows"], "reused": summary["reuse"]["reused_stages"],
                                  "phases": summary["phase_seconds"],
                                  "version_changed": summary["model_version"] != spec["version"]}), flush=True)


class DriverPeaks:
    """Polls this process's RssAnon (its private memory: what the driver holds), RssShmem (pages of
    Ray's shared object store it has mapped and touched: objects it put or got, owned by the store,
    not by the driver) and RssFile (pages of shared libraries and other mapped files) every 0.1 s;
    keeps each one's peak."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssShmem": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        from stages import _proc_status  # bench/stages.py

        while not self._stop.is_set():
            st = _proc_status(os.getpid())
            for k in self.peak:
                self.peak[k] = max(self.peak[k], st.get(k, 0))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(where: str, rows: int, tmp: str) -> dict:
    storage_over: list[str] = []
    server = None
    if where == "s3":
        from moto.server import ThreadedMotoServer

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("rescore")
        root = "s3://rescore/bench"
    else:
        root = os.path.join(tmp, "local")
    try:
        built = build(where, rows, root, storage_over)
        print(f"[{where}] built a committed run of {built['rows']:,} rows in {built['seconds']:.1f} s", flush=True)
        spec = {**built, "storage": storage_over}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True, env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"[{where}] re-score failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
    finally:
        if server is not None:
            server.stop()
    grew = (res["rss_peak"] - res["rss_before"]) / rows
    private = (res["anon_peak"] - res["anon_before"]) / rows
    print(f"[{where}] threshold-only re-score: {res['seconds']:.1f} s for {res['rows']:,} rows; stages run "
          f"{res['stages_run'] or 'none'}; reused {', '.join(res['reused'])}; driver RSS {res['rss_before'] / MIB:.0f} "
          f"MiB before, peak {res['rss_peak'] / MIB:.0f} MiB ({grew:.1f} bytes per row above before); of which "
          f"private (RssAnon) {private:.1f} bytes per row above before, object-store pages mapped (RssShmem) peak "
          f"{res['shmem_peak'] / MIB:.0f} MiB, mapped files (RssFile: libraries) {res['file_before'] / MIB:.0f} -> "
          f"{res['file_peak'] / MIB:.0f} MiB; private peak per phase (MiB above before) {res['private_by_phase']}; "
          f"object store peak {res['store_peak'] / MIB:.0f} MiB; phases (s) "
          f"{res['phases']}", flush=True)
    return {**res, "where": where, "bytes_per_row": grew, "private_per_row": private}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--where", default="local,s3", help="local and/or s3 (moto on loopback)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from stages import machine_line

    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="cafi-rescore-") as tmp:
        for where in [w for w in args.where.split(",") if w]:
            results.append(measure(where, args.rows, tmp))
    worst = max(results, key=lambda r: r["seconds"])
    print(f"threshold-only re-score of {worst['rows']} rows: {worst['seconds']:.1f} s, driver peak "
          f"{worst['rss_peak'] / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
