"""A Ray Data dataset of 112x112 faces re-aligned from the landmarks a run stored (no detection), each
with its training targets, and the float input a net takes from them.

Ray Data tasks read the run's manifest files (uri, landmarks, shard columns), keep the rows that have a
target, read each sample's bytes as the run read them (cafi.inputs.samples.read_samples), decode them
with the run's image settings and warp them with its alignment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FACE = 112
FACE_BYTES = FACE * FACE * 3
MANIFEST_COLUMNS = ["uri", "landmarks", "shard_offset", "shard_size"]


@dataclass(frozen=True)
class FaceSource:
    """How a run read and aligned its faces: its manifest files and filesystem, sample reads, image
    config and alignment."""
    files: list
    fs: object
    reads: dict
    image_cfg: object
    align: str


def face_source(ref, files: list[str], storage) -> FaceSource:
    """The FaceSource of a committed run (its summary's config)."""
    from cafi.config import ImageConfig
    from cafi.runs import config_section, sample_reads
    from cafi.train.run_rows import arrow_fs

    image = config_section(ref.summary, "image")
    image_cfg = ImageConfig(**{k: image[k] for k in ("crop_size", "max_pixels", "max_bytes") if k in image})
    align = (config_section(ref.summary, "models").get("detector") or {}).get("align") or "arcface"
    return FaceSource(list(files), arrow_fs(ref, storage), sample_reads(ref.summary), image_cfg, align)


def faces_batch(table: pa.Table, targets, reads: dict, image_cfg, align: str, storage) -> dict:
    """A manifest batch -> the aligned faces (uint8 N x 112 x 112 x 3) of its rows that have a row in
    `targets` (an Arrow table of uri and float target columns, or its object reference), with those
    targets as float32. Unreadable or undecodable samples are dropped."""
    import ray

    from cafi.faces.align import align_faces, resize_aligned
    from cafi.imaging import decode
    from cafi.inputs.samples import read_samples

    targets = ray.get(targets) if isinstance(targets, ray.ObjectRef) else targets
    names = [c for c in targets.column_names if c != "uri"]
    pos = pc.index_in(table["uri"], value_set=targets["uri"])
    keep = pc.and_(pc.is_valid(pos), pc.is_valid(table["landmarks"]))
    table, pos = table.filter(keep), pos.filter(keep)
    empty = {"image": np.zeros((0, FACE, FACE, 3), np.uint8), **{n: np.zeros(0, np.float32) for n in names}}
    if table.num_rows == 0:
        return empty
    data = read_samples(table["uri"].to_pylist(), table["shard_offset"].to_pylist(), table["shard_size"].to_pylist(),
                        storage, **reads)
    images, marks, rows = [], [], []
    for i, d in enumerate(data):
        if isinstance(d, Exception):
            continue
        dec = decode(d, image_cfg)
        if dec.image is None:
            continue
        images.append(dec.image)
        marks.append(np.asarray(table["landmarks"][i].as_py(), np.float32).reshape(5, 2))
        rows.append(i)
    if not rows:
        return empty
    stack = np.stack(images)
    faces = resize_aligned(stack) if align == "none" else align_faces(stack, np.stack(marks), np.ones(len(rows), bool))
    taken = targets.take(pos.take(pa.array(rows)))
    return {"image": faces, **{n: taken[n].to_numpy(zero_copy_only=False).astype(np.float32) for n in names}}


def faces_dataset(source: FaceSource, targets: pa.Table, storage, batch_size: int = 64):
    """Ray Data dataset of (image, *targets) for the rows of `targets` (uri and float target columns)."""
    import ray

    ds = ray.data.read_parquet(source.files, filesystem=source.fs, columns=MANIFEST_COLUMNS, partitioning=None)
    return ds.map_batches(faces_batch, batch_format="pyarrow", batch_size=batch_size,
                          fn_kwargs={"targets": ray.put(targets), "reads": source.reads,
                                     "image_cfg": source.image_cfg, "align": source.align, "storage": storage})


def cached(ds, rows: int):
    """The faces kept in the object store (decoded and aligned once, not every epoch) when they take at
    most a quarter of it; else streamed, re-read each epoch."""
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    return ds.materialize() if rows * FACE_BYTES <= store / 4 else ds


def to_input(images, flip: bool):
    """uint8 NHWC faces (a torch tensor) -> float NCHW in [-1, 1] (ToTensor, Normalize(0.5, 0.5));
    `flip`: each face mirrored with probability 1/2 (a random horizontal flip)."""
    import torch

    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip:
        mirrored = torch.rand(len(x), device=x.device) < 0.5
        x[mirrored] = x[mirrored].flip(-1)
    return x
