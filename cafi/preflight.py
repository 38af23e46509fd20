"""Checks at start that fail the job before any work: weights reachable, output writable."""

from __future__ import annotations

from cafi import manifest
from cafi.config import JobConfig
from cafi.errors import StorageError, WeightsError
from cafi.redact import redact_text, redact_uri
from cafi.stages.specs import checkpoints
from cafi.storage import filesystem, join


def check(cfg: JobConfig, run_id: str) -> None:
    for ckpt in checkpoints(cfg):
        try:
            fs, path = filesystem(ckpt.uri, cfg.storage)
            found = fs.exists(path)
        except Exception as exc:  # noqa: BLE001 - unreachable endpoint, bad scheme, auth
            raise WeightsError(f"{ckpt.model}: cannot reach checkpoint {redact_uri(ckpt.uri)}: "
                               f"{type(exc).__name__}: {redact_text(str(exc))}") from None
        if not found:
            raise WeightsError(f"{ckpt.model}: checkpoint not found: {redact_uri(ckpt.uri)}")
    probe = join(manifest.run_uri(cfg.output.uri, run_id), "_STARTED")
    try:
        fs, path = filesystem(probe, cfg.storage)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as fh:
            fh.write(b"")
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri: cannot write to {redact_uri(cfg.output.uri)}: {type(exc).__name__}: "
                           f"{redact_text(str(exc))}") from None
