"""Planning at scale: a manifest of 1,000,000 URIs (no images needed for planning).

The manifest lists some URIs more than once (--duplicates of them, each twice) and names objects
that do not exist (all but the first 64: "vanished" objects, error rows when scored).

Measures, in one run:
  fresh   time to plan a new run over the manifest (read it, key every URI, scan the output)
          and time to the first scored batch out of the pipeline; driver peak memory
  resume  the same when 90 % of the inputs are already written for the model version
          (a crashed run's files on disk)
The first 64 manifest entries are real crops; the rest name objects that do not exist, which
the pipeline turns into error rows without any model work.

    python bench/plan.py [--inputs 1000000] [--done 0.9] [--duplicates 10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafi import manifest, pipeline  # noqa: E402
from cafi.config import load_config  # noqa: E402
from cafi.inputs.sources import open_source  # noqa: E402
from cafi.samples import write_samples  # noqa: E402
from cafi.synth import synth  # noqa: E402
from cafi.version import model_version  # noqa: E402


def rss_mib() -> float:
    """Peak resident set of this process so far (the driver), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan(cfg):
    """What pipeline.run does before any image is read: the output scan, the input keys, the to-do set."""
    t = time.perf_counter()
    done, _ = pipeline.scan_written(cfg, model_version(cfg))
    src = open_source(cfg, "bench")
    src.plan(done)
    return src, done, time.perf_counter() - t


def fake_written(out: str, version: str, uris: list[str], run_id: str = "crashed-attempt") -> None:
    """Rows of a crashed attempt: data files only, no _SUCCESS."""
    d = os.path.join(out, "manifest", f"model_version={version}", "decision=rejected")
    os.makedirs(d, exist_ok=True)
    step = 100_000
    for i in range(0, len(uris), step):
        part = uris[i:i + step]
        n = len(part)
        cols = {f.name: pa.nulls(n, f.type) for f in manifest.SCHEMA}
        cols.update(uri=pa.array(part), status=pa.array(["error"] * n), run_id=pa.array([run_id] * n),
                    model_version=pa.array([version] * n), decision=pa.array(["rejected"] * n))
        table = pa.table(cols, schema=manifest.SCHEMA).drop_columns(["model_version", "decision"])
        pq.write_table(table, os.path.join(d, f"{run_id}_{i // step:06d}.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--done", type=float, default=0.9)
    ap.add_argument("--duplicates", type=int, default=10_000, help="URIs listed twice")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        weights = synth(os.path.join(tmp, "w"), detector="retinaface_mobile0.25")
        real = write_samples(os.path.join(tmp, "real"), count=64, unusual=False, broken=False)
        unique = args.inputs - args.duplicates
        uris = real + [f"{tmp}/absent/{i:09d}.jpg" for i in range(unique - len(real))]
        uris += uris[len(real):len(real) + args.duplicates]  # listed a second time
        listing = os.path.join(tmp, "inputs.parquet")
        pq.write_table(pa.table({"uri": uris}), listing, row_group_size=100_000)
        del uris
        base = [f"input.manifest={listing}", "ray.progress_bars=false", "models.serfiq.samples=8"]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        rss0 = rss_mib()

        cfg = load_config([weights], base + [f"output.uri={tmp}/out-fresh"])
        src, done, t_plan = plan(cfg)
        n_listed, keys, duplicated = src.listed, src.keys, src.duplicated
        t = time.perf_counter()
        ds = src.dataset(done, ray.put(src.todo), models_run=True)
        scored = pipeline.build(ds, cfg, model_version(cfg), "bench", read=src.read_step, kept=src.kept)
        next(iter(scored.iter_batches(batch_size=8)))
        t_first = time.perf_counter() - t
        rss_fresh = rss_mib()
        print(f"machine: {os.cpu_count()} CPUs; {args.inputs:,} inputs in a Parquet manifest")
        print(f"fresh  : plan {t_plan:6.1f} s, first scored batch after {t_first:6.1f} s more; "
              f"{len(src.todo):,} to score")
        vanished = len(keys) - len(real)
        print(f"counts : {n_listed:,} listed = {len(keys):,} inputs + {n_listed - len(keys):,} duplicates "
              f"({len(duplicated):,} URIs listed more than once; expected {args.duplicates:,}); {vanished:,} of the "
              f"inputs name vanished objects (error rows when scored)")
        assert len(keys) == unique and n_listed - len(keys) == args.duplicates == len(duplicated)

        cfg = load_config([weights], base + [f"output.uri={tmp}/out-resume"])
        all_uris = pq.read_table(listing)["uri"].to_pylist()
        n_done = int(len(all_uris) * args.done)
        fake_written(f"{tmp}/out-resume", model_version(cfg), all_uris[-n_done:])
        del all_uris
        src, _, t_resume = plan(cfg)
        rss_resume = rss_mib()
        print(f"resume : plan {t_resume:6.1f} s with {n_done:,} already written; {len(src.todo):,} left to score")
        per_input = (rss_resume - rss0) * 1024 * 1024 / args.inputs
        print(f"driver peak RSS: {rss0:.0f} MiB after ray.init, {rss_fresh:.0f} MiB after the fresh plan, "
              f"{rss_resume:.0f} MiB after the resume plan ({per_input:.0f} bytes per input above ray.init)")
        ray.shutdown()


if __name__ == "__main__":
    main()
