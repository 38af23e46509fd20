"""The bytes of a few samples without reading their shards: what the report's thumbnails and
`cafi export` need.

A tar sample is one ranged GET of its image member (`shard_offset`, `shard_size` from the
manifest); samples close together in one shard share a GET (ranges less than `MERGE_GAP` apart are
fetched as one, up to `MAX_SPAN` bytes), so exporting most of a shard costs a few GETs, not one per
sample. A Parquet sample is read with its row group's image column (the file's footer, then that
column chunk). A plain object (files input) is fetched whole; a shard's own error row has no image
(its uri is the whole shard, which is never downloaded for it).

No read exceeds `max_bytes` (the run's `image.max_bytes`), whatever the manifest or the object
says: a whole object is one ranged GET of at most `max_bytes + 1` bytes (a longer one is refused);
a tar member whose recorded size is over `max_bytes` is not read (its row may be a "file too large"
error row that still records the member's size); a Parquet row group's image column chunk is read
only when its sizes in the file's footer (compressed and uncompressed) are at most
`max_chunk_bytes` (default `max(MAX_SPAN, 4 * max_bytes)`: 256 MiB with the default limit), and a
cell over `max_bytes` is refused. Each refusal is that sample's `TooLarge`, naming the limit.
`skip_reason` names why a sample could not be read (`cafi export` counts them).
"""

from __future__ import annotations

import math
from collections import defaultdict

from cafi import fetch
from cafi.config import StorageConfig
from cafi.fetch import Backoff, is_final, with_retries
from cafi.inputs.uris import split_sample_uri
from cafi.storage import filesystem, refused_scheme

MERGE_GAP = 1 * 2**20
SHARD_NAMES = (".tar", ".parquet")
MAX_SPAN = 64 * 2**20


class TooLarge(ValueError):
    """A sample over a read limit: not read (or not kept)."""


class WholeShard(ValueError):
    """A shard's own (error) row: it names the shard, not one image."""


class NotAllowed(ValueError):
    """A URI of a scheme the run's input could not name (input.schemes): never read."""


SKIP_REASONS = ("shard_row", "not_found", "too_large", "no_image", "not_allowed", "unreadable")


def skip_reason(exc: BaseException) -> str:
    """Why a sample could not be read, as one of SKIP_REASONS: a shard's own error row, an object
    (or shard) that vanished, a sample over a read limit, a shard sample without image bytes, or any
    other failure of the read (storage, a shard changed since the run)."""
    if isinstance(exc, WholeShard):
        return "shard_row"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, TooLarge):
        return "too_large"
    if isinstance(exc, LookupError):
        return "no_image"
    if isinstance(exc, NotAllowed):
        return "not_allowed"
    return "unreadable"


def chunk_limit(max_bytes: int) -> int:
    """The default largest Parquet image column chunk read for a sample (its footer's sizes)."""
    return max(MAX_SPAN, 4 * max_bytes)


def _too_large(what: str, size: int, max_bytes: int) -> TooLarge:
    return TooLarge(f"{what} of {size} bytes is over image.max_bytes={max_bytes}: not read")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_samples(uris: list[str], shard_offsets: list, shard_sizes: list, storage: StorageConfig | None,
                 image_column: str = "jpg", *, max_bytes: int, max_chunk_bytes: int | None = None,
                 input_format: str | None = None, schemes: tuple[str, ...] | None = None
                 ) -> list[bytes | Exception]:
    """Each sample's encoded bytes, or the exception that prevented reading them.

    `shard_offsets` / `shard_sizes` are the manifest columns (null for files inputs). `image_column`
    is the Parquet image column the run read (`config.input.image_column` in its summary).
    `max_bytes`: the run's `image.max_bytes`, held on every read (see the module's docstring);
    `max_chunk_bytes`: the largest Parquet image column chunk read (default `chunk_limit(max_bytes)`).
    `input_format`: the run's `input.format` when known. A shard input's row without an offset is a
    sample without an image (no image member, a null cell): a LookupError, never fetched as an object
    named `<shard>#<key>`; a files input's uris are whole objects, a '#' in them included.
    `schemes`: the URI schemes the run's input could name (cafi.runs.sample_reads): any other uri (an
    error row of the run, `file:///etc/...` in an S3 manifest) is a NotAllowed, never read.
    """
    shards = input_format in ("webdataset", "parquet")
    chunk = max_chunk_bytes if max_chunk_bytes is not None else chunk_limit(max_bytes)
    storage = storage if storage is not None else StorageConfig()
    out: list[bytes | Exception] = [b""] * len(uris)
    whole, tar_parts, parquet_parts = [], defaultdict(list), defaultdict(list)
    for i, (uri, offset, size) in enumerate(zip(uris, shard_offsets, shard_sizes, strict=True)):
        split = split_sample_uri(uri) if not _missing(offset) and input_format != "files" else None
        why = refused_scheme(split[0] if split else uri, schemes) if schemes is not None else None
        if why is not None:
            out[i] = NotAllowed(f"{uri}: {why}")
        elif split is None and shards and split_sample_uri(uri) is not None:
            out[i] = LookupError(f"{uri}: the sample has no image bytes (its row says why)")
        elif split is None and uri.lower().endswith(SHARD_NAMES):  # a shard's own (error) row: no image to show
            out[i] = WholeShard(f"{uri} is a whole shard (its row says why it could not be read), not one image")
        elif split is None:
            whole.append(i)
        elif not _missing(size) and int(size) > max_bytes:  # never fetched: the manifest's size is enough
            out[i] = _too_large(f"{uri}: the tar member", int(size), max_bytes)
        elif not _missing(size):
            tar_parts[split[0]].append((int(offset), int(size), i))
        else:
            parquet_parts[split[0]].append((int(offset), i))
    fetched = fetch.read_bytes([uris[i] for i in whole], storage, max_bytes=max_bytes)
    for i, got in zip(whole, fetched, strict=True):
        too_long = not isinstance(got, Exception) and len(got) > max_bytes  # the GET stops one byte past it
        out[i] = TooLarge(f"{uris[i]}: more than image.max_bytes={max_bytes} bytes: not read") if too_long else got
    for shard, parts in tar_parts.items():
        _tar_members(shard, parts, storage, out)
    for shard, parts in parquet_parts.items():
        _parquet_rows(shard, parts, storage, image_column, out, max_bytes, chunk)
    return out


def spans(parts: list[tuple[int, int, int]], gap: int = MERGE_GAP, limit: int = MAX_SPAN
          ) -> list[tuple[int, int, list]]:
    """(start, end, parts) byte ranges to GET: members sorted by offset, neighbours merged."""
    merged: list[tuple[int, int, list]] = []
    for offset, size, i in sorted(parts):
        if merged and offset - merged[-1][1] <= gap and offset + size - merged[-1][0] <= limit:
            start, end, members = merged[-1]
            merged[-1] = (start, max(end, offset + size), [*members, (offset, size, i)])
        else:
            merged.append((offset, offset + size, [(offset, size, i)]))
    return merged


def fetch_ranges(fs, path: str, ranges: list[tuple[int, int]], budget_s: float) -> list[bytes | Exception]:
    """Byte ranges of one object, fetched concurrently; failed ones again within the retry budget."""
    got: list[bytes | Exception] = [b""] * len(ranges)
    pending = list(range(len(ranges)))
    backoff = Backoff(budget_s)
    while pending:
        try:
            answers = fs.cat_ranges([path] * len(pending), [ranges[i][0] for i in pending],
                                    [ranges[i][1] for i in pending], on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole call failed: every range gets the reason
            answers = [exc] * len(pending)
        for i, answer in zip(pending, answers, strict=True):
            got[i] = answer
        pending = [i for i in pending if isinstance(got[i], Exception) and not is_final(got[i])]
        if pending and not backoff.wait():
            break
    return got


def _tar_members(shard: str, parts: list, storage: StorageConfig, out: list) -> None:
    fs, path = filesystem(shard, storage)
    ranges = spans(parts)
    got = fetch_ranges(fs, path, [(r[0], r[1]) for r in ranges], storage.retry_budget_s)
    for (start, end, members), data in zip(ranges, got, strict=True):
        for offset, size, i in members:
            if isinstance(data, Exception):
                out[i] = data
            elif len(data) < end - start:
                out[i] = EOFError(f"{shard}: the shard ends before byte {offset + size} (changed since the run?)")
            else:
                out[i] = data[offset - start:offset - start + size]


def chunk_size(row_group, image_column: str) -> int:
    """The larger of the compressed and uncompressed sizes (from the footer) of a row group's image
    column chunk(s): a struct column (Hugging Face `Image`) is the sum of its leaves."""
    total_c = total_u = 0
    for j in range(row_group.num_columns):
        col = row_group.column(j)
        path = col.path_in_schema
        if path == image_column or path.startswith(image_column + "."):
            total_c += col.total_compressed_size
            total_u += col.total_uncompressed_size
    return max(total_c, total_u)


def _parquet_rows(shard: str, parts: list, storage: StorageConfig, image_column: str, out: list,
                  max_bytes: int, max_chunk_bytes: int) -> None:
    import pyarrow.parquet as pq

    from cafi.inputs.parquet import image_values

    fs, path = filesystem(shard, storage)

    def read() -> dict[int, bytes | None]:
        with fs.open(path, "rb", cache_type="none") as fh:
            pf = pq.ParquetFile(fh)
            starts, row = [], 0
            for g in range(pf.num_row_groups):
                starts.append(row)
                row += pf.metadata.row_group(g).num_rows
            wanted: dict[int, list[int]] = defaultdict(list)
            for index, _ in parts:
                group = max(g for g, s in enumerate(starts) if s <= index) if starts else 0
                wanted[group].append(index)
            values: dict[int, bytes | Exception | None] = {}
            for group, rows in wanted.items():
                size = chunk_size(pf.metadata.row_group(group), image_column)
                if size > max_chunk_bytes:  # refused from the footer: the chunk is never fetched
                    refused = TooLarge(f"{shard}: row group {group}'s image column chunk of {size} bytes is over "
                                       f"the {max_chunk_bytes}-byte limit of one read (image.max_bytes="
                                       f"{max_bytes}): not read")
                    values.update(dict.fromkeys(rows, refused))
                    continue
                column = image_values(pf.read_row_group(group, columns=[image_column]).column(image_column),
                                      image_column)
                for index in rows:
                    values[index] = column[index - starts[group]] if index - starts[group] < len(column) else None
            return values

    try:
        values = with_retries(read, storage.retry_budget_s)
    except Exception as exc:  # noqa: BLE001 - every sample of the file gets the reason
        for _, i in parts:
            out[i] = exc
        return
    for index, i in parts:
        value = values.get(index)
        if value is None:
            value = LookupError(f"{shard}: row {index} has no image bytes")
        elif not isinstance(value, Exception) and len(value) > max_bytes:
            value = _too_large(f"{shard}: row {index}'s image", len(value), max_bytes)
        out[i] = value
