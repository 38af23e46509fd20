"""`cafi identities` at scale: 1,000,000 constructed rows of 100,000 identities.

Writes a committed run (real Parquet manifest files, float16 embeddings, rows of all identities mixed
in every file) and its identities CSV, with planted findings: 1 % of the samples carry another
identity's face (outliers), 0.5 % are near-copies of another sample of their identity (duplicates),
0.05 % are near-copies of a sample of another identity (conflicts). Then runs the whole command
(Ray Data hash buckets, the tasks per bucket and per index cell group, the outputs and the page) on
an embedded local Ray and prints

    identities for <N> rows: <s> s, peak <MiB> MiB

where peak is the largest peak RSS of any one process (the driver or a Ray worker: what bounds a
task is its bucket), sampled every 0.2 s; then the sum over processes, the phases, and the precision
and recall of each planted finding against what the command found.

    python bench/identities.py [--rows 1000000] [--identities 100000] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cafi import columns, manifest  # noqa: E402

RUN_ID = "20250101T000000Z-1de000"
VERSION = "bench"
CHUNK = 50_000            # rows per manifest file, at least two rows of every identity (see construct)
DIM = columns.EMBEDDING_DIM


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def construct(out: str, rows: int, n_ids: int, seed: int = 0) -> tuple[str, dict]:
    """The committed run and the identities CSV; returns the CSV path and the planted URIs."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_ids, DIM), dtype=np.float32)).astype(np.float16)
    identity = np.arange(rows) % n_ids                      # every file holds rows of every identity
    # local paths that are not there: the page's thumbnails are "no preview" placeholders, at once
    uris = np.array([f"{out}/crops/{i:06d}/{r:07d}.jpg" for r, i in enumerate(identity)], dtype=object)
    kinds = rng.choice(4, rows, p=[0.9845, 0.01, 0.005, 0.0005])   # clean, mislabelled, duplicate, conflict
    planted = {"outlier": set(), "duplicate": set(), "conflict": set()}   # URIs; duplicates as (copy, source)
    d = os.path.join(manifest.manifest_uri(out), f"model_version={VERSION}", "decision=accepted")
    os.makedirs(d, exist_ok=True)
    chunk = max(CHUNK, 2 * n_ids)   # a duplicate's source (row r - n_ids, same identity) is in its file
    for n, start in enumerate(range(0, rows, chunk)):
        idx = np.arange(start, min(rows, start + chunk))
        noise = unit(rng.standard_normal((len(idx), DIM), dtype=np.float32))
        emb = unit(centres[identity[idx]].astype(np.float32) + noise)
        mis = kinds[idx] == 1
        other = (identity[idx][mis] + rng.integers(1, n_ids, mis.sum())) % n_ids
        emb[mis] = unit(centres[other].astype(np.float32) + noise[mis])
        for kind, source_of in ((2, lambda r: r - n_ids), (3, lambda r: r - 1)):  # a same-identity / other row
            sel = np.flatnonzero((kinds[idx] == kind) & (idx >= n_ids))
            src = source_of(idx[sel])
            ok = (src >= start) & (kinds[src] == 0)
            sel, src = sel[ok], src[ok]
            emb[sel] = unit(emb[src - start] + 0.05 * unit(rng.standard_normal((len(sel), DIM), dtype=np.float32)))
            if kind == 2:
                planted["duplicate"] |= set(zip(uris[idx[sel]].tolist(), uris[src].tolist(), strict=True))
            else:   # the copy is also another identity's face under this label: an outlier too
                planted["conflict"] |= set(uris[idx[sel]]) | set(uris[src])
                planted["outlier"] |= set(uris[idx[sel]])
        planted["outlier"] |= set(uris[idx[mis]])
        t = pa.table({
            "uri": pa.array(uris[idx].tolist(), pa.string()),
            "status": pa.array(["scored"] * len(idx)), "serfiq": pa.array(rng.uniform(0, 1, len(idx)), pa.float32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).ravel()), DIM),
            "shard_offset": pa.nulls(len(idx), pa.int64()), "shard_size": pa.nulls(len(idx), pa.int64()),
            "run_id": pa.array([RUN_ID] * len(idx)),
            "scored_at": pa.array(np.full(len(idx), np.datetime64("2025-01-01T00:00:00", "us")))})
        pq.write_table(t, os.path.join(d, f"{RUN_ID}_{n:06d}_0.parquet"), row_group_size=16_384)
    ids_csv = os.path.join(out, "ids.csv")
    with open(ids_csv, "w") as fh:
        fh.write("uri,identity\n")
        fh.writelines(f"{u},person-{i}\n" for u, i in zip(uris.tolist(), identity.tolist(), strict=True))
    manifest.commit(out, RUN_ID, {"run_id": RUN_ID, "model_version": VERSION, "inputs": rows,
                                  "finished_at": "2025-01-01T00:00:00+00:00",
                                  "config": {"models": {"fiqa": {"kind": "serfiq"}}}}, None)
    return ids_csv, planted


class PeakRss(threading.Thread):
    """Peak RSS of this process and its descendants (the local Ray's workers), sampled."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every, self.stop = psutil.Process(), every, threading.Event()
        self.largest, self.total = 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            rss = []
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss.append(p.memory_info().rss)
                except Exception:  # noqa: BLE001 - a worker that just exited
                    pass
            self.largest, self.total = max(self.largest, max(rss)), max(self.total, sum(rss))
            self.stop.wait(self.every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the constructed run and the outputs")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="cafi-identities-bench-")
    out = os.path.join(root, "out")
    t = time.perf_counter()
    ids_csv, planted = construct(out, args.rows, args.identities)
    print(f"constructed {args.rows:,} rows of {args.identities:,} identities in {time.perf_counter() - t:.1f} s: "
          f"{root}", file=sys.stderr)

    import ray

    from cafi.identities.command import identities

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    peak = PeakRss()
    peak.start()
    t = time.perf_counter()
    summary = identities(manifest.run_uri(out, RUN_ID), os.path.join(root, "curation"), ids_uri=ids_csv)
    wall = time.perf_counter() - t
    peak.stop.set()
    peak.join()
    print(f"identities for {summary['samples']} rows: {wall:.1f} s, peak {peak.largest / 2**20:.0f} MiB")
    print(f"sum of the processes' RSS, peak: {peak.total / 2**20:.0f} MiB (shared object-store pages counted "
          "in every process that maps them)")
    print(f"phases (s): {json.dumps(summary['phases_seconds'])}")
    print(f"index: {json.dumps(summary['index'])}; removed: {json.dumps(summary['removed'])}")
    s = pq.read_table(os.path.join(root, "curation", "samples.parquet"),
                      columns=["uri", "outlier", "duplicate_of", "conflict_with"])
    dups = s.filter(s["duplicate_of"].is_valid())
    pairs = set(zip(dups["uri"].to_pylist(), dups["duplicate_of"].to_pylist(), strict=True))
    found = {"outlier": set(s.filter(s["outlier"])["uri"].to_pylist()),
             "duplicate": pairs | {(b, a) for a, b in pairs},   # either copy may be the better one
             "conflict": set(s.filter(s["conflict_with"].is_valid())["uri"].to_pylist())}
    planted["duplicate"] |= {(b, a) for a, b in planted["duplicate"]}
    for kind in ("outlier", "duplicate", "conflict"):
        hit = len(found[kind] & planted[kind])
        print(f"{kind:9s}: planted {len(planted[kind]):6d}, found {len(found[kind]):6d}, precision "
              f"{hit / max(1, len(found[kind])):.4f}, recall {hit / max(1, len(planted[kind])):.4f}")
    ray.shutdown()
    if not args.keep and not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
