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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cafi import manifest
from cafi.config import InputConfig, JobConfig, from_dict, to_dict
from cafi.decision import ERROR, OK
from cafi.errors import CafiError, ConfigError, StorageError
from cafi.fetch import read_error
from cafi.inputs import index, keep, parquet, webdataset
from cafi.inputs.rows import Rows, Sample
from cafi.inputs.stream import BlockStream
from cafi.inputs.uris import SHARD_SUFFIXES
from cafi.storage import filesystem, unstrip
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


def _manifest_uris(cfg: JobConfig) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    inp = cfg.input
    fs, path = manifest.arrow_filesystem(inp.manifest, cfg.storage)
    try:
        if path.lower().endswith(".csv"):
            with fs.open_input_stream(path) as fh:
                table = pacsv.read_csv(fh, convert_options=pacsv.ConvertOptions(
                    column_types={inp.uri_column: pa.string()}))
        else:
            table = pq.read_table(path, filesystem=fs)
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise StorageError(f"input.manifest: cannot read {inp.manifest}: {exc}") from None
    if inp.uri_column not in table.column_names:
        raise StorageError(f"input.uri_column: {inp.uri_column!r} is not a column of {inp.manifest} "
                           f"(columns: {table.column_names})")
    return [u for u in table.column(inp.uri_column).to_pylist() if u]


def list_shards(cfg: JobConfig) -> tuple[list[Shard], int]:
    """The shards to read, each once, in listing (or manifest) order; and how many were listed."""
    inp = cfg.input
    if inp.manifest:
        shards = [Shard(u, None) for u in _manifest_uris(cfg)]
    else:
        fs, root = filesystem(inp.uri, cfg.storage)
        if not fs.exists(root):
            raise StorageError(f"input.uri: {inp.uri} does not exist or cannot be listed")
        found = fs.find(root, detail=True)
        suffixes = SHARD_SUFFIXES[inp.format]
        shards = [Shard(unstrip(fs, p, inp.uri), index.stamp_of(info)) for p, info in sorted(found.items())
                  if p.lower().endswith(suffixes)]
    listed = len(shards)
    unique = list({s.uri: s for s in reversed(shards)}.values())[::-1]  # first of each uri, in order
    if inp.limit:
        unique = unique[: inp.limit]
    return unique, listed


def kept_schema(cfg: JobConfig, shards: list[Shard]) -> pa.Schema:
    """The kept columns and the Arrow types the manifest stores them with."""
    names = list(cfg.input.keep_columns)
    if not names or cfg.input.format == "webdataset":
        return keep.string_schema(names)
    import pyarrow.parquet as pq

    for shard in shards[:5]:  # the first readable shard's types; the others are cast to them
        fs, path = manifest.arrow_filesystem(shard.uri, cfg.storage)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - a bad shard gets its error row when it is read
            log.warning("input.keep_columns: cannot read the schema of %s: %s", shard.uri, exc)
            continue
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise ConfigError(f"input.keep_columns: {missing[0]!r} is not a column of {shard.uri} "
                              f"(columns: {', '.join(schema.names)})")
        return pa.schema([pa.field(n, _plain(schema.field(n).type)) for n in names])
    return keep.string_schema(names)


def _plain(typ: pa.DataType) -> pa.DataType:
    return typ.value_type if pa.types.is_dictionary(typ) else typ


def _head(fs, path: str) -> str | None:
    try:
        return index.stamp_of(fs.info(path))
    except Exception:  # noqa: BLE001 - an unreadable shard: its read gives the reason
        return None


@dataclass
class ShardInputs:
    """The shards of one run, what is known of them before reading, and their keys at commit."""

    cfg: JobConfig
    run_id: str
    shards: list[Shard] = field(init=False)
    listed: int = field(init=False)
    kept: pa.Schema = field(init=False)

    def __post_init__(self):
        self.shards, self.listed = list_shards(self.cfg)
        self.kept = kept_schema(self.cfg, self.shards)
        self.enumeration = enumeration(self.cfg.input)
        self.to_read: list[Shard] = list(self.shards)
        self.unknown = len(self.shards)
        self.skipped_keys = np.array([], dtype="S16")
        self.stats: dict = {}

    @property
    def out(self) -> str:
        return self.cfg.output.uri

    def plan(self, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys known before reading (from earlier indexes) and those of them still to score; decides
        which shards to read: those not known, and known ones with samples still to score."""
        storage = self.cfg.storage
        prior = index.listing(self.out, storage)
        hashes = {name.split("-", 1)[0] for name in prior}
        fs = filesystem(self.shards[0].uri, storage)[0] if self.shards else None
        ask = [s for s in self.shards if s.stamp is None and index.shard_hash(s.uri) in hashes]
        if ask:  # shards named by a manifest: their state, for the indexes that may describe it
            with ThreadPoolExecutor(32) as pool:
                for s, stamp in zip(ask, pool.map(lambda s: _head(fs, filesystem(s.uri, storage)[1]), ask),
                                    strict=True):
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
        self.unknown = sum(s.uri not in keys for s in self.shards)
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
        self.skipped_keys = np.concatenate(skipped) if skipped else np.array([], dtype="S16")
        known_keys = np.unique(np.concatenate(list(keys.values()))) if keys else np.array([], dtype="S16")
        todo_keys = np.unique(np.concatenate(todo)) if todo else np.array([], dtype="S16")
        log.info("shards: %d listed, %d known from earlier indexes, %d to read (%d skipped: every sample written)",
                 len(self.shards), len(keys), len(to_read), len(skipped))
        return known_keys, todo_keys

    def dataset(self, done_ref, **ray_args):
        """The read rows of the shards to read (lazy): one task per shard."""
        import ray.data

        tables = [pa.table({"shard": pa.array([s.uri], pa.string()), "stamp": pa.array([s.stamp], pa.string())})
                  for s in self.to_read]
        ds = ray.data.from_arrow(tables)
        # one block of the shard, plus what a worker process holds anyway (Python, pyarrow: ~250 MiB)
        memory = (self.cfg.input.shard_buffer_mb + WORKER_MB) * 2**20
        return ds.map_batches(read_shards, batch_size=1, num_cpus=self.cfg.read.num_cpus, memory=memory,
                              fn_kwargs={"cfg": to_dict(self.cfg), "run_id": self.run_id, "done": [done_ref],
                                         "kept": self.kept}, **ray_args)

    def input_keys(self) -> np.ndarray:
        """Every input key of the run: of the shards skipped (earlier indexes) and of those read (this run's
        indexes). A shard read without an index means its task did not finish: nothing is committed."""
        storage = self.cfg.storage
        fs, folder = filesystem(index.index_dir(self.out, self.run_id), storage)
        fs.invalidate_cache()  # the listing of runs/ made while planning is out of date now
        written = {posixpath.basename(p).split("-", 1)[0]: p for p in (fs.find(folder) if fs.exists(folder) else [])}
        missing = [s.uri for s in self.to_read if index.shard_hash(s.uri) not in written]
        if missing:
            raise CafiError(f"run {self.run_id}: {len(missing)} shard(s) were not read to the end (no index; first: "
                            f"{missing[0]}); not committed")
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
        return np.unique(np.concatenate(parts)) if parts else np.array([], dtype="S16")

    def describe(self) -> dict:
        return {"shards": len(self.shards), "duplicate_shards": self.listed - len(self.shards) if not
                self.cfg.input.limit else None, "shards_read": len(self.to_read),
                "shards_skipped": len(self.shards) - len(self.to_read), **self.stats}


def input_summary(cfg: JobConfig, kept: pa.Schema, shards: ShardInputs | None = None) -> dict:
    """The run summary's `input` section: the format, the kept columns' types, shard counts."""
    out: dict = {"format": cfg.input.format,
                 "keep_columns": {f.name: str(f.type) for f in kept},
                 "keep_schema": keep.schema_to_text(kept) if len(kept) else None}
    if shards is not None:
        out.update(shards.describe())
    return out


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


def _written(done: np.ndarray, uri: str) -> bool:
    if len(done) == 0:
        return False
    k = manifest.uri_keys([uri])[0]
    pos = min(int(np.searchsorted(done, k)), len(done) - 1)
    return bool(done[pos] == k)


def read_shards(batch: dict, cfg: dict, run_id: str, done: list, kept: pa.Schema) -> Iterator[dict]:
    """Ray Data generator UDF: shard uris in, read rows out (cafi/inputs/rows.py), a few at a time."""
    conf = from_dict(cfg)
    written = _done(done[0])
    for shard, stamp in zip(batch["shard"], batch["stamp"], strict=True):
        yield from read_shard(conf, str(shard), None if stamp is None else str(stamp), written, kept, run_id)


def shard_samples(conf: JobConfig, shard: str, kept: pa.Schema, counts: dict) -> tuple[Iterator[Sample], BlockStream]:
    """The samples of one shard, streamed; and the stream (its GET and byte counts)."""
    inp, storage = conf.input, conf.storage
    fs, path = filesystem(shard, storage)

    def retried(_exc):
        counts["read_retries"] = counts.get("read_retries", 0) + 1

    stream = BlockStream(fs, path, inp.shard_buffer_mb * 2**20, storage.retry_budget_s, on_retry=retried)
    if inp.format == "webdataset":
        source = webdataset.samples(stream, shard, conf.image, inp.image_extensions, list(kept.names))
    else:
        source = _parquet_samples(stream, fs, path, conf, shard, kept)
    return _guarded(source, stream, shard), stream


def _parquet_samples(stream: BlockStream, fs, path: str, conf: JobConfig, shard: str, kept: pa.Schema):
    inp = conf.input
    data = stream.whole()
    if data is None:  # bigger than one block: pyarrow reads the footer and row groups by ranged GETs
        source = fs.open(path, "rb", block_size=inp.shard_buffer_mb * 2**20, cache_type="readahead")
    else:
        source = data
    yield from parquet.samples(source, shard, conf.image, inp.image_column, inp.key_column, kept)


def _guarded(source: Iterator[Sample], stream: BlockStream, shard: str) -> Iterator[Sample]:
    """A shard that cannot be read (any more) ends with a row of its own, never with an exception."""
    try:
        yield from source
    except Exception as exc:  # noqa: BLE001 - storage gave up (after its retry budget) or the bytes are bad
        where = f" (at byte {stream.pos}; samples from there on are missing)" if stream.pos else ""
        yield Sample(shard, None, error=read_error(exc) + where)


def read_shard(conf: JobConfig, shard: str, stamp: str | None, written: np.ndarray, kept: pa.Schema,
               run_id: str | None) -> Iterator[dict]:
    """One shard: its rows still to score, in blocks of `read.batch_size`; then its index."""
    counts: dict = {}
    if stamp is None:
        stamp = _head(*filesystem(shard, conf.storage))
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
        if _written(written, sample.uri):
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


# ---------------------------------------------------------------- the read step of build()

def settle(batch: dict, cfg: dict | None = None, run_id: str | None = None) -> dict:
    """The read step for rows a shard task already read: where every result of a row comes from an
    earlier version (cafi/reuse.py), take its read outcome over and drop its bytes, as the files
    input's read task does without reading."""
    if "prev_needs_pixels" not in batch:
        return batch
    reuse = ~batch["prev_needs_pixels"].astype(bool)
    if not reuse.any():
        return batch
    batch["width"] = np.where(reuse, batch["prev_width"], batch["width"]).astype(np.int32)
    batch["height"] = np.where(reuse, batch["prev_height"], batch["height"]).astype(np.int32)
    was_error = reuse & (batch["prev_status"] == ERROR)
    status, error, data = batch["status"].copy(), batch["error"].copy(), batch["data"].copy()
    status[reuse] = np.where(was_error[reuse], ERROR, OK)
    error[reuse] = np.where(was_error[reuse], batch["prev_error"][reuse], "")
    data[reuse] = b""
    batch["status"], batch["error"], batch["data"] = status, error, data
    return batch
