"""Run telemetry that Ray Data's own stats do not give: retries of throttled reads and writes,
and each model actor's busy time (how much of the run it spent in its models, and when).

One small actor per run (no CPU reserved, on the driver's node) collects counters and busy
intervals; tasks and model actors add to it without waiting for an answer. It is best effort:
if it cannot be reached the run goes on and the summary says what is missing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter

log = logging.getLogger("cafi")

NAMESPACE = "cafi"
LEDGER_TIMEOUT_S = 30.0  # a ledger call that takes longer: the collector is gone (its node with it)


def actor_name(run_id: str) -> str:
    return f"cafi-telemetry-{run_id}"


class _Collector:
    def __init__(self):
        from cafi.stages.deaths import Ledger

        self.counts: Counter = Counter()
        self.busy: dict[str, list[tuple[float, float, int]]] = {}
        self.ledger = Ledger()  # batches in progress in the model actors (cafi/stages/deaths.py)

    def batch_begin(self, key: str) -> dict:
        return self.ledger.begin(key)

    def batch_mark(self, key: str, step: str) -> None:
        self.ledger.mark(key, step)

    def batch_done(self, key: str) -> None:
        self.ledger.done(key)

    def add(self, counts: dict) -> None:
        self.counts.update({k: v for k, v in counts.items() if v})

    def busy_interval(self, actor: str, start: float, end: float, rows: int) -> None:
        self.busy.setdefault(actor, []).append((start, end, rows))

    def snapshot(self) -> dict:
        return {"counts": dict(self.counts), "busy": self.busy}


def start(run_id: str):
    """The run's collector actor, pinned to this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(num_cpus=0, max_restarts=0)(_Collector)
    node = ray.get_runtime_context().get_node_id()
    return cls.options(name=actor_name(run_id), namespace=NAMESPACE, lifetime=None,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()


def collect(handle) -> dict:
    """What the run's collector holds; {} when it cannot be reached."""
    import ray

    try:
        return ray.get(handle.snapshot.remote(), timeout=30)
    except Exception as exc:  # noqa: BLE001 - telemetry never fails a run
        log.warning("run telemetry could not be collected: %s", exc)
        return {}


class Telemetry:
    """A process's handle on its run's collector (looked up once, by name)."""

    _cache: dict[str, Telemetry] = {}
    _lock = threading.Lock()

    def __init__(self, run_id: str | None):
        self.run_id, self.handle, self.tried = run_id, None, False

    @classmethod
    def of(cls, run_id: str | None) -> Telemetry:
        key = run_id or ""
        with cls._lock:
            if key not in cls._cache:
                cls._cache[key] = cls(run_id)
            return cls._cache[key]

    def _actor(self):
        if self.handle is None and not self.tried and self.run_id:
            self.tried = True
            try:
                import ray

                self.handle = ray.get_actor(actor_name(self.run_id), namespace=NAMESPACE)
            except Exception:  # noqa: BLE001 - no collector (a unit test, a bench calling a stage directly)
                self.handle = None
        return self.handle

    def add(self, counts: dict) -> None:
        """Waits until the collector has the counts: sent and not awaited, a task's last counts could
        reach it after the driver's snapshot (a CI run summed 0 write retries for a storm it retried).
        Only a block or write with something to count (retries) pays the round trip."""
        if any(counts.values()) and self._actor() is not None:
            self._wait_for("add", counts)

    def _wait_for(self, method: str, *args):
        """Call the collector and wait for its answer (at most LEDGER_TIMEOUT_S). Telemetry never fails a
        run: what kept the answer from arriving is returned, not raised."""
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=LEDGER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost or slow collector, whatever Ray raises for it
            return exc

    # The ledger of batches in progress (cafi/stages/deaths.py). Begin and mark wait for the collector:
    # a worker that dies right after must have told it. Best effort like the rest: without a collector
    # (none, or lost with its node) every attempt counts as a first one and the run goes on.
    def batch_begin(self, key: str) -> dict:
        first = {"earlier": 0, "blamed": {}}
        if self._actor() is None:
            return first
        state = self._wait_for("batch_begin", key)
        if isinstance(state, Exception):
            log.warning("the run's ledger of batches cannot be reached (%s): attempts are not counted", state)
            return first
        return state

    def batch_mark(self, key: str, step: str) -> None:
        if self._actor() is not None:
            self._wait_for("batch_mark", key, step)

    def batch_done(self, key: str) -> None:
        if self._actor() is not None:
            self.handle.batch_done.remote(key)

    def busy(self, start: float, end: float, rows: int, replica: int | None = None) -> None:
        """A model section of this process (of one of its CPU replicas: `pid/replica`)."""
        if self._actor() is not None:
            name = f"{os.getpid()}" if replica is None else f"{os.getpid()}/{replica}"
            self.handle.busy_interval.remote(name, start, end, rows)


def busy_summary(busy: dict[str, list[tuple[float, float, int]]]) -> dict:
    """Per model actor (per replica of a CPU actor with several): calls, rows, busy seconds, its span,
    and the busy share of the steady phase.

    The steady phase of an actor runs from the end of its first model call (start-up and warm-up
    excluded) to the end of its last; busy is the model time inside it. A share below 100 % is
    time the actor waited for input.
    """
    out = {}
    for actor, spans in busy.items():
        spans = sorted(spans)
        busy_s = sum(e - s for s, e, _ in spans)
        steady = spans[-1][1] - spans[0][1]
        steady_busy = sum(e - max(s, spans[0][1]) for s, e, _ in spans[1:])
        out[actor] = {"calls": len(spans), "rows": sum(r for _, _, r in spans), "busy_seconds": round(busy_s, 3),
                      "span_seconds": round(spans[-1][1] - spans[0][0], 3),
                      "steady_seconds": round(steady, 3),
                      "steady_busy_share": round(steady_busy / steady, 4) if steady > 0 else None}
    return out
