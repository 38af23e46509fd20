"""The run summary (runs/<run_id>/summary.json) and the wall time of each phase of a run."""

from __future__ import annotations

import datetime as _dt
import logging
import time

from cafi import telemetry
from cafi.redact import redact_values, redacted_config

log = logging.getLogger("cafi")


class Phases:
    """Wall seconds of each phase of a run (planning, scoring, counting), for the summary and the log."""

    def __init__(self):
        self.started = time.time()
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
        log.info("phase %s: %.1f s", name, self.seconds[name])

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat()


def run_summary(*, run_id: str, version: str, synthetic: bool, fingerprints: dict, inputs: int, listed: int,
                scored_now: int, includes: list[str], reuse: dict | None, stages_run: list[str], observed: dict,
                counts: dict, phases: Phases, elapsed: float, input_section: dict, stats: dict, output: dict,
                config, embedding_model: dict | None = None) -> dict:
    """The summary a committed run leaves: what ran, what was reused, counts, timing, the config.

    `config` is the run's JobConfig: written redacted (cafi/redact.py), like the `output` URIs, so no
    credential of a URI and no resolved interpolation (`${oc.env:TOKEN}`) reaches the summary."""
    return {
        "run_id": run_id,
        "model_version": version,
        "synthetic_weights": synthetic,
        "stage_fingerprints": fingerprints,
        "inputs": inputs,
        "duplicate_inputs": listed - inputs,
        "scored_now": int(scored_now),
        "includes_runs": includes,
        "reuse": reuse,
        "stages_run": stages_run,
        # the recognizer of the `embedding` column (stage, arch, sha256), null without output.embeddings
        "embedding_model": embedding_model,
        "retries": {k: observed.get("counts", {}).get(k, 0) for k in ("read_retries", "write_retries")},
        "model_actors": telemetry.busy_summary(observed.get("busy", {})),
        "counts": counts,
        "started_at": _utc(phases.started),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "wall_seconds": round(elapsed, 3),
        "phase_seconds": phases.seconds,
        "images_per_second": round(scored_now / elapsed, 3) if elapsed > 0 else None,
        "input": input_section,
        "stages": stats,
        "output": redact_values(output),
        "config": redacted_config(config),
    }
