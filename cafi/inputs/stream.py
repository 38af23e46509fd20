"""A shard as a forward-only byte stream fetched in blocks: one ranged GET per `block` bytes.

A shard up to one block costs one GET (the first request asks for a whole block; a smaller object
comes back whole). A bigger one costs one GET per block, and memory stays about one block, whatever
the shard's size. No HEAD is needed: a short answer is the end of the object. Each later request
starts one byte before the next needed byte, so it never starts past the end (an object store
answers a range that starts at the end with an error, not with zero bytes).

Every GET is retried within `storage.retry_budget_s` (cafi/fetch.py), so throttling delays a shard
instead of cutting it short.
"""

from __future__ import annotations

from cafi.fetch import is_empty_range, with_retries


class BlockStream:
    """`read(n)` / `skip(n)` over one object; `pos` is the absolute offset of the next byte."""

    def __init__(self, fs, path: str, block: int, budget_s: float, on_retry=None):
        self.fs, self.path, self.block, self.budget_s, self.on_retry = fs, path, max(2, block), budget_s, on_retry
        self.buf = b""        # the current block's bytes not yet consumed start at self.at
        self.at = 0
        self.pos = 0          # absolute offset of buf[at]
        self.eof = False
        self.gets = 0
        self.bytes = 0

    def _get(self, start: int, end: int) -> bytes:
        def call() -> bytes:
            try:
                return self.fs.cat_file(self.path, start=start, end=end)
            except OSError as exc:
                if start == 0 and is_empty_range(exc):
                    return b""  # an empty object
                raise

        self.gets += 1
        data = with_retries(call, self.budget_s, on_retry=self.on_retry)
        self.bytes += len(data)
        return data

    def _fill(self) -> None:
        """The next block, after everything fetched so far."""
        fetched_to = self.pos + len(self.buf) - self.at
        if fetched_to == 0:
            data = self._get(0, self.block)
            fresh = data
        else:
            data = self._get(fetched_to - 1, fetched_to - 1 + self.block)
            fresh = data[1:]
        self.eof = len(data) < self.block
        self.buf, self.at = self.buf[self.at:] + fresh, 0

    def _available(self) -> int:
        return len(self.buf) - self.at

    def _spans(self, n: int):
        """Consume up to n bytes, refilling the buffer as needed: yields (start, length) in `buf`."""
        while n > 0:
            if self._available() == 0:
                if self.eof:
                    return
                self.buf, self.at = b"", 0
                self._fill()
                continue
            take = min(n, self._available())
            start = self.at
            self.at += take
            self.pos += take
            n -= take
            yield start, take

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the object."""
        parts = [self.buf[start:start + take] for start, take in self._spans(n)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int) -> int:
        """Pass n bytes without keeping them; returns how many there were."""
        return sum(take for _, take in self._spans(n))

    def whole(self) -> bytes | None:
        """The whole object when it fits in the first block (one GET), else None (then only that
        block was fetched)."""
        data = self.read(self.block)
        return data if self.eof and self._available() == 0 else None
