"""`cafi eval` at scale: 100,000 labelled rows with embeddings, against labels and identities.

Writes a committed run (real Parquet, the full manifest schema, float16 embeddings) of synthetic
identities whose genuine similarity falls with a hidden quality, a labels CSV (MOS and accept for
every row) and an identities CSV, then measures in child processes:
  read   reading the rows `cafi eval` needs (the baseline: what any evaluation must pay)
  eval   `cafi eval RUN LABELS --identities IDS --out DIR`: ranking, suggestion, EDC of every quality
         column with 1,000,000 non-mated pairs, eval.html, edc.json/csv
and prints wall time and peak RSS of each, and the ratio.

    python bench/eval.py [--rows 100000] [--per-identity 10] [--nonmated 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cafi import columns, manifest  # noqa: E402
from cafi.config import load_config, to_dict  # noqa: E402
from cafi.decision import OK, SCORED, reject_reasons  # noqa: E402
from cafi.stages.specs import score_rules  # noqa: E402

RUN_ID = "20250101T000000Z-be9c00"
VERSION = "bench"
CHUNK = 25_000

# Peak RSS of a child, from inside it: VmHWM of its own address space. (ru_maxrss from wait4 would
# also count the parent's pages at fork: the data generated here.)
PEAK = """
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            sys.stderr.write(f"\\npeak-rss-kib {line.split()[1]}\\n")
atexit.register(_peak)
"""
EVAL = PEAK + "from cafi.cli import main\nsys.exit(main(sys.argv[1:]))\n"
READ = PEAK + """
import sys, time
import pyarrow as pa
from cafi import evaluate, runs
t = time.perf_counter()
uris = pa.concat_arrays([evaluate.read_labels(sys.argv[2])["uri"].combine_chunks(),
                         evaluate.read_identities(sys.argv[3])["uri"].combine_chunks()])
rows = runs.read_rows(sys.argv[1], None, evaluate.ROW_COLUMNS + ["embedding"], uris)
print(rows.table.num_rows, time.perf_counter() - t)
"""


def write_run(out: str, rows: int, per_identity: int, seed: int) -> tuple[str, str, str]:
    """The run, labels.csv and ids.csv; returns their paths."""
    rng = np.random.default_rng(seed)
    dim = columns.EMBEDDING_DIM
    n_ids = rows // per_identity
    centres = rng.normal(size=(n_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cfg = load_config([], ["input.uri=unused", "output.uri=unused"])
    dec = cfg.decision
    labels = open(os.path.join(out, "labels.csv"), "w")
    ids = open(os.path.join(out, "ids.csv"), "w")
    labels.write("uri,mos,accept\n")
    ids.write("uri,identity\n")
    for part, start in enumerate(range(0, rows, CHUNK)):
        n = min(CHUNK, rows - start)
        k = np.arange(start, start + n)
        identity = k // per_identity
        q = rng.uniform(0, 1, n)
        noise = rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
        emb = centres[identity] + (20 * (1 - q) ** 6)[:, None].astype(np.float32) * noise
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        uris = [f"s3://bench/crops/{i:07d}.jpg" for i in k]
        floats = {"serfiq": q, "serfiq_raw": q, "dbcnn": rng.uniform(0, 100, n), "mask_fraction": np.full(n, 0.4),
                  "det_score": rng.uniform(0.9, 1, n), "yaw": 60 * (1 - q) * rng.choice([-1, 1], n),
                  "pitch": rng.normal(0, 10, n), "sharpness": q * 500 + rng.normal(0, 50, n),
                  "luma_mean": rng.uniform(0.2, 0.8, n), "inter_eye_px": rng.uniform(20, 120, n)}
        floats = {c: v.astype(np.float32) for c, v in floats.items()}
        status = np.full(n, OK, dtype=object)
        reason = reject_reasons({"status": status, **floats}, dec, *score_rules(dec, "serfiq", "dbcnn"))
        accepted = np.equal(reason, None)
        cols = {**floats, "uri": uris, "status": [SCORED] * n, "width": np.full(n, 384, np.int32),
                "height": np.full(n, 384, np.int32), "cafi": np.where(accepted, floats["dbcnn"], np.nan),
                "accepted": accepted, "decision": np.where(accepted, "accepted", "rejected"),
                "reject_reason": reason.tolist(), "model_version": [VERSION] * n, "run_id": [RUN_ID] * n,
                "scored_at": np.full(n, np.datetime64("2025-01-01T00:00:00", "us"))}
        table = pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type)
                          for f in columns.SCHEMA if f.name != "embedding"})
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(emb.astype(np.float16).ravel()), dim))
        for decision in ("accepted", "rejected"):
            d = os.path.join(manifest.manifest_uri(out), f"model_version={VERSION}", f"decision={decision}")
            os.makedirs(d, exist_ok=True)
            sub = table.filter(pa.array(table["decision"].to_numpy(zero_copy_only=False) == decision))
            pq.write_table(sub.drop_columns(["model_version", "decision"]),
                           os.path.join(d, f"{RUN_ID}_{part:06d}_0.parquet"))
        mos = 1 + 4 * q + rng.normal(0, 0.3, n)
        labels.writelines(f"{u},{m:.3f},{int(m > 3)}\n" for u, m in zip(uris, mos, strict=True))
        ids.writelines(f"{u},person-{i}\n" for u, i in zip(uris, identity, strict=True))
    labels.close()
    ids.close()
    manifest.commit(out, RUN_ID, {"run_id": RUN_ID, "model_version": VERSION, "inputs": rows, "config": to_dict(cfg),
                                  "finished_at": "2025-01-01T00:00:00+00:00"}, None)
    return manifest.run_uri(out, RUN_ID), os.path.join(out, "labels.csv"), os.path.join(out, "ids.csv")


def child(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of a Python child process running `cmd` (`-c` code + args)."""
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:  # pipes could fill up
        t = time.perf_counter()
        code = subprocess.call([sys.executable, *cmd], stdout=out_f, stderr=err_f,
                               env=dict(os.environ, PYTHONPATH=REPO))
        wall = time.perf_counter() - t
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{err[-3000:]}")
    peak = [line.split()[1] for line in err.splitlines() if line.startswith("peak-rss-kib ")]
    return wall, int(peak[-1]) / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--nonmated", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write the run (default: a temporary directory)")
    args = ap.parse_args()
    out = args.dir or tempfile.mkdtemp(prefix="cafi-bench-eval-")
    t = time.perf_counter()
    run, labels, ids = write_run(out, args.rows, args.per_identity, args.seed)
    print(f"wrote {args.rows:,} rows ({args.rows // args.per_identity:,} identities x {args.per_identity}) "
          f"with embeddings in {time.perf_counter() - t:.1f} s: {run}")
    read_wall, read_rss, read_out = child(["-c", READ, run, labels, ids])
    eval_dir = os.path.join(out, "eval")
    eval_wall, eval_rss, eval_out = child(["-c", EVAL, "eval", run, labels, "--identities", ids, "--nonmated",
                                           str(args.nonmated), "--out", eval_dir, "--json"])
    doc = json.loads(eval_out)
    e = doc["edc"]
    print(f"read rows (baseline): {read_wall:6.1f} s wall, peak RSS {read_rss:7.0f} MiB ({read_out.split()[0]} rows)")
    print(f"cafi eval:            {eval_wall:6.1f} s wall, peak RSS {eval_rss:7.0f} MiB "
          f"({e['mated_pairs']:,} mated pairs, {e['nonmated_pairs']:,} non-mated, {len(e['pauc']) - 2} quality "
          f"columns, {len(doc['labels']['ranking'])} ranked)")
    print(f"eval / read: {eval_wall / read_wall:.1f}x wall, {eval_rss / read_rss:.1f}x peak RSS; "
          f"the embeddings alone in float32: {args.rows * columns.EMBEDDING_DIM * 4 / 2**20:.0f} MiB")
    best = [r for r in e["pauc"] if r["order"] == "score"][:3]
    print("best pAUC: " + ", ".join(f"{r['score']} {r['pauc']:.4f} (relative {r['relative']:.2f})" for r in best))
    if not args.dir:  # our own temporary run (gigabytes at a million rows); a --dir is the caller's to keep
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
