"""Seeded mutations of valid inputs -- JPEG, PNG, WebP, WebDataset tar shards, Parquet shards with
an image column -- and a driver that puts each through cafi's real read and decode code without Ray
(tests/test_fuzz.py; bench/hostile.py puts the same corpus through real runs).

Mutations: bit flips, truncations, inserted bytes, swapped headers (another format's first bytes;
two tar headers; another file's Parquet footer) and header fields set to extreme values with the
checksum fixed, so the parsers believe them (PNG IHDR size, JPEG SOF size, tar size fields).
The same seed gives the same cases.
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cafi import imaging
from cafi.config import ImageConfig, load_config
from cafi.samples import draw_face, encode

from .peak_rss import PeakRSS
from .shardkit import parquet_bytes, tar_bytes

KINDS = ("jpg", "png", "webp", "tar", "parquet")
IMAGE_KINDS = ("jpg", "png", "webp")
# The limits the fuzz reads under: small, so a mutation that passes the header checks still decodes fast.
IMAGE = {"crop_size": 32, "min_side": 8, "max_pixels": 2_000_000, "max_bytes": 256 * 1024}
IMAGE_CFG = ImageConfig(**IMAGE)
SHARD_BUFFER_MB = 1  # input.shard_buffer_mb: the block a shard task reads at a time
# The most one case may allocate (how far the process's resident size rises during it): a few bytes per
# pixel (the decoded image, its RGB copy), a few buffers of max_bytes (the bytes, a Parquet column), two shard
# blocks, the float band of a padded shrink, and 16 MiB of slack.
PER_PIXEL = 8
CASE_BYTES = (PER_PIXEL * IMAGE["max_pixels"] + 4 * IMAGE["max_bytes"] + 2 * SHARD_BUFFER_MB * 2**20
              + imaging._BAND_BYTES + 16 * 2**20)
OVERRIDES = [f"image.{k}={v}" for k, v in IMAGE.items()]


def base_images(seed: int = 3) -> dict[str, bytes]:
    face = draw_face(40, seed)
    return {"jpg": encode(face, "JPEG"), "png": encode(face, "PNG"), "webp": encode(face, "WEBP")}


def base_tar(images: dict[str, bytes]) -> bytes:
    members = []
    for n, kind in enumerate(IMAGE_KINDS):
        members += [(f"s{n}.{kind}", images[kind]), (f"s{n}.json", json.dumps({"identity": f"p{n}"}).encode())]
    return tar_bytes(members)


def base_parquet(images: dict[str, bytes]) -> bytes:
    keys = [f"k{n}" for n in range(4)]
    data = [images["jpg"], images["png"], images["webp"], images["jpg"]]
    return parquet_bytes(pa.table({"key": keys, "jpg": pa.array(data, pa.binary())}), row_group_size=2)


@functools.cache
def bases() -> dict[str, bytes]:
    images = base_images()
    return {**images, "tar": base_tar(images), "parquet": base_parquet(images)}


# ---------------------------------------------------------------- mutations

def flip(rng: random.Random, data: bytes, **_) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes, **_) -> bytes:
    return data[:rng.randrange(len(data))]


def insert(rng: random.Random, data: bytes, **_) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def _tar_headers(data: bytes) -> list[int]:
    """Offsets of the blocks of `data` that are valid tar headers (checksum ok)."""
    out = []
    for at in range(0, len(data) - 511, 512):
        head = data[at:at + 512]
        stored = head[148:156].split(b"\0", 1)[0].strip()
        if head.strip(b"\0") and stored.isdigit() and int(stored, 8) == sum(head[:148] + b" " * 8 + head[156:]):
            out.append(at)
    return out


def _tar_checksum(head: bytearray) -> None:
    head[148:156] = b" " * 8
    head[148:156] = f"{sum(head):06o}".encode() + b"\0 "


def swap_header(rng: random.Random, data: bytes, kind: str, others: dict[str, bytes]) -> bytes:
    if kind == "tar":
        heads = _tar_headers(data)
        if len(heads) >= 2:
            a, b = sorted(rng.sample(heads, 2))
            return data[:a] + data[b:b + 512] + data[a + 512:b] + data[a:a + 512] + data[b + 512:]
        return flip(rng, data)
    if kind == "parquet":  # another Parquet file's footer (its metadata and length) on these row groups
        other = parquet_bytes(pa.table({"key": ["x"] * 9, "jpg": pa.array([b"\0" * rng.randint(1, 999)] * 9)}),
                              row_group_size=rng.randint(1, 9))
        cut = rng.randint(8, min(len(data), len(other)) - 4)
        return data[:-cut] + other[-cut:]
    donor = others[rng.choice([k for k in IMAGE_KINDS if k != kind])]
    n = rng.randint(4, 64)
    return donor[:n] + data[n:]


def extreme_field(rng: random.Random, data: bytes, kind: str, **_) -> bytes:
    """A size field set to an extreme value, its checksum fixed so the parser believes it."""
    big = rng.choice([0, 1, 2**14 - 1, 2**16 - 1, 2**31 - 1, rng.randint(1, 2**31 - 1)])
    small = rng.choice([0, 1, 2, rng.randint(1, 2**16 - 1)])
    out = bytearray(data)
    if kind == "png" and out[12:16] == b"IHDR":
        out[16:24] = struct.pack(">II", big, small) if rng.random() < 0.5 else struct.pack(">II", small, big)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return bytes(out)
    if kind == "jpg":
        at = data.find(b"\xff\xc0")
        if at > 0:
            out[at + 5:at + 9] = struct.pack(">HH", min(big, 2**16 - 1), min(small, 2**16 - 1))
            return bytes(out)
    if kind == "webp" and out[12:16] == b"VP8 ":
        out[26:30] = struct.pack("<HH", big & 0x3FFF, small & 0x3FFF)
        return bytes(out)
    if kind == "tar":
        heads = _tar_headers(data)
        if heads:
            at = rng.choice(heads)
            head = bytearray(out[at:at + 512])
            head[124:136] = rng.choice([f"{big:011o}".encode()[-11:] + b"\0", b"9" * 11 + b"\0", b"\xff" * 12,
                                        b"\x80" + bytes(3) + struct.pack(">Q", 2**62), b"zz\0" + bytes(9)])
            _tar_checksum(head)
            out[at:at + 512] = head
            return bytes(out)
    if kind == "parquet":  # the footer length says more than the file holds
        out[-8:-4] = struct.pack("<I", big)
        return bytes(out)
    return insert(rng, data)


MUTATIONS = {"flip": flip, "truncate": truncate, "insert": insert, "swap_header": swap_header,
             "extreme_field": extreme_field}


def corpus(kind: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` mutated inputs of one kind: (case name, bytes), each mutation in turn; the same seed, the same cases."""
    base = bases()
    rng = random.Random(f"{seed}-{kind}")
    names = list(MUTATIONS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        data = MUTATIONS[name](rng, base[kind], kind=kind, others=base)
        out.append((f"{kind}-{i:04d}-{name}", data))
    return out


# ---------------------------------------------------------------- the read and decode code, per case

@dataclass
class Outcome:
    case: str
    rows: list[dict]        # uri, status, error
    peak_bytes: int         # how far the process's resident size rose during the case
    seconds: float


def job_config(tmp: str, fmt: str):
    extra = ["input.keep_columns=[identity]"] if fmt == "webdataset" else []
    return load_config([], [f"input.uri={tmp}", f"output.uri={tmp}/out", f"input.format={fmt}",
                            f"input.shard_buffer_mb={SHARD_BUFFER_MB}", *OVERRIDES, *extra])


def _decoded(rows: list[dict], data: list[bytes], image_cfg: ImageConfig) -> None:
    """The model actor's decode of every row that passed the read checks: an error for the row, never a raise."""
    for row, blob in zip(rows, data, strict=True):
        if row["status"] == "ok":
            dec = imaging.decode(blob, image_cfg)
            if dec.error is not None:
                row["status"], row["error"] = "error", dec.error
            else:
                assert dec.image.shape == (image_cfg.crop_size,) * 2 + (3,)


def read_file_case(path: str, cfg) -> list[dict]:
    """A files input: the read task (cafi/stages/read.py read_objects), then the decode."""
    from cafi.stages.read import read_objects

    batch = read_objects({"uri": np.array([path], dtype=object)}, cfg)
    rows = [{"uri": u, "status": s, "error": e} for u, s, e in zip(batch["uri"], batch["status"], batch["error"],
                                                                    strict=True)]
    _decoded(rows, list(batch["data"]), cfg.image)
    return rows


def read_shard_case(path: str, cfg, check_index: bool = True) -> list[dict]:
    """A shard: the shard task (cafi/inputs/shards.py read_shard: reader, index), then the decode; the rows
    must be the ones its index lists (`check_index`)."""
    from cafi import keys as K
    from cafi.inputs import index
    from cafi.inputs.shards import enumeration, kept_schema, read_shard

    kept = kept_schema(cfg, [])
    rows, data = [], []
    for batch in read_shard(cfg, path, "fuzz", K.EMPTY, kept, "fuzz"):
        for u, s, e, d in zip(batch["uri"], batch["status"], batch["error"], batch["data"], strict=True):
            rows.append({"uri": str(u), "status": s, "error": e})
            data.append(d)
    written = os.path.join(index.index_dir(cfg.output.uri, "fuzz"),
                           index.file_name(path, "fuzz", enumeration(cfg.input)))
    with open(written, "rb") as fh:
        table, _ = index.parse(fh.read())
    listed, read = sorted(index.uris(table, path)), sorted(r["uri"] for r in rows)
    if check_index and listed != read:
        diff = sorted(set(listed) ^ set(read))[:3]
        raise AssertionError(f"{path}: the index lists {len(listed)} uris ({len(set(listed))} distinct), the rows "
                             f"are {len(read)}; first differences {diff}")
    _decoded(rows, data, cfg.image)
    return rows


def run_case(kind: str, case: str, blob: bytes, tmp: str, cfgs: dict) -> Outcome:
    """Write the case to a file under `tmp` and read it as its input kind would be, measuring memory."""
    suffix = {"tar": ".tar", "parquet": ".parquet"}.get(kind, "." + kind)
    path = os.path.join(tmp, case + suffix)
    with open(path, "wb") as fh:
        fh.write(blob)
    t = time.perf_counter()
    with PeakRSS() as memory:
        if kind in IMAGE_KINDS:
            rows = read_file_case(path, cfgs["files"])
        else:
            rows = read_shard_case(path, cfgs["webdataset" if kind == "tar" else "parquet"])
    return Outcome(case, rows, memory.bytes, time.perf_counter() - t)


def check(outcome: Outcome, kind: str, path_prefix: str) -> None:
    """One row per input: a file, exactly its own row; a shard, rows with distinct uris of its samples (and
    its own row when it breaks); every status ok (scorable) or error with a reason; memory within bounds."""
    rows = outcome.rows
    assert rows, f"{outcome.case}: no row"
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), f"{outcome.case}: a uri twice"
    if kind in IMAGE_KINDS:
        assert len(rows) == 1 and uris[0].startswith(path_prefix), outcome.case
    else:
        assert all(u.startswith(path_prefix) for u in uris), outcome.case
    for r in rows:
        assert r["status"] in ("ok", "no_face", "error"), (outcome.case, r)
        if r["status"] == "error":
            assert isinstance(r["error"], str) and r["error"].strip(), (outcome.case, r)
    assert outcome.peak_bytes < CASE_BYTES, f"{outcome.case}: the resident size rose {outcome.peak_bytes} bytes"


def warm_up(tmp: str, cfgs: dict) -> None:
    """The unmutated inputs once (imports, first decodes: what the first case would otherwise count)."""
    for kind, blob in bases().items():
        run_case(kind, f"base-{kind}", blob, tmp, cfgs)


def configs(tmp: str) -> dict:
    return {"files": job_config(tmp, "files"), "webdataset": job_config(tmp, "webdataset"),
            "parquet": job_config(tmp, "parquet")}
