"""SDD-FIQA pseudo-labels at scale: N rows with 512-d float16 embeddings in I identities (N / I samples
each), generated in Ray tasks (identity centre + noise scaled by a hidden quality), labelled by
cafi.train.sdd_label_job (identity buckets, pool, 12 draws) on an embedded local Ray and written to a Parquet file.

    python bench/labels.py [--rows 1000000] [--identities 100000] [--seed 0] [--num-cpus 2]

Prints `pseudo-labels for <N> rows: <s> s, peak <MiB> MiB`: the wall time from the dataset to the
written file (generating the embeddings included: they are made in the same streaming tasks that a
manifest read would be), and the largest private memory (RssAnon, polled from /proc every 0.5 s) of
any process of the job (the driver, a Ray worker, a shuffle aggregator); then the three largest, the
largest VmHWM (which also counts the shared object-store pages a process read), and the SRCC of the
labels against the hidden quality.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

DIM = 512


def _descendants(root: int) -> list[int]:
    parent = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    parent[int(pid)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, todo = [root], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _memory_mib(pid: int) -> tuple[float, float]:
    """(RssAnon: private memory now, VmHWM: peak RSS including shared object-store pages it touched)."""
    out = {"RssAnon:": 0.0, "VmHWM:": 0.0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0] + ":"
                if key in out:
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out["RssAnon:"], out["VmHWM:"]


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().split(b"\0")
        return (words[0].decode(errors="replace").split("/")[-1] + " " +
                " ".join(w.decode(errors="replace").split("/")[-1] for w in words[1:3]))[:50]
    except OSError:
        return "?"


class PeakPoll:
    def __init__(self):
        self.peaks: dict[int, tuple[float, str]] = {}  # the largest private memory seen, per process
        self.hwm = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @property
    def peak(self) -> float:
        return max((v for v, _ in self.peaks.values()), default=0.0)

    def top(self, n: int = 3) -> str:
        best = sorted(self.peaks.values(), reverse=True)[:n]
        return "; ".join(f"{name} {v:.0f} MiB" for v, name in best)

    def run(self):
        while not self.stop.is_set():
            for pid in _descendants(os.getpid()):
                anon, hwm = _memory_mib(pid)
                self.hwm = max(self.hwm, hwm)
                if anon > self.peaks.get(pid, (0.0, ""))[0]:
                    self.peaks[pid] = (anon, _name(pid))
            self.stop.wait(0.5)


def make_rows(batch: dict, per: int, seed: int) -> pa.Table:
    """Rows i: identity i // per; embedding = its centre (seeded by the identity) + noise * (1 - q)."""
    idx = batch["id"].astype(np.int64)
    ident = idx // per
    rng = np.random.default_rng([seed, int(idx[0])])
    q = rng.uniform(0, 1, len(idx)).astype(np.float32)
    # A centre per identity from a hash of the identity: the same in every task.
    shift = (ident[:, None] * 2654435761 + np.arange(DIM)[None, :] * 40503) % 1000003
    centres = np.sin(shift.astype(np.float32))  # distinct, deterministic per identity
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = centres + 2.0 * (1 - q)[:, None] * rng.normal(size=(len(idx), DIM)).astype(np.float32) / np.sqrt(DIM)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return pa.table({"uri": [f"s3://bench/{i}.jpg" for i in idx], "identity": [f"id-{j}" for j in ident],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).ravel()), DIM),
                     "q": q})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray
    from scipy.stats import spearmanr

    from cafi.train import sdd_label_job as sdd_job

    poll = PeakPoll()
    poll.thread.start()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    per = args.rows // args.identities
    tmp = tempfile.TemporaryDirectory(prefix="cafi-labels-")  # 1M rows of labels: removed at the end
    out = os.path.join(tmp.name, "labels.parquet")
    t0 = time.time()
    ds = ray.data.range(args.rows, override_num_blocks=max(1, args.rows // 20_000)).map_batches(
        make_rows, fn_kwargs={"per": per, "seed": args.seed}, batch_size=20_000, batch_format="numpy")
    labels = sdd_job.pseudo_labels(ds.drop_columns(["q"]), args.rows, args.seed)
    stats = sdd_job.write_labels(labels, out)
    wall = time.time() - t0
    poll.stop.set()
    poll.thread.join()
    print(f"pseudo-labels for {stats['rows']} rows: {wall:.1f} s, peak {poll.peak:.0f} MiB")
    print(f"largest private peaks: {poll.top()}; largest VmHWM (object-store pages included) {poll.hwm:.0f} MiB")
    got = pq.read_table(out).to_pandas().set_index("uri")
    truth = ds.select_columns(["uri", "q"]).to_pandas().set_index("uri")["q"]
    ok = got["label"].notna()
    print(f"labelled {int(ok.sum())}, identities {stats['identities']}, SRCC(label, hidden quality) = "
          f"{spearmanr(got['label'][ok], truth.loc[got.index[ok]]).statistic:.3f}")
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
