"""Hostile inputs through real local runs: every crafted case leaves exactly one row per input.

The cases: the crafted images of the shared pipeline test (cafi.samples.hostile_images: a
1,250,000 x 32 PNG, a 4,000,000 x 1 PNG, an EPS named .jpg), the findings of issue 20 that this
tree fixes (a 40 MP 16-bit PNG; a .json sidecar nested 100,000 deep; a non-numeric pax size, a
bad pax record length, a bad size field; a 48 MiB pax header; a member over image.max_bytes;
repeated keys in a tar; a Parquet file with one key on 6,000 rows and null images), and the
seeded fuzz corpus of tests/fuzzkit.py (mutated JPEG, PNG, WebP, tar and Parquet inputs).

Three real runs on a local Ray (synthetic weights, the small detector, 128-pixel crops): the files,
the WebDataset shards, the Parquet shards; the files run writes its report (thumbnails of the
hostile rows), and the WebDataset run is exported with `--decision all` (what cannot be read is
skipped and counted). Per case, the inputs it must leave are what cafi's reader enumerates (one per
file; a shard's samples and, if it breaks, its own row): `lost` counts those without exactly one
committed row, and committed rows of no input. `slowest case` is the read + decode of one case,
in this process, through the same functions the tasks run (cafi/stages/read.py read_objects,
cafi/inputs/shards.py read_shard, cafi/imaging.decode). `peak task RSS` is the largest peak RSS
(VmHWM, polled from /proc: bench/stages.py ProcessTree) of the Ray task workers -- the read and
shard tasks, decide and write; the model actor, which decodes, is printed on the line above.

    python bench/hostile.py [--fuzz 30] [--seed 40]

The last line: `hostile inputs: <n> cases, <rows> rows, <lost> lost, peak task RSS <MiB> MiB, slowest case <s> s`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stages as bench  # noqa: E402  (bench/stages.py: shared helpers)
from memory import role  # noqa: E402

MIB = 2**20
MAX_BYTES = 4 * MIB  # the runs' image.max_bytes: small enough that an oversized member is cheap to write
FAST = ["image.crop_size=128", f"image.max_bytes={MAX_BYTES}", "models.serfiq.samples=8",
        "models.parser.input_size=128", "models.dbcnn.batch_size=4", "ray.fuse_models=true",
        "ray.progress_bars=false", "decision.min_serfiq=0.5"]


def pax_record(key: str, value: bytes) -> bytes:
    body = key.encode() + b"=" + value + b"\n"
    n = len(body) + 2
    while len(str(n)) + 1 + len(body) != n:
        n = len(str(n)) + 1 + len(body)
    return str(n).encode() + b" " + body


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 1_700_000_000
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return _header(name, len(data), kind) + data + bytes(-len(data) % 512)


def _end() -> bytes:
    return bytes(1024)


def findings(images: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """The issue's reproducible findings, by input kind: name -> bytes."""
    import cv2
    import numpy as np
    import pyarrow as pa

    from cafi.samples import hostile_images
    from tests.fuzzkit import _tar_checksum
    from tests.shardkit import parquet_bytes, tar_bytes

    jpg = images["jpg"]
    ramp = (np.arange(5000 * 8000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(5000, 8000)
    files = {**hostile_images(), "deep16.png": cv2.imencode(".png", ramp)[1].tobytes()}  # 40 MP, 16-bit
    deep = b'{"identity": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad_size = bytearray(tar_bytes([("a.jpg", jpg), ("b.jpg", jpg)], fmt=tarfile.USTAR_FORMAT))
    at = 512 + len(jpg) + (-len(jpg) % 512)  # b.jpg's header: its size field is not a number
    head = bytearray(bad_size[at:at + 512])
    head[124:136] = b"zz\0" + bytes(9)
    _tar_checksum(head)
    bad_size[at:at + 512] = head
    pax_x = tarfile.XHDTYPE
    shards = {
        "deep-json.tar": _member("a.jpg", jpg) + _member("a.json", deep) + _member("b.jpg", jpg) + _end(),
        "pax-size.tar": _member("a.jpg", jpg) + _member("././@PaxHeader", pax_record("size", b"12x"), pax_x)
        + _member("b.jpg", jpg) + _end(),
        "pax-length.tar": _member("a.jpg", jpg) + _member("././@PaxHeader", b"99999 path=b.jpg\n", pax_x)
        + _member("b.jpg", jpg) + _end(),
        "bad-size.tar": bytes(bad_size),
        "pax-48mib.tar": _member("a.jpg", jpg) + _member("././@PaxHeader", pax_record("comment", b"x" * (48 * MIB)),
                                                         pax_x) + _member("b.jpg", jpg) + _end(),
        "oversized.tar": _member("a.jpg", jpg) + _member("big.jpg", jpg + bytes(MAX_BYTES + 1 - len(jpg))) + _end(),
        "repeated-keys.tar": tar_bytes([("a.jpg", jpg), ("b.jpg", jpg), ("a.jpg", jpg), ("a.png", images["png"])]),
    }
    parquet = {"one-key-6000-rows.parquet": parquet_bytes(pa.table({
        "key": ["k"] * 6000, "jpg": pa.array([None] * 6000, pa.binary())}), row_group_size=6000)}
    return {"files": files, "webdataset": shards, "parquet": parquet}


def committed(out: str) -> Counter:
    """Rows per uri in the committed data files of the latest version, read raw (not de-duplicated)."""
    import pyarrow.compute as pc

    from cafi import manifest

    version = manifest.committed_runs(out)[-1]["model_version"]
    ids = manifest.committed_run_ids(out, version)
    flt = pc.field("run_id").isin(ids) & (pc.field("model_version") == version)
    return Counter(manifest.dataset(out).to_table(columns=["uri"], filter=flt).column("uri").to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz", type=int, default=30, help="mutated inputs per kind (jpg, png, webp, tar, parquet)")
    ap.add_argument("--seed", type=int, default=40)
    args = ap.parse_args()

    import ray

    from cafi import export, manifest, pipeline
    from cafi.config import load_config
    from cafi.synth import synth
    from tests import fuzzkit

    print(bench.machine_line(1), flush=True)
    with tempfile.TemporaryDirectory(prefix="cafi-bench-hostile-") as d:
        weights = synth(os.path.join(d, "weights"), detector="retinaface_mobile0.25")
        images = fuzzkit.bases()
        crafted = findings(images)
        suffix = {"files": "", "webdataset": ".tar", "parquet": ".parquet"}
        for kind in fuzzkit.KINDS:
            fmt = {"tar": "webdataset", "parquet": "parquet"}.get(kind, "files")
            for case, blob in fuzzkit.corpus(kind, args.fuzz, args.seed):
                crafted[fmt][case + (suffix[fmt] or "." + kind)] = blob
        cases, slowest = 0, (0.0, "")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for name in ("ray", "ray.data", "cafi"):
            logging.getLogger(name).setLevel(logging.ERROR)
        tree = bench.ProcessTree()
        rows_total = lost = 0
        with tree:
            for fmt, inputs in crafted.items():
                folder = os.path.join(d, "in", fmt)
                os.makedirs(folder)
                over = [*FAST, f"input.uri={folder}", f"output.uri={d}/out-{fmt}", f"input.format={fmt}",
                        f"models.cache_dir={d}/cache", f"output.report={'true' if fmt == 'files' else 'false'}",
                        *(["input.keep_columns=[identity]"] if fmt == "webdataset" else [])]
                local = load_config([weights], [*over, f"output.uri={d}/local-{fmt}"])
                expected: list[str] = []
                for name, blob in sorted(inputs.items()):
                    path = os.path.join(folder, name)
                    with open(path, "wb") as fh:
                        fh.write(blob)
                    t = time.perf_counter()
                    got = (fuzzkit.read_file_case(path, local) if fmt == "files"
                           else fuzzkit.read_shard_case(path, local, check_index=False))
                    seconds = time.perf_counter() - t
                    slowest = max(slowest, (seconds, f"{fmt}/{name}"))
                    expected += [r["uri"] for r in got]
                    cases += 1
                t = time.perf_counter()
                summary = pipeline.run(load_config([weights], over))
                wall = time.perf_counter() - t
                out = f"{d}/out-{fmt}"
                counts = committed(out)
                missing = sum(counts.get(u, 0) != 1 for u in set(expected))
                extra = sum(n for u, n in counts.items() if u not in set(expected))
                rows_total += sum(counts.values())
                lost += missing + extra + (len(expected) - len(set(expected)))
                print(f"{fmt}: {len(inputs)} cases, {len(expected)} inputs, {sum(counts.values())} rows "
                      f"{dict(summary['counts']['status'])}, {missing + extra} lost; run {wall:.1f} s; the run's "
                      f"summary counts {summary['inputs']} inputs", flush=True)
                run = manifest.run_uri(out, summary["run_id"])
                if fmt == "files":
                    page = os.path.join(run, "report.html")
                    print(f"  report: {'written' if os.path.exists(page) else 'MISSING'} "
                          f"({os.path.getsize(page) if os.path.exists(page) else 0} bytes)", flush=True)
                if fmt == "webdataset":
                    done = export.export(run, f"{d}/export", decision="all", samples_per_shard=50)
                    print(f"  export --decision all: {done['samples']} of {done['selected']} samples written, "
                          f"skipped {json.dumps(done['skipped'])}", flush=True)
        ray.shutdown()
    peaks: dict[str, int] = {}
    for pid, name in tree.name.items():
        group = role(name)
        peaks[group] = max(peaks.get(group, 0), tree.hwm.get(pid, 0))
    actor = max((v for k, v in peaks.items() if k.startswith("model actor")), default=0)
    task = peaks.get("task workers (read/decode/decide/write)", 0)
    print(f"slowest case: {slowest[1]} ({slowest[0]:.2f} s); model actor (decodes) peak RSS {actor / MIB:.0f} MiB")
    print(f"hostile inputs: {cases} cases, {rows_total} rows, {lost} lost, peak task RSS {task / MIB:.0f} MiB, "
          f"slowest case {slowest[0]:.2f} s")


if __name__ == "__main__":
    main()
