"""Read tasks (plain Ray tasks, CPU): fetch each object's bytes and make the checks that need no
decoding. The encoded bytes travel to the model actor, which decodes them: a row in the object
store is about the size of its file, not of its decoded pixels.
"""

from __future__ import annotations

import numpy as np

from cafi import imaging
from cafi.config import ImageConfig, JobConfig
from cafi.decision import ERROR, OK
from cafi.fetch import read_bytes, read_error
from cafi.storage import allowed_schemes, refused_scheme
from cafi.telemetry import Telemetry


def take_over_read(batch: dict) -> np.ndarray:
    """Rows whose every result comes from an earlier version (cafi/reuse.py) take that version's read
    outcome over (size, and its error if it was one); returns the rows whose pixels some stage needs."""
    n = len(batch["uri"])
    if "prev_needs_pixels" not in batch:
        return np.ones(n, dtype=bool)
    need = batch["prev_needs_pixels"].astype(bool)
    reuse = ~need
    batch["width"] = np.where(reuse, batch["prev_width"], batch["width"]).astype(np.int32)
    batch["height"] = np.where(reuse, batch["prev_height"], batch["height"]).astype(np.int32)
    was_error = reuse & (batch["prev_status"] == ERROR)
    status, error = batch["status"].copy(), batch["error"].copy()
    status[reuse] = np.where(was_error[reuse], ERROR, OK)
    error[reuse] = np.where(was_error[reuse], batch["prev_error"][reuse], "")
    batch["status"], batch["error"] = status, error
    return need


def start_rows(batch: dict, n: int) -> np.ndarray:
    """The columns every row carries from here on; returns the rows whose pixels some stage needs
    (rows whose every result is reused from an earlier version are not read at all)."""
    batch["status"] = np.full(n, OK, dtype=object)
    batch["error"] = np.full(n, "", dtype=object)  # "" in flight: an all-null column loses its type
    batch["width"] = np.zeros(n, dtype=np.int32)
    batch["height"] = np.zeros(n, dtype=np.int32)
    return take_over_read(batch)


def check_header(batch: dict, i: int, data: bytes, image_cfg: ImageConfig) -> None:
    """Row i gets its header's size, or an error row for what the header alone refuses."""
    head = imaging.probe(data, image_cfg)
    batch["width"][i], batch["height"][i] = head.width, head.height
    if head.error is not None:
        batch["status"][i], batch["error"][i] = ERROR, head.error


def read_objects(batch: dict, cfg: JobConfig, run_id: str | None = None) -> dict:
    """The read step of files: uri -> data (encoded bytes; empty where not needed or unreadable),
    status, error, width, height."""
    image_cfg, storage = cfg.image, cfg.storage
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    need = start_rows(batch, n)
    data = np.full(n, b"", dtype=object)
    counts: dict = {}
    allowed = allowed_schemes(cfg.input)
    for i in np.flatnonzero(need):
        why = refused_scheme(uris[i], allowed)
        if why is not None:
            batch["status"][i], batch["error"][i], need[i] = ERROR, why, False
    todo = np.flatnonzero(need)
    fetched = read_bytes([uris[i] for i in todo], storage, counts, max_bytes=image_cfg.max_bytes)
    for i, got in zip(todo, fetched, strict=True):
        if isinstance(got, Exception):
            batch["status"][i], batch["error"][i] = ERROR, read_error(got)
            continue
        check_header(batch, i, got, image_cfg)
        if batch["status"][i] == OK:
            data[i] = got
    batch["uri"] = np.asarray(uris, dtype=object)
    batch["data"] = data
    Telemetry.of(run_id).add(counts)
    return batch


def settle(batch: dict, cfg: JobConfig | None = None, run_id: str | None = None) -> dict:
    """The read step of shards, whose rows a shard task already read: rows whose every result is reused
    take their read outcome over and drop their bytes, as `read_objects` does without reading."""
    need = take_over_read(batch)
    if not need.all():
        data = batch["data"].copy()
        data[~need] = b""
        batch["data"] = data
    return batch
