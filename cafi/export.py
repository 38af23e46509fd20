"""`cafi export`: a committed run's curated rows as new shards -- the training set.

  <to>/000000.tar, 000001.tar, ...   (or .parquet)   the samples, sorted by uri, N per shard
  <to>/export.json                                    what was exported: run, filter, shards, samples, bytes,
                                                      and the samples skipped, per reason
  <to>/_SUCCESS                                       written last: the export is complete

Each sample's original bytes, untouched (read by ranged GETs of tar members, row-group reads of
Parquet shards, one GET per file input), with its manifest row: scores, decision, kept columns --
as `<key>.json` beside `<key>.<ext>` (WebDataset) or as columns beside `key` and `jpg` (Parquet).
Keys are the sample's position among the selected rows sorted by uri, zero-padded (`000000042`);
`source_uri` names where it came from.

The export writes what it can: a selected row whose bytes cannot be read -- a shard's own error row
(it names a whole shard, not an image), an object or shard that vanished since the run, a sample over
the run's `image.max_bytes` (never read: cafi/inputs/samples.py), a shard sample without image bytes
(no image member, a null Parquet cell),
a read that failed past the storage retry budget -- is left out (its key is not used) and counted
per reason (`skipped` in export.json, cafi.inputs.samples.SKIP_REASONS), never an aborted export.

The same run gives the same shard contents, byte for byte, and the shards are themselves valid
input (`input.format: webdataset | parquet` with the default keys and columns).

Shards are written under their final names by Ray tasks, one shard each. A crashed export leaves
no `_SUCCESS`; running it again rewrites the same names with the same bytes and removes shards left
over from an earlier, larger export into the same prefix. A prefix holding anything else is refused.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import math
import os
import posixpath
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cafi import manifest, runs
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.fetch import write_bytes
from cafi.inputs.samples import read_samples, skip_reason
from cafi.inputs.tar import TarWriter
from cafi.redact import redact_text, redact_uri
from cafi.storage import filesystem, join

log = logging.getLogger("cafi")

FORMATS = ("webdataset", "parquet")
DECISIONS = ("accepted", "rejected", "all")
SUMMARY, SUCCESS, STARTED = "export.json", "_SUCCESS", "_STARTED"
_SHARD_NAME = re.compile(r"^\d{6,}\.(tar|parquet)$")
KEY_DIGITS = 9
IMAGE_COLUMN = "jpg"  # the image column of exported Parquet: input.image_column's default
ROW_GROUP = 256
# Manifest columns not exported: the embedding (1 KiB a row) stays in the manifest; the source's shard
# offsets describe the source's layout, not the export's (`source_uri` names the source).
SKIP = ("embedding", "shard_offset", "shard_size")


def image_suffix(data: bytes, uri: str = "") -> str:
    """The member suffix for encoded bytes, from their magic numbers (the name's otherwise)."""
    magic = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
             (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
    for head, suffix in magic:
        if data.startswith(head):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    ext = os.path.splitext(uri)[1].lstrip(".").lower() if "#" not in uri else ""
    return ext or "bin"


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return None
    return value


def sample_doc(row: dict, key: str) -> dict:
    """A sample's .json: its manifest row (scores, decision, kept columns), its key and source."""
    doc = {k: _json_value(v) for k, v in row.items() if k not in ("uri", *SKIP)}
    doc.update({"key": key, "source_uri": row["uri"]})
    return doc


def _shard_bytes(rows: pa.Table, data: list[bytes], keys: list[str], fmt: str, mtime: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webdataset":
        tw = TarWriter(buf, mtime=mtime)
        for row, blob, key in zip(rows.to_pylist(), data, keys, strict=True):
            tw.add(f"{key}.{image_suffix(blob, row['uri'])}", blob)
            tw.add(f"{key}.json", json.dumps(sample_doc(row, key), sort_keys=True, ensure_ascii=False).encode())
        tw.close()
    else:
        table = rows.drop_columns([c for c in SKIP if c in rows.column_names])
        table = table.rename_columns(["source_uri" if c == "uri" else c for c in table.column_names])
        table = table.add_column(0, "key", pa.array(keys, pa.string())).add_column(
            1, IMAGE_COLUMN, pa.array(data, pa.binary()))
        pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


def write_shard(rows: pa.Table, number: int, first: int, to: str, fmt: str, mtime: int, storage: StorageConfig,
                image_storage: StorageConfig, reads: dict) -> dict:
    """One output shard (a Ray task): read its samples' bytes (none over `max_bytes`), write the ones read;
    its name, samples, bytes, and the samples skipped per reason (a shard with none read is written empty)."""
    data = read_samples(rows.column("uri").to_pylist(), rows.column("shard_offset").to_pylist(),
                        rows.column("shard_size").to_pylist(), image_storage, **reads)
    rows = rows.drop_columns([c for c in SKIP if c in rows.column_names])
    readable = [i for i, d in enumerate(data) if not isinstance(d, Exception)]
    skipped: dict[str, int] = {}
    example = None
    for uri, got in zip(rows.column("uri").to_pylist(), data, strict=True):
        if isinstance(got, Exception):
            reason = skip_reason(got)
            skipped[reason] = skipped.get(reason, 0) + 1
            example = example or (uri, got)
    if example is not None:  # one line per shard, not per sample
        uri, exc = example
        text = redact_text(str(exc).splitlines()[0]) if str(exc) else ""
        log.warning("export: shard %06d: %d sample(s) skipped %s; first: %s: %s: %s", number, sum(skipped.values()),
                    skipped, redact_uri(uri), type(exc).__name__, text)
    keys = [f"{first + i:0{KEY_DIGITS}d}" for i in readable]
    blob = _shard_bytes(rows.take(pa.array(readable, pa.int64())), [data[i] for i in readable], keys, fmt, mtime)
    name = f"{number:06d}.{'tar' if fmt == 'webdataset' else 'parquet'}"
    fs, path = filesystem(join(to, name), storage)
    write_bytes(fs, path, blob, storage.retry_budget_s)
    return {"name": name, "samples": len(readable), "bytes": len(blob), "skipped": dict(sorted(skipped.items()))}


def select(ref: runs.RunRef, storage: StorageConfig | None, decision: str) -> pa.Table:
    """The run's rows to export, sorted by uri (one per uri)."""
    version = ref.summary.get("model_version")
    table = manifest.read(ref.output, version=version, storage=storage, run_ids=runs.run_ids(ref))
    table = table.drop_columns(["embedding"])
    clash = {"key", "source_uri", IMAGE_COLUMN} & set(table.column_names)
    if clash:
        raise CafiError(f"export: the run keeps a column named {sorted(clash)[0]!r}, which the export itself writes")
    if decision != "all":
        table = table.filter(pc.equal(table["decision"], decision))
    return table.sort_by("uri")


def _prepare(to: str, storage: StorageConfig) -> list[str]:
    """Check the destination; returns the shard files already there (of an earlier export)."""
    fs, root = filesystem(to, storage)
    names = [posixpath.basename(p) for p in fs.find(root)] if fs.exists(root) else []
    ours = set(names) & {SUMMARY, SUCCESS, STARTED}
    foreign = [n for n in names if n not in ours and not _SHARD_NAME.match(n)]
    if foreign or (names and not ours):
        raise CafiError(f"export: --to {redact_uri(to)} holds other files ({(foreign or names)[0]}, ...); export "
                        "into an empty prefix or an earlier export's")
    if SUCCESS in ours:  # an earlier export is being replaced: it is not complete until this one commits
        fs.rm(posixpath.join(root, SUCCESS))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(root, exist_ok=True)
    write_bytes(fs, posixpath.join(root, STARTED), b"", storage.retry_budget_s)
    return [n for n in names if _SHARD_NAME.match(n)]


def follow_curation(rows: pa.Table, ref: runs.RunRef, uri: str, storage: StorageConfig | None
                    ) -> tuple[pa.Table, dict]:
    """Only the rows a `cafi identities` curation of this run keeps; and how many each reason removed
    (of the rows the decision selected; `not_curated`: rows the curation does not list)."""
    from cafi.identities.command import read_curation

    summary, samples = read_curation(uri, storage)
    if summary.get("run_id") != ref.run_id or summary.get("model_version") != ref.summary.get("model_version"):
        raise CafiError(f"export: --curation {redact_uri(uri)} curates run {summary.get('run_id')} (model version "
                        f"{summary.get('model_version')}), not run {ref.run_id} ({ref.summary.get('model_version')})")
    pos = pc.index_in(rows["uri"], value_set=samples["uri"])
    reason = samples["reason"].take(pos)
    keep = pc.fill_null(samples["keep"].take(pos), False)
    removed = {r: 0 for r in summary.get("reasons_order") or []}
    for item in pc.value_counts(pc.fill_null(reason, "not_curated").filter(pc.invert(keep))).to_pylist():
        removed[item["values"]] = item["counts"]
    return rows.filter(keep), {"uri": redact_uri(uri), "kept": int(pc.sum(keep).as_py() or 0), "removed": removed}


def export(run_uri: str, to: str, decision: str = "accepted", fmt: str = "webdataset", samples_per_shard: int = 1000,
           storage: StorageConfig | None = None, image_storage: StorageConfig | None = None,
           curation: str | None = None) -> dict:
    """Export a committed run's rows (`decision`: accepted | rejected | all) as shards under `to`;
    with `curation` (a `cafi identities` output of this run) only the rows it keeps. Returns the
    export summary (also written to `<to>/export.json`)."""
    import ray

    if fmt not in FORMATS:
        raise CafiError(f"export: --format {fmt!r} is not one of {FORMATS}")
    if decision not in DECISIONS:
        raise CafiError(f"export: --decision {decision!r} is not one of {DECISIONS}")
    if samples_per_shard < 1:
        raise CafiError(f"export: --samples-per-shard must be >= 1, not {samples_per_shard}")
    storage = storage if storage is not None else StorageConfig()
    started = _dt.datetime.now(_dt.timezone.utc)
    ref = runs.resolve_run(run_uri, storage)
    image_storage = image_storage if image_storage is not None else runs.storage_config(ref.summary)
    reads = runs.sample_reads(ref.summary)  # the run's image column, read limit and schemes hold here too
    rows = select(ref, storage, decision)
    curated = None
    if curation is not None:
        rows, curated = follow_curation(rows, ref, curation, storage)
    leftovers = _prepare(to, storage)
    finished = ref.summary.get("finished_at")
    mtime = int(_dt.datetime.fromisoformat(finished).timestamp()) if finished else 0
    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    task = ray.remote(num_cpus=0.5, max_retries=3)(write_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))  # shards in flight: bounded memory
    pending, shards = [], []
    starts = list(range(0, rows.num_rows, samples_per_shard))
    for number, first in enumerate(starts):
        if len(pending) >= window:
            shards.append(ray.get(pending.pop(0)))
        part = rows.take(pa.array(range(first, min(first + samples_per_shard, rows.num_rows))))  # a copy: a
        # slice would carry the whole table's buffers to every task
        pending.append(task.remote(part, number, first, to, fmt, mtime, storage, image_storage, reads))
    shards += ray.get(pending)
    fs, root = filesystem(to, storage)
    for name in sorted(set(leftovers) - {s["name"] for s in shards}):
        fs.rm(posixpath.join(root, name))
    skipped: dict[str, int] = {}
    for s in shards:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    summary = {
        "source_run": redact_uri(ref.uri), "run_id": ref.run_id, "model_version": ref.summary.get("model_version"),
        "decision": decision, **({"curation": curated} if curated is not None else {}),
        "format": fmt, "samples_per_shard": samples_per_shard, "selected": rows.num_rows,
        "samples": sum(s["samples"] for s in shards), "skipped": dict(sorted(skipped.items())),
        "bytes": sum(s["bytes"] for s in shards), "shards": shards,
        "columns": ["key", "source_uri", *(c for c in rows.column_names if c not in ("uri", *SKIP))],
        "started_at": started.isoformat(), "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    manifest.write_json(join(to, SUMMARY), summary, storage)
    write_bytes(fs, posixpath.join(root, SUCCESS), b"", storage.retry_budget_s)
    fs.rm(posixpath.join(root, STARTED))
    return summary


def is_complete(to: str, storage: StorageConfig | None = None) -> bool:
    fs, root = filesystem(to, storage)
    return fs.exists(posixpath.join(root, SUCCESS))

