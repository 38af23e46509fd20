"""Shard inputs in the job: planning on the driver, the read task on the workers, the keys at commit.

The dataset is the list of shards (a prefix listing of `.tar` / `.parquet` objects, or
`input.manifest`). One Ray Data task per shard streams it (`read_shards`: one GET per
`input.shard_buffer_mb`) and yields the read rows of its samples in small blocks, leaving out
samples already written for this model version (resume); at the end it writes the shard's index
(cafi/inputs/index.py). Nothing of a shard reaches the driver: the driver holds the shard list and
16-byte keys (per sample, as for files).

Before the run, shards with an index of their current state (from any earlier run) are known: their
keys count at once, and a shard whose every sample is already written is not read at all. After the
run, the indexes of the shards read give every other key: the exactly-once check and the summary
counts use them as they use the listed URIs of a files input.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cafi import keys as K
from cafi.config import InputConfig, JobConfig
from cafi.errors import CafiError, StorageError
from cafi.fetch import read_error
from cafi.inputs import index, keep, listing, parquet, webdataset
from cafi.inputs.rows import Rows, Sample
from cafi.inputs.source import describe
from cafi.inputs.stream import BlockStream
from cafi.inputs.uris import SHARD_SUFFIXES
from cafi.redact import redact_uri
from cafi.stages.read import settle
from cafi.storage import allowed_schemes, filesystem, refused_scheme, unstrip
from cafi.telemetry import Telemetry

log = logging.getLogger("cafi")

WORKER_MB = 256


@dataclass
class Shard:
    uri: str
    stamp: str | None  # size and ETag/mtime when listed; None for shards named by a manifest (HEAD later)


def enumeration(inp: InputConfig) -> str:
    """What decides a shard's sample keys besides its bytes (an index is valid only for the same)."""
    if inp.format == "parquet":
        return f"parquet/1/{inp.key_column}/{inp.image_column}"
    return "webdataset/1"


def list_shards(cfg: JobConfig) -> tuple[list[Shard], int]:
    """The shards to read, each once, in listing (or manifest) order; and how many were listed."""
    inp = cfg.input
    if inp.manifest:
        shards = [Shard(u, None) for u in listing.manifest_uris(cfg)]
    else:
        fs, root = filesystem(inp.uri, cfg.storage)
        if not fs.exists(root):
            raise StorageError(f"input.uri: {redact_uri(inp.uri)} does not exist or cannot be listed")
        found = fs.find(root, detail=True)
        suffixes = SHARD_SUFFIXES[inp.format]
        shards = [Shard(unstrip(fs, p, inp.uri), index.stamp_of(info)) for p, info in sorted(found.items())
                  if p.lower().endswith(suffixes)]
    listed = len(shards)
    unique = list({s.uri: s for s in reversed(shards)}.values())[::-1]  # first of each uri, in order
    if inp.limit:
        unique = unique[: inp.limit]
    return unique, listed


def _head(uri: str, storage, allowed: tuple[str, ...]) -> str | None:
    """A shard's current state (size and ETag/mtime); None when it cannot be asked (its read says why)."""
    if refused_scheme(uri, allowed) is not None:
        return None
    try:
        fs, path = filesystem(uri, storage)
        return index.stamp_of(fs.info(path))
    except Exception:  # noqa: BLE001 - an unreadable shard: its read gives the reason
        return None


def kept_schema(cfg: JobConfig, shards: list[Shard]) -> pa.Schema:
    """The kept columns and the Arrow types the manifest stores them with (.json fields: strings)."""
    if not cfg.input.keep_columns or cfg.input.format == "webdataset":
        return keep.string_schema(list(cfg.input.keep_columns))
    return listing.parquet_kept_schema(cfg, [s.uri for s in shards], "input.uri")


class ShardSource:
    """input.format webdataset | parquet (cafi/inputs/source.py's interface): the shards of one run, what is
    known of them before reading, and their keys at commit."""

    read_step = staticmethod(settle)

    def __init__(self, cfg: JobConfig, run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.shards, self.shards_listed = list_shards(cfg)
        self.kept = kept_schema(cfg, self.shards)
        self.enumeration = enumeration(cfg.input)
        self.to_read: list[Shard] = list(self.shards)
        self.unread = len(self.shards)
        self.skipped_keys = K.EMPTY
        self.keys = self.todo = K.EMPTY
        self.listed = 0
        self.stats: dict = {}

    @property
    def out(self) -> str:
        return self.cfg.output.uri

    def plan(self, done: np.ndarray) -> None:
        """Keys known before reading (from earlier indexes) and those of them still to score; decides
        which shards to read: those not known, and known ones with samples still to score."""
        storage = self.cfg.storage
        prior = index.listing(self.out, storage)
        hashes = {name.split("-", 1)[0] for name in prior}
        ask = [s for s in self.shards if s.stamp is None and index.shard_hash(s.uri) in hashes]
        allowed = allowed_schemes(self.cfg.input)
        if ask:  # shards named by a manifest: their state, for the indexes that may describe it
            with ThreadPoolExecutor(32) as pool:
                for s, stamp in zip(ask, pool.map(lambda s: _head(s.uri, storage, allowed), ask), strict=True):
                    s.stamp = stamp
        known: dict[str, Shard] = {}
        for s in self.shards:
            name = index.file_name(s.uri, s.stamp, self.enumeration)
            if s.stamp is not None and name in prior:
                known[prior[name][-1]] = s
        keys: dict[str, np.ndarray] = {}
        out_fs = filesystem(self.out, storage)[0]
        for path, data in index.read_many(list(known), out_fs):
            if isinstance(data, Exception):
                continue
            try:
                table, _ = index.parse(data)
            except Exception:  # noqa: BLE001 - a torn index: the shard is read again
                continue
            keys[known[path].uri] = index.keys_of(table, known[path].uri)
        self.unread = sum(s.uri not in keys for s in self.shards)
        to_read, skipped, todo = [], [], []
        for s in self.shards:
            k = keys.get(s.uri)
            if k is None:
                to_read.append(s)
                continue
            left = np.setdiff1d(k, done)
            if len(left):
                to_read.append(s)
                todo.append(left)
            else:
                skipped.append(k)
        self.to_read = to_read
        self.skipped_keys = np.concatenate(skipped) if skipped else K.EMPTY
        self.keys = np.unique(np.concatenate(list(keys.values()))) if keys else K.EMPTY
        self.todo = np.unique(np.concatenate(todo)) if todo else K.EMPTY
        self.listed = len(self.keys)
        log.info("shards: %d listed, %d known from earlier indexes, %d to read (%d skipped: every sample written)",
                 len(self.shards), len(keys), len(to_read), len(skipped))

    def dataset(self, done: np.ndarray, todo_ref, models_run: bool):
        """The read rows of the shards to read (lazy): one task per shard."""
        import ray
        import ray.data

        tables = [pa.table({"shard": pa.array([s.uri], pa.string()), "stamp": pa.array([s.stamp], pa.string())})
                  for s in self.to_read]
        ds = ray.data.from_arrow(tables)
        # one block of the shard, plus what a worker process holds anyway (Python, pyarrow: ~250 MiB)
        memory = (self.cfg.input.shard_buffer_mb + WORKER_MB) * 2**20
        return ds.map_batches(read_shards, batch_size=1, num_cpus=self.cfg.read.num_cpus, memory=memory,
                              fn_kwargs={"cfg": self.cfg, "run_id": self.run_id, "done": [ray.put(done)],
                                         "kept": self.kept})

    def commit_keys(self) -> np.ndarray:
        """Every input key of the run: of the shards skipped (earlier indexes) and of those read (this run's
        indexes). A shard read without an index means its task did not finish: nothing is committed."""
        storage = self.cfg.storage
        fs, folder = filesystem(index.index_dir(self.out, self.run_id), storage)
        fs.invalidate_cache()  # the listing of runs/ made while planning is out of date now
        written = {posixpath.basename(p).split("-", 1)[0]: p for p in (fs.find(folder) if fs.exists(folder) else [])}
        missing = [s.uri for s in self.to_read if index.shard_hash(s.uri) not in written]
        if missing:
            raise CafiError(f"run {self.run_id}: {len(missing)} shard(s) were not read to the end (no index; first: "
                            f"{redact_uri(missing[0])}); not committed")
        parts = [self.skipped_keys]
        stats = {"to_score": 0, "gets": 0, "bytes": 0, "shard_errors": 0, "bad_json": 0, "samples": 0}
        paths = [written[index.shard_hash(s.uri)] for s in self.to_read]
        for path, data in index.read_many(paths, fs):
            if isinstance(data, Exception):
                raise StorageError(f"cannot read the shard index {path}: {data}")
            table, meta = index.parse(data)
            parts.append(index.keys_of(table, meta["shard"]))
            for k in stats:
                stats[k] += int(meta.get(k) or 0)
        self.stats = stats
        self.keys = np.unique(np.concatenate(parts)) if parts else K.EMPTY
        self.listed = len(self.keys)
        return self.keys

    @property
    def scored_now(self) -> int:
        return self.stats.get("to_score", 0)

    def summary(self) -> dict:
        return {**describe(self.cfg, self.kept), "shards": len(self.shards),
                "duplicate_shards": self.shards_listed - len(self.shards) if not self.cfg.input.limit else None,
                "shards_read": len(self.to_read), "shards_skipped": len(self.shards) - len(self.to_read),
                **self.stats}


# ---------------------------------------------------------------- the read task (workers)

_DONE: dict = {}


def _done(ref) -> np.ndarray:
    """The keys already written, fetched once per worker process (zero-copy numpy)."""
    import ray

    key = ref.hex()
    if key not in _DONE:
        _DONE.clear()
        _DONE[key] = ray.get(ref)
    return _DONE[key]


def read_shards(batch: dict, cfg: JobConfig, run_id: str, done: list, kept: pa.Schema) -> Iterator[dict]:
    """Ray Data generator UDF: shard uris in, read rows out (cafi/inputs/rows.py), a few at a time."""
    conf = cfg
    written = _done(done[0])
    for shard, stamp in zip(batch["shard"], batch["stamp"], strict=True):
        yield from read_shard(conf, str(shard), None if stamp is None else str(stamp), written, kept, run_id)


def shard_samples(conf: JobConfig, shard: str, kept: pa.Schema, counts: dict) -> tuple[Iterator[Sample], BlockStream]:
    """The samples of one shard, streamed; and the stream (its GET and byte counts)."""
    inp, storage = conf.input, conf.storage
    why = refused_scheme(shard, allowed_schemes(inp))
    try:
        fs, path = filesystem(shard, storage) if why is None else (None, "")
    except Exception as exc:  # noqa: BLE001 - an unknown or uninstalled scheme: the shard's own row
        why = read_error(exc)
    if why is not None:
        return iter([Sample(shard, None, error=why)]), _NOT_READ

    def retried(_exc):
        counts["read_retries"] = counts.get("read_retries", 0) + 1

    stream = BlockStream(fs, path, inp.shard_buffer_mb * 2**20, storage.retry_budget_s, on_retry=retried)
    if inp.format == "webdataset":
        source = webdataset.samples(stream, shard, conf.image, inp.image_extensions, list(kept.names))
    else:
        source = _parquet_samples(stream, fs, path, conf, shard, kept)
    return _guarded(source, stream, shard), stream


class _NotRead:
    """The stream of a shard that is not read (its scheme is refused or unknown): no GET, no byte."""

    gets = bytes = pos = 0


_NOT_READ = _NotRead()


def _parquet_samples(stream: BlockStream, fs, path: str, conf: JobConfig, shard: str, kept: pa.Schema):
    inp = conf.input
    data = stream.whole()
    if data is None:  # bigger than one block: pyarrow reads the footer and row groups by ranged GETs
        source = fs.open(path, "rb", block_size=inp.shard_buffer_mb * 2**20, cache_type="readahead")
    else:
        source = data
    yield from parquet.samples(source, shard, conf.image, inp.image_column, inp.key_column, kept,
                               max_group_bytes=inp.shard_buffer_mb * 2**20 // 2)


def _guarded(source: Iterator[Sample], stream: BlockStream, shard: str) -> Iterator[Sample]:
    """A shard that cannot be read (any more) ends with a row of its own, never with an exception.

    Faults of the shard's bytes (a corrupt tar header, a .json that cannot be parsed, a broken Parquet
    file) are rows of the readers themselves; what reaches here is storage giving up after its retry
    budget: "cannot read object", tried again by a later run."""
    read = 0
    try:
        for sample in source:
            read += sample.key is not None
            yield sample
    except Exception as exc:  # noqa: BLE001 - storage gave up (after its retry budget)
        where = (f" (at byte {stream.pos}, {read} sample{'' if read == 1 else 's'} read before it; samples from "
                 "there on are missing)") if stream.pos else ""
        yield Sample(shard, None, error=read_error(exc) + where)


def read_shard(conf: JobConfig, shard: str, stamp: str | None, written: np.ndarray, kept: pa.Schema,
               run_id: str | None) -> Iterator[dict]:
    """One shard: its rows still to score, in blocks of `read.batch_size`; then its index."""
    counts: dict = {}
    if stamp is None:
        stamp = _head(shard, conf.storage, allowed_schemes(conf.input))
    samples, stream = shard_samples(conf, shard, kept, counts)
    rows = Rows(list(kept.names), with_size=conf.input.format == "webdataset")
    entries = index.IndexWriter()
    n = {"to_score": 0, "already_written": 0, "errors": 0, "bad_json": 0, "shard_errors": 0}
    shard_error = None
    for sample in samples:
        entries.add(sample)
        n["errors"] += sample.error is not None
        n["bad_json"] += sample.bad_json
        if sample.key is None:
            n["shard_errors"] += 1
            shard_error = sample.error
        if len(written) and K.contains(written, K.uri_keys([sample.uri]))[0]:
            n["already_written"] += 1
            continue
        rows.add(sample)
        n["to_score"] += 1
        if len(rows) >= conf.read.batch_size:
            yield rows.take()
    if len(rows):
        yield rows.take()
    if shard_error:
        log.warning("shard %s: %s", shard, shard_error)
    meta = {"shard": shard, "stamp": stamp, "enumeration": enumeration(conf.input), "run_id": run_id,
            "samples": len(entries), "gets": stream.gets, "bytes": stream.bytes, "shard_error": shard_error, **n}
    entries.write(posixpath.join(index.index_dir(conf.output.uri, run_id or "none"),
                                 index.file_name(shard, stamp, enumeration(conf.input))), meta, conf.storage)
    Telemetry.of(run_id).add(counts)


