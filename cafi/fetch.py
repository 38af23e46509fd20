"""Object reads and writes under throttling: a time budget per object, exponential backoff with jitter.

Object stores answer bursts with 503 SlowDown and drop connections under load; the clients
(botocore, s3fs) retry a few times within seconds, which a throttling storm of tens of seconds
outlasts. Here a failed read is tried again until the object's budget (`storage.retry_budget_s`)
is spent, so a storm delays the run instead of turning readable objects into error rows; writes
get the same budget and, past it, fail the run before anything is committed. Errors that
retrying cannot fix (not found, access denied) are final at once.
"""

from __future__ import annotations

import io
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from cafi.config import StorageConfig
from cafi.redact import redact_text
from cafi.storage import filesystem, protocol_of

FIRST_WAIT_S = 0.2
MAX_WAIT_S = 8.0


def is_final(exc: BaseException) -> bool:
    """Errors that the same request will meet again: the object is absent, or we may not read it."""
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


@dataclass
class Backoff:
    """Full-jitter exponential backoff within a time budget measured from the first attempt."""

    budget_s: float
    started: float = 0.0
    attempt: int = 0

    def __post_init__(self):
        self.started = time.monotonic()

    def wait(self) -> bool:
        """Sleep before the next attempt; False when the budget would be overrun (stop trying)."""
        delay = random.uniform(0, min(MAX_WAIT_S, FIRST_WAIT_S * 2**self.attempt))
        if time.monotonic() + delay - self.started > self.budget_s:
            return False
        self.attempt += 1
        time.sleep(delay)
        return True


def with_retries(call: Callable[[], object], budget_s: float, on_retry: Callable[[BaseException], None] | None = None):
    """`call()` until it succeeds, fails finally, or the budget is spent (then its last error is raised)."""
    backoff = Backoff(budget_s)
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_final(exc) or not backoff.wait():
                raise
            if on_retry is not None:
                on_retry(exc)


def is_empty_range(exc: BaseException) -> bool:
    """An object store's answer to a byte range of an empty object (HTTP 416): the object is empty."""
    text = str(exc).lower()
    return (getattr(exc, "errno", None) == 22 and "range" in text) or "invalidrange" in text


def read_bytes(uris: list[str], storage: StorageConfig | None, counts: dict | None = None,
               max_bytes: int | None = None) -> list[bytes | Exception]:
    """Fetch objects concurrently per filesystem; a failure becomes that item's exception.

    One ranged GET per object (no HEAD first), of at most `max_bytes + 1` bytes when given: an
    oversized file costs no more than that to refuse. Items that fail with a retryable error are
    fetched again, together, after a jittered backoff, until each one's budget
    (`storage.retry_budget_s`) is spent. `counts["read_retries"]` is incremented by the number of
    objects fetched again.
    """
    storage = storage if storage is not None else StorageConfig()
    by_proto: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(uris):
        by_proto[protocol_of(uri)].append(i)
    out: list[bytes | Exception] = [b""] * len(uris)
    for idx in by_proto.values():
        try:
            fs, _ = filesystem(uris[idx[0]], storage, client_retries=False)  # the retrying is done here
            pending = {filesystem(uris[i], storage, client_retries=False)[1]: i for i in idx}
        except Exception as exc:  # noqa: BLE001 - an unknown or uninstalled scheme: each item's error
            for i in idx:
                out[i] = exc
            continue
        backoff = Backoff(storage.retry_budget_s)  # the batch's objects started together: one clock
        end = None if max_bytes is None else max_bytes + 1
        while pending:
            paths = list(pending)
            got = _fetch(fs, paths, end)
            retry = {}
            for p, result in zip(paths, got, strict=True):
                i = pending[p]
                out[i] = b"" if isinstance(result, Exception) and is_empty_range(result) else result
                if isinstance(out[i], Exception) and not is_final(out[i]):
                    retry[p] = i
            if not retry or not backoff.wait():
                break
            if counts is not None:
                counts["read_retries"] = counts.get("read_retries", 0) + len(retry)
            pending = retry
    return out


# Servers that may answer a ranged GET with the whole body (HTTP 200 without Content-Range): read as a
# stream and stop at the limit, so `image.max_bytes` holds whatever the server does.
STREAMED = ("http", "https")
STREAM_CHUNK = 1 << 20


def _fetch(fs, paths: list[str], end: int | None) -> list[bytes | Exception]:
    """The first `end` bytes of each path (all of it when None), or the exception each one raised."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if end is not None and set(protocols) & set(STREAMED):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(paths))) as pool:
            return list(pool.map(lambda p: _capped(fs, p, end), paths))
    try:
        return fs.cat_ranges(paths, [0] * len(paths), [end] * len(paths), on_error="return")
    except Exception as exc:  # noqa: BLE001 - the whole call failed: every item gets the reason
        return [exc] * len(paths)


def _capped(fs, path: str, end: int) -> bytes | Exception:
    """At most `end` bytes of a streamed body: never more than one chunk past the limit in memory."""
    try:
        parts, size = [], 0
        with fs.open(path, "rb", block_size=0) as fh:  # block_size=0: a plain streamed GET, no Range, no HEAD
            while size < end:
                chunk = fh.read(min(STREAM_CHUNK, end - size))
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
        return b"".join(parts)
    except Exception as exc:  # noqa: BLE001 - this item's error
        return exc


def read_error(exc: Exception) -> str:
    """The error text of a row whose object could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "cannot read object: not found (vanished or never existed)"
    first = redact_text(str(exc).splitlines()[0]) if str(exc) else ""  # a URL in it loses userinfo and query
    return f"cannot read object: {type(exc).__name__}: {first}".rstrip(": ")


# ---------------------------------------------------------------- writes

class _Upload(io.BytesIO):
    """An output stream that uploads its whole content in one request when closed."""

    def __init__(self, upload: Callable[[bytes], None]):
        super().__init__()
        self._upload = upload

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._upload(data)


class RetryingWrites(pafs.FSSpecHandler):
    """A pyarrow filesystem handler over fsspec whose writes survive throttling storms.

    Every file is buffered and uploaded whole when closed (manifest files are a few MB), so a
    failed upload can be sent again; uploads, directory creation and the listings Ray's writer
    makes are retried within `budget_s`. Past it, a StorageError names the object: the run
    fails and commits nothing.
    """

    def __init__(self, fs, budget_s: float, run_id: str | None = None):
        super().__init__(fs)
        self.budget_s, self.run_id = budget_s, run_id

    def __eq__(self, other):
        return isinstance(other, RetryingWrites) and self.fs == other.fs and self.budget_s == other.budget_s

    def _retry(self, what: str, call: Callable[[], object]):
        from cafi.errors import StorageError
        from cafi.telemetry import Telemetry

        def count(_exc):
            Telemetry.of(self.run_id).add({"write_retries": 1})

        try:
            return with_retries(call, self.budget_s, on_retry=count)
        except Exception as exc:  # noqa: BLE001 - one clear error naming the object
            if is_final(exc):
                raise
            first = redact_text(str(exc).splitlines()[0]) if str(exc) else ""
            raise StorageError(f"cannot write {redact_text(what)} within storage.retry_budget_s={self.budget_s:g} s: "
                               f"{type(exc).__name__}: {first}") from None

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(_Upload(lambda data: self._retry(path, lambda: self.fs.pipe_file(path, data))), mode="w")

    def create_dir(self, path, recursive):
        return self._retry(path, lambda: super(RetryingWrites, self).create_dir(path, recursive))

    def get_file_info(self, paths):
        return self._retry(", ".join(paths[:3]), lambda: super(RetryingWrites, self).get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry(selector.base_dir, lambda: super(RetryingWrites, self).get_file_info_selector(selector))


def write_bytes(fs, path: str, data: bytes, budget_s: float) -> None:
    """One object, written whole, retried within the budget (commit records, summaries)."""
    RetryingWrites(fs, budget_s)._retry(path, lambda: fs.pipe_file(path, data))
