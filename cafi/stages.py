"""The job's stages: small callables over dict-of-numpy batches.

Model stages are classes that load their model once in `__init__` (Ray runs them as an
actor pool); `resources()` says what each one asks Ray for. Every stage passes rows it
cannot work on through untouched, so each input leaves exactly one row.

Batch columns, in order of appearance:
  uri [+ prev_* reuse columns, see cafi/reuse.py], status ("ok" while in flight, then
  "scored" | "no_face" | "error"), error, width, height, image (N,S,S,3 uint8)
  -> det_score, landmarks (N,10) -> mask_fraction (image becomes the masked face)
  -> serfiq_raw -> dbcnn -> decide: serfiq, cafi, accepted, decision, reject_reason, ...
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa

from cafi import imaging
from cafi.config import DecisionConfig, ImageConfig, JobConfig, StageConfig, StorageConfig, from_dict
from cafi.decision import ERROR, NO_FACE, OK, SCORED, reject_reasons, rescale_serfiq
from cafi.manifest import SCHEMA
from cafi.reuse import reused
from cafi.storage import filesystem, protocol_of

OUTPUT_COLUMNS = tuple(SCHEMA.names)


def _nan(n: int, *shape: int) -> np.ndarray:
    return np.full((n, *shape), np.nan, dtype=np.float32)


# ---------------------------------------------------------------- read + decode (CPU tasks)

READ_ATTEMPTS = 4


def read_bytes(uris: list[str], storage) -> list[bytes | Exception]:
    """Fetch objects concurrently per filesystem; a failure becomes that item's exception.

    Failures other than "not found" are retried with backoff on top of the client's own
    retries: object stores throttle and drop connections under load.
    """
    by_proto: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(uris):
        by_proto[protocol_of(uri)].append(i)
    out: list[bytes | Exception] = [b""] * len(uris)
    for _, idx in by_proto.items():
        fs, _ = filesystem(uris[idx[0]], storage)
        pending = {filesystem(uris[i], storage)[1]: i for i in idx}
        for attempt in range(READ_ATTEMPTS):
            try:
                got = fs.cat(list(pending), on_error="return")
            except Exception as exc:  # noqa: BLE001 - the whole call failed: every item gets the reason
                got = {p: exc for p in pending}
            if not isinstance(got, dict):
                got = {next(iter(pending)): got}
            retry = {}
            for p, i in pending.items():
                out[i] = got.get(p, FileNotFoundError(p))
                if isinstance(out[i], Exception) and not isinstance(out[i], FileNotFoundError):
                    retry[p] = i
            if not retry or attempt == READ_ATTEMPTS - 1:
                break
            pending = retry
            time.sleep(0.2 * 2**attempt)
    return out


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "cannot read object: not found (vanished or never existed)"
    return f"cannot read object: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def read_decode(batch: dict, cfg: dict) -> dict:
    """uri -> image, width, height, status, error. CPU only; runs as plain Ray tasks.

    Rows whose every score is reused from an earlier version are not read at all.
    """
    image_cfg, storage = ImageConfig(**cfg["image"]), StorageConfig(**cfg["storage"])
    uris = [str(u) for u in batch["uri"]]
    n, size = len(uris), image_cfg.crop_size
    batch["image"] = images = np.zeros((n, size, size, 3), dtype=np.uint8)
    batch["status"] = status = np.full(n, OK, dtype=object)
    batch["error"] = error = np.full(n, "", dtype=object)  # "" in flight: an all-null column loses its type
    batch["width"] = width = np.zeros(n, dtype=np.int32)
    batch["height"] = height = np.zeros(n, dtype=np.int32)
    need = np.ones(n, dtype=bool)
    if "prev_needs_pixels" in batch:  # every score of these rows comes from an earlier version
        need = batch["prev_needs_pixels"].astype(bool)
        width[~need], height[~need] = batch["prev_width"][~need], batch["prev_height"][~need]
        was_error = ~need & (batch["prev_status"] == ERROR)
        status[was_error], error[was_error] = ERROR, batch["prev_error"][was_error]
    todo = np.flatnonzero(need)
    for i, data in zip(todo, read_bytes([uris[i] for i in todo], storage), strict=True):
        if isinstance(data, Exception):
            status[i], error[i] = ERROR, _read_error(data)
            continue
        dec = imaging.decode(data, image_cfg)
        width[i], height[i] = dec.width, dec.height
        if dec.error is not None:
            status[i], error[i] = ERROR, dec.error
        else:
            images[i] = dec.image
    batch["uri"] = np.asarray(uris, dtype=object)
    return batch


# ---------------------------------------------------------------- model stages (actors)

def torch_threads(st: StageConfig) -> int:
    """0: the CPUs Ray reserved for the actor (at least 1); -1: every CPU this process may run on."""
    if st.torch_threads == -1:
        return len(os.sched_getaffinity(0))
    return st.torch_threads or max(1, round(st.num_cpus))


class ModelStage:
    """Base: builds the device from config, runs `process` on the rows still in flight."""

    config_key = ""
    reuse_stage = ""  # the version.py stage whose earlier results this stage can take over

    def __init__(self, cfg: dict):
        from cafi.models.runtime import configure_torch, pick_device

        self.cfg: JobConfig = from_dict(cfg)
        st = self.stage_config(self.cfg)
        self.device = pick_device(self.cfg.models.device, st.num_gpus)
        configure_torch(self.device, torch_threads(st))
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

    @classmethod
    def init_columns(cls, batch: dict, n: int) -> None:
        raise NotImplementedError

    @classmethod
    def take_over(cls, batch: dict, rows: np.ndarray) -> None:
        """Copy this stage's results of an earlier version into `rows`."""
        raise NotImplementedError

    def process(self, batch: dict, rows: np.ndarray) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        self.init_columns(batch, n)
        live = batch["status"] == OK
        taken = live & reused(batch, self.reuse_stage)
        if taken.any():
            self.take_over(batch, np.flatnonzero(taken))
        rows = np.flatnonzero(live & ~taken & (batch["status"] == OK))
        if len(rows):
            self.process(batch, rows)
        return batch

    def _common(self) -> dict:
        m = self.cfg.models
        return {"cache_dir": m.cache_dir, "device": self.device, "precision": m.precision,
                "storage": self.cfg.storage, "compile": m.compile}


class Detect(ModelStage):
    """RetinaFace: best face per crop and its 5 landmarks. No face -> status no_face."""

    config_key, reuse_stage = "detector", "detect"

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.retinaface import FaceDetector

        d = self.cfg.models.detector
        self.detector = None
        if d.align != "none":
            self.detector = FaceDetector(d.arch, checkpoint("detector", d.arch, d.weights), **self._common())

    @classmethod
    def init_columns(cls, batch: dict, n: int) -> None:
        batch["det_score"] = _nan(n)
        batch["landmarks"] = _nan(n, 10)

    @classmethod
    def take_over(cls, batch: dict, rows: np.ndarray) -> None:
        batch["det_score"][rows] = batch["prev_det_score"][rows]
        batch["landmarks"][rows] = batch["prev_landmarks"][rows]
        gone = rows[batch["prev_status"][rows] == NO_FACE]
        batch["status"][gone] = NO_FACE

    def process(self, batch: dict, rows: np.ndarray) -> None:
        if self.detector is None:  # align: none -- crops are already aligned faces
            return
        det = self.detector(batch["image"][rows])
        found = det.score >= self.cfg.models.detector.conf_threshold
        batch["det_score"][rows] = det.score
        batch["landmarks"][rows] = det.landmarks.reshape(len(rows), 10)
        batch["status"][rows[~found]] = NO_FACE


class Mask(ModelStage):
    """Face parsing: background replaced by the fill colour; face area fraction."""

    config_key, reuse_stage = "parser", "parse"

    def load(self) -> None:
        from cafi.models.face_parsing import FaceMasker
        from cafi.models.registry import checkpoint

        p = self.cfg.models.parser
        self.masker = FaceMasker(p.arch, checkpoint("parser", p.arch, p.weights), face_labels=list(p.face_labels),
                                 fill=list(p.fill), input_size=p.input_size, **self._common())

    @classmethod
    def init_columns(cls, batch: dict, n: int) -> None:
        batch["mask_fraction"] = _nan(n)

    @classmethod
    def take_over(cls, batch: dict, rows: np.ndarray) -> None:
        batch["mask_fraction"][rows] = batch["prev_mask_fraction"][rows]

    def process(self, batch: dict, rows: np.ndarray) -> None:
        masked, fraction = self.masker(batch["image"][rows])
        batch["image"][rows] = masked
        batch["mask_fraction"][rows] = fraction


class SerFiqStage(ModelStage):
    """SER-FIQ on the face aligned from the detector's landmarks (or the crop itself with align: none)."""

    config_key, reuse_stage = "serfiq", "serfiq"

    def load(self) -> None:
        from cafi.models.registry import checkpoint
        from cafi.models.serfiq import SerFiq

        s = self.cfg.models.serfiq
        self.model = SerFiq(checkpoint("serfiq", "arcface_ir_se50", s.weights), samples=s.samples,
                            dropout=s.dropout, alpha=s.alpha, r=s.r, seed=s.seed, **self._common())

    @classmethod
    def init_columns(cls, batch: dict, n: int) -> None:
        batch["serfiq_raw"] = _nan(n)

    @classmethod
    def take_over(cls, batch: dict, rows: np.ndarray) -> None:
        batch["serfiq_raw"][rows] = batch["prev_serfiq_raw"][rows]

    def process(self, batch: dict, rows: np.ndarray) -> None:
        from cafi.faces.align import align_faces, resize_aligned

        images = batch["image"][rows]
        if self.cfg.models.detector.align == "none":
            faces = resize_aligned(images)
        else:
            faces = align_faces(images, batch["landmarks"][rows].reshape(-1, 5, 2), np.ones(len(rows), bool))
        raw, _ = self.model(faces)
        batch["serfiq_raw"][rows] = raw


class DbcnnStage(ModelStage):
    config_key, reuse_stage = "dbcnn", "dbcnn"

    def load(self) -> None:
        from cafi.models.dbcnn import DbcnnScorer
        from cafi.models.registry import checkpoint

        self.model = DbcnnScorer(checkpoint("dbcnn", "dbcnn", self.cfg.models.dbcnn.weights), **self._common())

    @classmethod
    def init_columns(cls, batch: dict, n: int) -> None:
        batch["dbcnn"] = _nan(n)

    @classmethod
    def take_over(cls, batch: dict, rows: np.ndarray) -> None:
        batch["dbcnn"][rows] = batch["prev_dbcnn"][rows]

    def process(self, batch: dict, rows: np.ndarray) -> None:
        batch["dbcnn"][rows] = self.model(batch["image"][rows])


MODEL_STAGES = (Detect, Mask, SerFiqStage, DbcnnStage)


class FusedModels:
    """The model stages in one actor: no object-store hop between them."""

    def __init__(self, cfg: dict, stages: list[str] | None = None):
        names = stages or [cls.__name__ for cls in MODEL_STAGES]
        self.stages = [cls(cfg) for cls in MODEL_STAGES if cls.__name__ in names]

    @staticmethod
    def resources(cfg: JobConfig, stages=MODEL_STAGES) -> dict:
        from ray.data import ActorPoolStrategy

        sts = [cls.stage_config(cfg) for cls in stages]
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


def take_over_only(batch: dict, stages: list[str]) -> dict:
    """Stages left out of the pipeline because every row reuses their results: copy the results
    over without loading any model (a CPU task)."""
    n = len(batch["uri"])
    for cls in MODEL_STAGES:
        if cls.__name__ in stages:
            cls.init_columns(batch, n)
            cls.take_over(batch, np.flatnonzero((batch["status"] == OK) & reused(batch, cls.reuse_stage)))
    return batch


# ---------------------------------------------------------------- decision (CPU, cheap)

def decide(batch: dict, cfg: dict, model_version: str, run_id: str) -> pa.Table:
    """CAFI decision: keep or reject with a reason. Returns the manifest rows (no pixels)."""
    d = DecisionConfig(**cfg["decision"])
    n = len(batch["uri"])
    status = batch["status"].astype(object)
    serfiq = rescale_serfiq(batch["serfiq_raw"], cfg["models"]["serfiq"]["alpha"], cfg["models"]["serfiq"]["r"])
    frac, dbcnn = batch["mask_fraction"], batch["dbcnn"]
    reason = reject_reasons(status, serfiq, frac, dbcnn, d)
    accepted = (status == OK) & (reason == None)  # noqa: E711
    status[status == OK] = SCORED
    now = np.datetime64(_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), "us")
    landmarks = np.asarray(batch["landmarks"], dtype=np.float32).reshape(n, 10)
    cols = {
        "uri": batch["uri"], "status": status,
        "error": np.array([e if e else None for e in batch["error"]], dtype=object),
        "width": batch["width"], "height": batch["height"], "det_score": batch["det_score"],
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(landmarks.reshape(-1), pa.float32()), 10),
        "mask_fraction": frac, "serfiq": serfiq, "serfiq_raw": batch["serfiq_raw"], "dbcnn": dbcnn,
        "cafi": np.where(accepted, dbcnn, np.nan).astype(np.float32), "accepted": accepted.astype(bool),
        "decision": np.where(accepted, "accepted", "rejected").astype(object), "reject_reason": reason,
        "model_version": np.full(n, model_version, dtype=object), "run_id": np.full(n, run_id, dtype=object),
        "scored_at": np.full(n, now),
    }
    # An explicit schema: a block whose rows are all null in a column keeps the column's type.
    return pa.Table.from_pydict({k: cols[k] for k in OUTPUT_COLUMNS}, schema=SCHEMA)
