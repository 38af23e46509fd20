"""Inputs that kill their model worker: retried in isolation, then an error row instead of a loop.

A model actor that dies mid-batch (killed for memory by Ray's monitor or the kernel, or a crash in a
native decoder) is restarted and its batch given to it again (cafi/ray_setup.py: unlimited restarts,
which node loss needs). An input that kills its worker every time would loop forever. So each batch is
registered with the run's ledger, in the telemetry actor, which outlives the model workers:

- an attempt that finishes leaves nothing behind (one round trip per batch);
- a batch given again after a death runs alone in its actor and marks each step before taking it:
  each input's host decode in turn (a trial decode), then the batch's decode, then its models;
- the step in progress when a worker dies is blamed; an input blamed `ray.max_worker_deaths` times
  becomes an error row, and a batch step blamed that often makes the batch's remaining rows error
  rows. The other inputs of the batch are scored as usual.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from contextlib import contextmanager

import numpy as np

from cafi import imaging
from cafi.decision import ERROR, OK

DECODE, MODELS = "decode", "models"


class Ledger:
    """The run's record of batches in progress (held by the telemetry actor)."""

    def __init__(self):
        self.attempts: Counter = Counter()
        self.current: dict[str, str] = {}
        self.blamed: dict[str, Counter] = {}

    def begin(self, key: str) -> dict:
        """An attempt of a batch starts: how many started before, and the steps blamed for deaths."""
        earlier = self.attempts[key]
        self.attempts[key] += 1
        step = self.current.pop(key, None)
        if step is not None:  # the previous attempt died during this step
            self.blamed.setdefault(key, Counter())[step] += 1
        return {"earlier": earlier, "blamed": dict(self.blamed.get(key, {}))}

    def mark(self, key: str, step: str) -> None:
        self.current[key] = step

    def done(self, key: str) -> None:
        self.attempts.pop(key, None)
        self.current.pop(key, None)
        self.blamed.pop(key, None)


def batch_key(batch: dict) -> str:
    return hashlib.blake2b("\n".join(str(u) for u in batch["uri"]).encode(), digest_size=16).hexdigest()


class _Turns:
    """First attempts share the actor; a batch given again after a death runs alone, so a death
    then blames only its own step."""

    def __init__(self):
        self.cond = threading.Condition()
        self.sharing, self.alone = 0, False

    @contextmanager
    def shared(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.alone)
            self.sharing += 1
        try:
            yield
        finally:
            with self.cond:
                self.sharing -= 1
                self.cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.alone and self.sharing == 0)
            self.alone = True
        try:
            yield
        finally:
            with self.cond:
                self.alone = False
                self.cond.notify_all()


class Attempt:
    """One call's attempt at a batch (see the module docstring)."""

    def __init__(self, watch: DeathWatch, batch: dict):
        self.watch, self.key = watch, batch_key(batch)
        state = watch.telemetry.batch_begin(self.key)
        self.retried = state["earlier"] > 0
        self.blamed: dict = state["blamed"]

    def mark(self, step: str) -> None:
        if self.retried:
            self.watch.telemetry.batch_mark(self.key, step)

    def gave_up(self, step: str) -> bool:
        return self.blamed.get(step, 0) >= self.watch.limit

    def error(self, times: int, what: str) -> str:
        return (f"the model worker died {'once' if times == 1 else f'{times} times'} while {what} (killed for "
                f"memory, or a crash in a native "
                f"decoder); not tried again (ray.max_worker_deaths={self.watch.limit})")

    def fail_rows(self, batch: dict, rows, what: str, step: str) -> None:
        for i in rows:
            if batch["status"][i] == OK:
                batch["status"][i], batch["error"][i] = ERROR, self.error(self.blamed[step], what)
                if "data" in batch:
                    batch["data"][i] = b""

    def before_decode(self, batch: dict) -> None:
        """A retried batch: inputs blamed too often become error rows; the others are decoded one at a
        time, each marked first, so the next death names its input."""
        if not self.retried or "data" not in batch:
            return
        batch["data"] = np.array(batch["data"], dtype=object)  # writable: blamed inputs drop their bytes
        for i in range(len(batch["uri"])):
            step = f"row:{i}"
            if self.gave_up(step):
                self.fail_rows(batch, [i], "decoding this input", step)
            elif batch["status"][i] == OK and len(batch["data"][i]):
                self.mark(step)
                imaging.decode(batch["data"][i], self.watch.image_cfg)
        if self.gave_up(DECODE):
            self.fail_rows(batch, range(len(batch["uri"])), "decoding this batch", DECODE)
        self.mark(DECODE)

    def before_models(self, batch: dict) -> None:
        if self.gave_up(MODELS):
            self.fail_rows(batch, range(len(batch["uri"])), "scoring this batch", MODELS)
        self.mark(MODELS)

    def done(self) -> None:
        self.watch.telemetry.batch_done(self.key)


class DeathWatch:
    """A model actor's side of the ledger: `with watch.attempt(batch) as attempt:` around each call."""

    def __init__(self, telemetry, limit: int, image_cfg):
        self.telemetry, self.limit, self.image_cfg = telemetry, limit, image_cfg
        self.turns = _Turns()

    @contextmanager
    def attempt(self, batch: dict):
        attempt = Attempt(self, batch)
        with (self.turns.exclusive() if attempt.retried else self.turns.shared()):
            yield attempt
        attempt.done()
