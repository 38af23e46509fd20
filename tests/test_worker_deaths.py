"""An input that kills its model worker every time: isolated on the retry, then an error row -- the
ledger's logic at the unit level (a death is an exception escaping the attempt; the ledger is called in
process instead of through the run's telemetry actor). The same with real process deaths on real Ray is
the killed-worker scenario of tests/test_faults.py."""

from __future__ import annotations

import numpy as np
import pytest

from cafi import imaging
from cafi.config import ImageConfig
from cafi.samples import draw_face, encode
from cafi.stages.deaths import DeathWatch, Ledger

POISON = encode(draw_face(64, seed=9), "PNG")
GOOD = [encode(draw_face(64, seed=s), "JPEG") for s in (1, 2, 3)]


class _InProcess:
    """The telemetry client's ledger calls, made on a Ledger object directly."""

    def __init__(self):
        self.ledger = Ledger()

    def batch_begin(self, key):
        return self.ledger.begin(key)

    def batch_mark(self, key, step):
        self.ledger.mark(key, step)

    def batch_done(self, key):
        self.ledger.done(key)


class Died(BaseException):
    """What the worker's death looks like here: nothing after it runs in this attempt."""


def _batch() -> dict:
    data = [GOOD[0], POISON, GOOD[1], GOOD[2]]
    return {"uri": np.array([f"/in/{i}.img" for i in range(4)], dtype=object), "data": np.array(data, dtype=object),
            "status": np.array(["ok"] * 4, dtype=object), "error": np.array([""] * 4, dtype=object)}


def _run_until_done(watch, monkeypatch, kills_in: str) -> tuple[dict, int]:
    """Give the batch to the 'actor' until an attempt finishes, as Ray does after each death."""
    real = imaging.decode

    def decode(data, cfg):
        if data == POISON and kills_in == "decode":
            raise Died
        return real(data, cfg)

    monkeypatch.setattr(imaging, "decode", decode)
    deaths = 0
    while True:
        batch = _batch()
        try:
            with watch.attempt(batch) as attempt:
                attempt.before_decode(batch)
                for i, d in enumerate(batch["data"]):  # the actor's decode of the batch
                    if batch["status"][i] == "ok" and len(d):
                        imaging.decode(d, ImageConfig())
                attempt.before_models(batch)
                if kills_in == "models" and batch["status"][1] == "ok":
                    raise Died
            return batch, deaths
        except Died:
            deaths += 1
            assert deaths < 10, "the batch kept killing its worker"


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_an_input_that_kills_its_worker_becomes_an_error_row_and_the_others_are_scored(monkeypatch, limit):
    telemetry = _InProcess()
    batch, deaths = _run_until_done(DeathWatch(telemetry, limit, ImageConfig()), monkeypatch, "decode")
    assert deaths == 1 + limit  # the first attempt (no marks), then `limit` deaths on the input itself
    assert list(batch["status"]) == ["ok", "error", "ok", "ok"]
    assert f"died {'once' if limit == 1 else f'{limit} times'} while decoding this input" in batch["error"][1]
    assert "ray.max_worker_deaths" in batch["error"][1] and batch["data"][1] == b""
    assert not telemetry.ledger.attempts and not telemetry.ledger.blamed  # nothing left behind


def test_a_batch_whose_models_keep_killing_the_worker_becomes_error_rows(monkeypatch):
    batch, deaths = _run_until_done(DeathWatch(_InProcess(), 2, ImageConfig()), monkeypatch, "models")
    assert deaths == 3 and set(batch["status"]) == {"error"}
    assert all("while scoring this batch" in e for e in batch["error"])


def test_an_attempt_that_finishes_asks_the_ledger_once_and_leaves_nothing(monkeypatch):
    telemetry = _InProcess()
    calls = []
    monkeypatch.setattr(telemetry, "batch_mark", lambda *a: calls.append(a))
    batch = _batch()
    with DeathWatch(telemetry, 2, ImageConfig()).attempt(batch) as attempt:
        attempt.before_decode(batch)
        attempt.before_models(batch)
    assert calls == [] and not telemetry.ledger.attempts and list(batch["status"]) == ["ok"] * 4
