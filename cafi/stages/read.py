"""Read tasks (plain Ray tasks, CPU): fetch each object's bytes and make the checks that need no
decoding. The encoded bytes travel to the model actor, which decodes them: a row in the object
store is about the size of its file, not of its decoded pixels.
"""

from __future__ import annotations

import numpy as np

from cafi import imaging
from cafi.config import ImageConfig, StorageConfig
from cafi.decision import ERROR, OK
from cafi.fetch import read_bytes, read_error
from cafi.telemetry import Telemetry


def start_rows(batch: dict, n: int) -> np.ndarray:
    """The columns every row carries from here on; returns the rows whose pixels some stage needs
    (rows whose every result is reused from an earlier version are not read at all)."""
    batch["status"] = status = np.full(n, OK, dtype=object)
    batch["error"] = error = np.full(n, "", dtype=object)  # "" in flight: an all-null column loses its type
    batch["width"] = width = np.zeros(n, dtype=np.int32)
    batch["height"] = height = np.zeros(n, dtype=np.int32)
    need = np.ones(n, dtype=bool)
    if "prev_needs_pixels" in batch:
        need = batch["prev_needs_pixels"].astype(bool)
        width[~need], height[~need] = batch["prev_width"][~need], batch["prev_height"][~need]
        was_error = ~need & (batch["prev_status"] == ERROR)
        status[was_error], error[was_error] = ERROR, batch["prev_error"][was_error]
    return need


def check_header(batch: dict, i: int, data: bytes, image_cfg: ImageConfig) -> None:
    """Row i gets its header's size, or an error row for what the header alone refuses."""
    head = imaging.probe(data, image_cfg)
    batch["width"][i], batch["height"][i] = head.width, head.height
    if head.error is not None:
        batch["status"][i], batch["error"][i] = ERROR, head.error


def read_objects(batch: dict, cfg: dict, run_id: str | None = None) -> dict:
    """uri -> data (encoded bytes; empty where not needed or unreadable), status, error, width, height."""
    image_cfg, storage = ImageConfig(**cfg["image"]), StorageConfig(**cfg["storage"])
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    need = start_rows(batch, n)
    data = np.full(n, b"", dtype=object)
    counts: dict = {}
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
