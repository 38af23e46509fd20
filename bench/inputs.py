"""The read stage by input format: one object per crop vs WebDataset shards vs Parquet shards.

On the moto S3 server on loopback, behind the request-counting proxy of the tests
(tests/faults.FlakyProxy with no faults), one run each of the job's read stage -- the read tasks
(cafi/stages/read.py for files, the shard task of cafi/inputs/shards.py for shards) and the model
actor's Decode (cafi.stages.decode.Decode on the CPU), no models -- over the same crops:

  files       N objects, one GET each (what input.format files reads)
  webdataset  N / per-shard tars (<key>.jpg + <key>.json), input.format webdataset
  parquet     N / per-shard Parquet files (key, jpg), input.format parquet

It prints GET requests, GETs per shard, wall time per 10,000 crops, and the ranged GETs the
report's thumbnails of shard samples cost (cafi.inputs.samples.read_samples). The last line is the ratio
of the files read stage to the slower shard format's, and the most GETs any shard took.

    python bench/inputs.py [--n 10000] [--per-shard 1000] [--size 384]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "cafi-bench-key-id")  # the loopback server only
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "cafi-bench-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from cafi.config import ImageConfig, load_config  # noqa: E402
from cafi.inputs.tar import TarWriter  # noqa: E402
from cafi.samples import draw_face, encode  # noqa: E402
from tests.faults import FlakyProxy  # noqa: E402

BUCKET = "bench"
DISTINCT = 64  # distinct crops, repeated: decoding costs the same, generating 10,000 would take minutes


class Requests:
    """Object GETs, LISTs and HEADs through the proxy, by path."""

    def __init__(self, proxy: FlakyProxy):
        self.log: list[tuple[str, str]] = []
        fault = proxy._fault

        def counted(method: str, path: str):
            self.log.append((method, path))
            return fault(method, path)

        proxy._fault = counted

    def count(self, method: str, prefix: str, listing: bool = False) -> int:
        return sum(1 for m, p in self.log if m == method and p.startswith(prefix) and (("?" in p) == listing))


def crops(n: int, size: int) -> list[bytes]:
    pool = [encode(draw_face(size, seed=i), "JPEG") for i in range(DISTINCT)]
    return [pool[i % DISTINCT] for i in range(n)]


def upload(fs, items: dict[str, bytes], chunk: int = 500) -> None:
    keys = list(items)
    for start in range(0, len(keys), chunk):
        fs.pipe({k: items[k] for k in keys[start:start + chunk]})


def write_inputs(fs, data: list[bytes], per_shard: int) -> None:
    upload(fs, {f"{BUCKET}/files/{i:09d}.jpg": d for i, d in enumerate(data)})
    shards = {}
    for n, start in enumerate(range(0, len(data), per_shard)):
        buf = io.BytesIO()
        tw = TarWriter(buf)
        for i in range(start, min(start + per_shard, len(data))):
            tw.add(f"{i:09d}.jpg", data[i])
            tw.add(f"{i:09d}.json", json.dumps({"i": i}).encode())
        tw.close()
        shards[f"{BUCKET}/webdataset/{n:06d}.tar"] = buf.getvalue()
        part = data[start:start + per_shard]
        table = pa.table({"key": [f"{i:09d}" for i in range(start, start + len(part))],
                          "jpg": pa.array(part, pa.binary())})
        out = io.BytesIO()
        pq.write_table(table, out, row_group_size=256)
        shards[f"{BUCKET}/parquet/{n:06d}.parquet"] = out.getvalue()
    upload(fs, shards, chunk=8)


class DecodeOnly:
    """The model actor's first step alone: bytes -> square RGB crops on the CPU; returns row counts."""

    def __init__(self, image: ImageConfig, threads: int):
        from cafi.stages.decode import Decode

        self.decode = Decode(image, device=None, threads=threads)

    def __call__(self, batch: dict) -> dict:
        self.decode(batch)
        ok = batch["status"] == "ok"
        return {"rows": np.array([len(ok)]), "decoded": np.array([int(ok.sum())])}


def read_stage(cfg, fmt: str, cpus: int) -> tuple[int, int, float]:
    """Run the read stage once over the whole input; (rows, decoded, seconds)."""
    import ray
    from ray.data import ActorPoolStrategy

    from cafi.inputs.files import uri_dataset
    from cafi.inputs.shards import ShardSource
    from cafi.keys import EMPTY
    from cafi.stages.read import read_objects

    started = time.perf_counter()
    if fmt == "files":
        ds = uri_dataset(cfg)
        ds = ds.map_batches(read_objects, fn_kwargs={"cfg": cfg, "run_id": None},
                            batch_size=cfg.read.batch_size, num_cpus=cfg.read.num_cpus)
    else:
        shards = ShardSource(cfg, "bench")
        shards.plan(EMPTY)
        ds = shards.dataset(EMPTY, ray.put(shards.todo), models_run=True)
    ds = ds.map_batches(DecodeOnly, fn_constructor_kwargs={"image": cfg.image, "threads": cpus},
                        batch_size=cfg.read.batch_size, num_cpus=1, compute=ActorPoolStrategy(size=1),
                        zero_copy_batch=False)
    rows = decoded = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += int(b["rows"].sum())
        decoded += int(b["decoded"].sum())
    return rows, decoded, time.perf_counter() - started


def thumbnails(cfg, fmt: str, endpoint: str, k: int = 24) -> tuple[int, int]:
    """The ranged GETs `k` report thumbnails of shard samples cost (read_samples on manifest-like rows)."""
    from cafi.inputs.samples import read_samples
    from cafi.inputs.shards import ShardSource, shard_samples

    shards = ShardSource(cfg, "bench-thumbs")
    rows = []
    for shard in shards.shards[:2]:
        samples, _ = shard_samples(cfg, shard.uri, shards.kept, {})
        rows += [(s.uri, s.offset, s.size) for s in samples][:: max(1, 1000 // k)]
    rows = rows[:k]
    with FlakyProxy(endpoint, every=10**9, max_requests=10**7, lifetime_s=3600) as proxy:
        seen = Requests(proxy)
        storage = load_config([], [f"input.uri={cfg.input.uri}", "output.uri=/tmp", f"storage.endpoint_url={proxy.url}"]
                              ).storage
        got = read_samples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], storage,
                           max_bytes=ImageConfig().max_bytes)
    assert all(isinstance(g, bytes) and g for g in got), got
    return len(rows), seen.count("GET", f"/{BUCKET}/{fmt}/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="crops (default 10,000)")
    ap.add_argument("--per-shard", type=int, default=1000, help="crops per shard (default 1,000)")
    ap.add_argument("--size", type=int, default=384, help="crop side in pixels (default 384)")
    args = ap.parse_args()

    import ray
    import s3fs
    from moto.server import ThreadedMotoServer

    from cafi.ray_setup import configure_data_context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    cpus = os.cpu_count() or 2
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        t = time.perf_counter()
        data = crops(args.n, args.size)
        write_inputs(fs, data, args.per_shard)
        mean_kb = sum(map(len, data)) / len(data) / 1024
        print(f"{args.n} crops of {args.size}x{args.size} (JPEG, {mean_kb:.0f} KiB mean), {args.per_shard} per shard; "
              f"inputs written in {time.perf_counter() - t:.0f} s; {cpus} CPUs")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("files", "webdataset", "parquet"):
                with FlakyProxy(endpoint, every=10**9, max_requests=10**7, lifetime_s=7200) as proxy:
                    seen = Requests(proxy)
                    cfg = load_config([], [f"input.uri=s3://{BUCKET}/{fmt}/", f"output.uri={tmp}/{fmt}",
                                           f"input.format={fmt}", f"storage.endpoint_url={proxy.url}",
                                           f"image.crop_size={args.size}", "ray.progress_bars=false"])
                    configure_data_context(cfg)
                    if not results:  # start the workers and the decode actor once before any timing
                        warm = load_config([], [f"input.uri=s3://{BUCKET}/files/", f"output.uri={tmp}/w",
                                                f"storage.endpoint_url={proxy.url}", "input.limit=16"])
                        read_stage(warm, "files", cpus)
                        seen.log.clear()
                    rows, decoded, seconds = read_stage(cfg, fmt, cpus)
                objects = args.n if fmt == "files" else -(-args.n // args.per_shard)
                gets = seen.count("GET", f"/{BUCKET}/{fmt}/")
                results[fmt] = {"rows": rows, "decoded": decoded, "seconds": seconds, "gets": gets,
                                "objects": objects, "lists": seen.count("GET", f"/{BUCKET}", listing=True),
                                "heads": seen.count("HEAD", f"/{BUCKET}/{fmt}/")}
                assert rows == decoded == args.n, (fmt, rows, decoded)
        print(f"\n{'input':<11} {'objects':>8} {'GETs':>7} {'GETs/object':>12} {'LISTs':>6} {'HEADs':>6} "
              f"{'read+decode s':>14} {'s per 10k':>10} {'crops/s':>8}")
        for fmt, r in results.items():
            per10k = r["seconds"] * 10_000 / args.n
            print(f"{fmt:<11} {r['objects']:>8} {r['gets']:>7} {r['gets'] / r['objects']:>12.2f} {r['lists']:>6} "
                  f"{r['heads']:>6} {r['seconds']:>14.1f} {per10k:>10.1f} {args.n / r['seconds']:>8.0f}")
        cfg = load_config([], [f"input.uri=s3://{BUCKET}/webdataset/", "output.uri=/tmp/unused",
                               "input.format=webdataset", f"storage.endpoint_url={endpoint}"])
        k, thumb_gets = thumbnails(cfg, "webdataset", endpoint)
        print(f"\nreport thumbnails of shard samples: {k} samples read with {thumb_gets} ranged GETs")
        slower = max(("webdataset", "parquet"), key=lambda f: results[f]["seconds"])
        ratio = results["files"]["seconds"] / results[slower]["seconds"]
        per_shard = max(results[f]["gets"] / results[f]["objects"] for f in ("webdataset", "parquet"))
        print(f"read stage speedup, shards vs one object per crop: {ratio:.1f}x; GETs per shard: {per_shard:g}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
