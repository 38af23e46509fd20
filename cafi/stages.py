"""The job's stages: small callables over dict-of-numpy batches.

Model stages are classes that load their model once in `__init__` (Ray runs them as an
actor pool); `resources()` says what each one asks Ray for. Every stage passes rows it
cannot work on through untouched, so each input leaves exactly one row.

Batch columns, in order of appearance:
  uri, status ("ok" while in flight, then "scored" | "no_face" | "error"), error,
  width, height, image (N,S,S,3 uint8) -> det_score, aligned (N,112,112,3) ->
  mask_fraction (image becomes the masked face) -> serfiq_raw, serfiq -> dbcnn ->
  accepted, decision, reject_reason, cafi, model_version, run_id, scored_at.
"""

from __future__ import annotations

import datetime as _dt
from collections import defaultdict

import numpy as np
import pyarrow as pa

from cafi import imaging
from cafi.config import DecisionConfig, ImageConfig, JobConfig, StageConfig, StorageConfig, from_dict
from cafi.manifest import SCHEMA
from cafi.storage import filesystem, protocol_of

OK, SCORED, NO_FACE, ERROR = "ok", "scored", "no_face", "error"
OUTPUT_COLUMNS = tuple(SCHEMA.names)


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float32)


# ---------------------------------------------------------------- read + decode (CPU tasks)

def read_bytes(uris: list[str], storage) -> list[bytes | Exception]:
    """Fetch objects concurrently per filesystem; a failure becomes that item's exception."""
    by_proto: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(uris):
        by_proto[protocol_of(uri)].append(i)
    out: list[bytes | Exception] = [b""] * len(uris)
    for _, idx in by_proto.items():
        fs, _ = filesystem(uris[idx[0]], storage)
        paths = [filesystem(uris[i], storage)[1] for i in idx]
        try:
            got = fs.cat(paths, on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole call failed: every item gets the reason
            got = {p: exc for p in paths}
        if not isinstance(got, dict):
            got = {paths[0]: got}
        for i, p in zip(idx, paths, strict=True):
            out[i] = got.get(p, FileNotFoundError(p))
    return out


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "cannot read object: not found (vanished or never existed)"
    return f"cannot read object: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def read_decode(batch: dict, cfg: dict) -> dict:
    """uri -> image, width, height, status, error. CPU only; runs as plain Ray tasks."""
    image_cfg, storage = ImageConfig(**cfg["image"]), StorageConfig(**cfg["storage"])
    uris = [str(u) for u in batch["uri"]]
    n, size = len(uris), image_cfg.crop_size
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    status = np.full(n, OK, dtype=object)
    error = np.full(n, "", dtype=object)  # "" in flight: an all-null column would lose its string type
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    for i, data in enumerate(read_bytes(uris, storage)):
        if isinstance(data, Exception):
            status[i], error[i] = ERROR, _read_error(data)
            continue
        dec = imaging.decode(data, image_cfg)
        width[i], height[i] = dec.width, dec.height
        if dec.error is not None:
            status[i], error[i] = ERROR, dec.error
        else:
            images[i] = dec.image
    return {"uri": np.asarray(uris, dtype=object), "status": status, "error": error,
            "width": width, "height": height, "image": images}


# ---------------------------------------------------------------- model stages (actors)

class ModelStage:
    """Base: builds the device from config, runs `process` on the rows still in flight."""

    config_key = ""

    def __init__(self, cfg: dict):
        from cafi.models.runtime import configure_torch, pick_device

        self.cfg: JobConfig = from_dict(cfg)
        st = self.stage_config(self.cfg)
        self.device = pick_device(self.cfg.models.device, st.num_gpus)
        configure_torch(self.device, st.torch_threads or max(1, round(st.num_cpus)))
        self.load()

    @classmethod
    def stage_config(cls, cfg: JobConfig) -> StageConfig:
        return getattr(cfg.models, cls.config_key)

    @classmethod
    def resources(cls, cfg: JobConfig) -> dict:
        """Ray map_batches arguments: resources, batch size and actor pool from config."""
        from ray.data import ActorPoolStrategy

        st = cls.stage_config(cfg)
        return {
            "batch_size": st.batch_size,
            "num_cpus": st.num_cpus,
            "num_gpus": st.num_gpus,
            "compute": ActorPoolStrategy(min_size=st.min_actors, max_size=st.max_actors),
        }

    def load(self) -> None:
        raise NotImplementedError

    def process(self, batch: dict, rows: np.ndarray) -> None:
        raise NotImplementedError

    def init_columns(self, batch: dict, n: int) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        self.init_columns(batch, n)
        rows = np.flatnonzero(batch["status"] == OK)
        if len(rows):
            self.process(batch, rows)
        return batch

    def _common(self) -> dict:
        m = self.cfg.models
        return {"cache_dir": m.cache_dir, "device": self.device, "precision": m.precision,
                "storage": self.cfg.storage}


class Detect(ModelStage):
    """RetinaFace: best face per crop; aligned 112x112 face for SER-FIQ. No face -> status no_face."""

    config_key = "detector"

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.retinaface import FaceDetector

        d = self.cfg.models.detector
        self.detector = None
        if d.align != "none":
            self.detector = FaceDetector(d.arch, checkpoint("detector", d.arch, d.weights), **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        batch["det_score"] = _nan(n)
        batch["aligned"] = np.zeros((n, 112, 112, 3), dtype=np.uint8)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        from cafi.faces.align import align_faces, resize_aligned

        images = batch["image"][rows]
        if self.detector is None:  # align: none -- crops are already aligned faces
            batch["aligned"][rows] = resize_aligned(images)
            return
        det = self.detector(images)
        found = det.score >= self.cfg.models.detector.conf_threshold
        batch["det_score"][rows] = det.score
        batch["aligned"][rows] = align_faces(images, det.landmarks, found)
        batch["status"][rows[~found]] = NO_FACE


class Mask(ModelStage):
    """Face parsing: background replaced by the fill colour; face area fraction."""

    config_key = "parser"

    def load(self) -> None:
        from cafi.models.face_parsing import FaceMasker
        from cafi.models.registry import checkpoint

        p = self.cfg.models.parser
        self.masker = FaceMasker(p.arch, checkpoint("parser", p.arch, p.weights), face_labels=list(p.face_labels),
                                 fill=list(p.fill), input_size=p.input_size, **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        batch["mask_fraction"] = _nan(n)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        masked, fraction = self.masker(batch["image"][rows])
        batch["image"][rows] = masked
        batch["mask_fraction"][rows] = fraction


class SerFiqStage(ModelStage):
    config_key = "serfiq"

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.serfiq import SerFiq

        s = self.cfg.models.serfiq
        self.model = SerFiq(checkpoint("serfiq", "arcface_ir_se50", s.weights), samples=s.samples,
                            dropout=s.dropout, alpha=s.alpha, r=s.r, seed=s.seed, **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        batch["serfiq_raw"] = _nan(n)
        batch["serfiq"] = _nan(n)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        raw, scaled = self.model(batch["aligned"][rows])
        batch["serfiq_raw"][rows] = raw
        batch["serfiq"][rows] = scaled


class DbcnnStage(ModelStage):
    config_key = "dbcnn"

    def load(self) -> None:
        from cafi.models.dbcnn import DbcnnScorer
        from cafi.models.registry import checkpoint

        self.model = DbcnnScorer(checkpoint("dbcnn", "dbcnn", self.cfg.models.dbcnn.weights), **self._common())

    def init_columns(self, batch: dict, n: int) -> None:
        batch["dbcnn"] = _nan(n)

    def process(self, batch: dict, rows: np.ndarray) -> None:
        batch["dbcnn"][rows] = self.model(batch["image"][rows])


MODEL_STAGES = (Detect, Mask, SerFiqStage, DbcnnStage)


class FusedModels:
    """All four model stages in one actor: no object-store hop between them."""

    def __init__(self, cfg: dict):
        self.stages = [cls(cfg) for cls in MODEL_STAGES]

    @staticmethod
    def resources(cfg: JobConfig) -> dict:
        from ray.data import ActorPoolStrategy

        sts = [cls.stage_config(cfg) for cls in MODEL_STAGES]
        return {
            "batch_size": min(s.batch_size for s in sts),
            "num_cpus": max(s.num_cpus for s in sts),
            "num_gpus": max(s.num_gpus for s in sts),
            "compute": ActorPoolStrategy(min_size=max(s.min_actors for s in sts),
                                         max_size=max(s.max_actors for s in sts)),
        }

    def __call__(self, batch: dict) -> dict:
        for stage in self.stages:
            batch = stage(batch)
        return batch


# ---------------------------------------------------------------- decision (CPU, cheap)

def decide(batch: dict, cfg: dict, model_version: str, run_id: str) -> dict:
    """CAFI decision: keep or reject with a reason; drops the pixel columns."""
    d = DecisionConfig(**cfg["decision"])
    n = len(batch["uri"])
    status = batch["status"].astype(object)
    reason = np.full(n, None, dtype=object)
    ok = status == OK
    reason[status == ERROR] = "error"
    reason[status == NO_FACE] = "no_face"
    serfiq, frac, dbcnn = batch["serfiq"], batch["mask_fraction"], batch["dbcnn"]
    with np.errstate(invalid="ignore"):
        checks = [(serfiq < d.min_serfiq, "unrecognisable"), (frac < d.min_mask_fraction, "face_too_small")]
        if d.min_dbcnn is not None:
            checks.append((dbcnn < d.min_dbcnn, "low_quality"))
    for failed, why in checks:
        reason[ok & failed & (reason == None)] = why  # noqa: E711 - elementwise on object array
    status[ok] = SCORED
    accepted = ok & (reason == None)  # noqa: E711
    cafi = np.where(accepted, dbcnn, np.nan).astype(np.float32)
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    out = {k: batch[k] for k in ("uri", "width", "height", "det_score", "mask_fraction", "serfiq",
                                 "serfiq_raw", "dbcnn")}
    out.update(
        error=np.array([e if e else None for e in batch["error"]], dtype=object),
        status=status, cafi=cafi, accepted=accepted.astype(bool), reject_reason=reason,
        decision=np.where(accepted, "accepted", "rejected").astype(object),
        model_version=np.full(n, model_version, dtype=object), run_id=np.full(n, run_id, dtype=object),
        scored_at=np.full(n, np.datetime64(now, "us")),
    )
    # An explicit schema: a block whose rows are all null in a column keeps the column's type.
    return pa.Table.from_pydict({k: out[k] for k in OUTPUT_COLUMNS}, schema=SCHEMA)
