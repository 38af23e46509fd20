"""Checks at start that fail the job before any work: weights reachable, output writable, and a
trained scorer's embeddings from the recognizer it was trained on."""

from __future__ import annotations

from cafi import manifest
from cafi.config import JobConfig
from cafi.errors import ConfigError, StorageError, WeightsError
from cafi.redact import redact_text, redact_uri
from cafi.stages.specs import checkpoints, embedding_model, specs_for
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
    check_recognizer(cfg)
    probe = join(manifest.run_uri(cfg.output.uri, run_id), "_STARTED")
    try:
        fs, path = filesystem(probe, cfg.storage)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as fh:
            fh.write(b"")
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri: cannot write to {redact_uri(cfg.output.uri)}: {type(exc).__name__}: "
                           f"{redact_text(str(exc))}") from None


def check_recognizer(cfg: JobConfig) -> None:
    """A scorer that reads the run's embedding as a feature (the classic classifier) was trained on one
    recognizer's embeddings: another recognizer's would be other numbers with the same shape. Its
    checkpoint records which (fetched here, on the driver: a few MB); a different one in this run stops
    the job. A checkpoint that records none (synthetic) is not checked."""
    now = embedding_model(cfg)
    for s in specs_for(cfg):
        if "embedding" not in s.reads(cfg) or now is None:
            continue
        from cafi.models.classic import trained_recognizer
        from cafi.weights import fetch

        trained = trained_recognizer(fetch(s.checkpoint(cfg), cfg.models.cache_dir, cfg.storage))
        if trained is not None and trained.get("sha256") != now["sha256"]:
            raise ConfigError(
                f"models.{s.section}.weights: trained on embeddings of {trained.get('stage')} {trained.get('arch')} "
                f"(sha256 {trained.get('sha256')}), but this run's embedding comes from {now['stage']} {now['arch']} "
                f"(sha256 {now['sha256']}): run that recognizer (models.fiqa) or train on a run that used this one")
