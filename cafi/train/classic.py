"""`cafi train classic LABELS.csv --run RUN_OR_OUTPUT --out DIR`: the score-based FQA classifier
(cafi/models/classic.py) trained on a team's good / average / bad labels of a committed run's crops.

1. LABELS.csv: a URI column and a label column (good | average | bad; names set by flags), optionally an
   identity column (the held-out split then keeps each identity on one side).
2. The run must have stored landmarks and embeddings (output.embeddings=true): each labelled row's face is
   re-aligned from its stored landmarks (cafi/train/faces.py, Ray Data tasks: read, decode, warp) and its
   GIST, HOG and LBP computed there (cafi/classic/features.py); its CNN feature is the stored embedding.
3. Held-out split (cafi/classic/fit.py split: stratified by class, by identity when given), the
   autoencoders' pretraining, the softmax layer, the fine-tuning: plain torch on the driver (thousands of
   rows: seconds to minutes on a CPU; no Ray Train).
4. DIR/classic.pth (the checkpoint), DIR/classic.yaml (the block `models.classic.weights` naming it by
   URI and sha256), DIR/train.json (split, held-out accuracy and confusion matrix, losses), DIR/train.html.
"""

from __future__ import annotations

import csv
import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.redact import redact_uri
from cafi.storage import filesystem, join, protocol_of
from cafi.train import run_rows

log = logging.getLogger(__name__)

NO_EMBEDDINGS = ("the classic classifier's CNN feature is the run's recognition embedding; re-score with "
                 "output.embeddings=true to store it")
NO_LANDMARKS = "training re-aligns each face from the landmarks the run stored"
OUTPUTS = ("classic.pth", "classic.yaml", "train.json", "train.html")


def read_class_labels(uri: str, storage: StorageConfig | None, uri_column: str = "uri", label_column: str = "label",
                      identity_column: str | None = None) -> pa.Table:
    """LABELS.csv as a table: uri, label (index into CLASSES), identity (string, or null without a column).
    Labels are matched without case or surrounding spaces; any other value, an empty URI or a URI labelled
    twice is an error naming its line."""
    from cafi.models.classic import CLASSES

    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise CafiError(f"labels: {redact_uri(uri)} does not exist")
    with fs.open(path, "rb") as fh:
        reader = csv.DictReader(io.StringIO(fh.read().decode("utf-8-sig")))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    for flag, col in (("--uri-column", uri_column), ("--label-column", label_column),
                      ("--identity-column", identity_column)):
        if col is not None and col not in cols:
            raise CafiError(f"labels: {redact_uri(uri)} has no {col!r} column ({flag}; columns: {cols})")
    uris, labels, ids, seen = [], [], [], {}
    for line, row in enumerate(reader, start=2):
        u = (row.get(uri_column) or "").strip()
        if not u:
            raise CafiError(f"labels {redact_uri(uri)} line {line}: empty {uri_column}")
        if u in seen:
            raise CafiError(f"labels {redact_uri(uri)} line {line}: {u} is labelled twice (first on line {seen[u]})")
        seen[u] = line
        value = (row.get(label_column) or "").strip().lower()
        if value not in CLASSES:
            raise CafiError(f"labels {redact_uri(uri)} line {line}: {label_column} {value!r} is not one of "
                            f"{', '.join(CLASSES)}")
        uris.append(u)
        labels.append(CLASSES.index(value))
        ids.append((row.get(identity_column) or "").strip() or None if identity_column else None)
    if not uris:
        raise CafiError(f"labels: {redact_uri(uri)} has no rows")
    return pa.table({"uri": pa.array(uris, pa.string()), "label": pa.array(labels, pa.int64()),
                     "identity": pa.array(ids, pa.string())})


def _hand_features(batch: dict) -> dict:
    """Ray Data task: aligned faces -> their GIST, HOG and LBP (the CNN feature is the stored embedding)."""
    from cafi.classic import features

    feats = features.hand_crafted(batch["image"])
    return {"row": batch["row"].astype(np.int64), **feats}


def _embeddings(files: list[str], fs, uris: pa.Array) -> dict[str, np.ndarray]:
    """uri -> stored embedding (float32) of the labelled rows (a Ray Data read of two columns)."""
    import ray

    from cafi.manifest import latest_per_uri

    wanted = ray.put(uris)

    def select(table: pa.Table) -> pa.Table:
        keep = pc.and_(pc.is_in(table["uri"], value_set=ray.get(wanted)), pc.is_valid(table["embedding"]))
        return table.filter(keep)

    ds = ray.data.read_parquet(files, filesystem=fs, columns=["uri", "embedding", "scored_at"], partitioning=None)
    parts = [t for t in ds.map_batches(select, batch_format="pyarrow").iter_batches(batch_format="pyarrow",
                                                                                       batch_size=None) if t.num_rows]
    if not parts:
        return {}
    table = latest_per_uri(pa.concat_tables(parts))
    vectors = run_rows.vectors_of(table["embedding"]).astype(np.float32)
    return dict(zip(table["uri"].to_pylist(), vectors, strict=True))


def collect_features(source, labels: pa.Table, embeddings: dict[str, np.ndarray], storage) -> tuple[dict, np.ndarray]:
    """The four feature kinds of every labelled row the run can re-align and has an embedding for, and the
    indices (into `labels`) of those rows, in order."""
    from cafi.classic.features import KINDS
    from cafi.train import faces

    have = np.array([u in embeddings for u in labels["uri"].to_pylist()])
    targets = pa.table({"uri": labels["uri"], "row": pa.array(np.arange(labels.num_rows), pa.float32())})
    targets = targets.filter(pa.array(have))
    ds = faces.faces_dataset(source, targets, storage).map_batches(_hand_features, batch_format="numpy")
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    parts = [p for p in parts if len(p["row"])]
    if not parts:
        return {k: np.zeros((0, 0), np.float32) for k in KINDS}, np.zeros(0, np.int64)
    rows = np.concatenate([p["row"] for p in parts])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    feats = {k: np.concatenate([p[k] for p in parts])[order] for k in ("gist", "hog", "lbp")}
    uris = labels["uri"].to_pylist()
    feats["cnn"] = np.stack([embeddings[uris[r]] for r in rows]).astype(np.float32)
    return {k: feats[k] for k in KINDS}, rows


def train(labels_uri: str, run: str, out: str, uri_column: str = "uri", label_column: str = "label",
          identity_column: str | None = None, heldout: float = 0.2, settings=None,
          storage: StorageConfig | None = None) -> dict:
    """Train and write DIR/classic.pth, classic.yaml, train.json, train.html; returns train.json's content."""
    import os

    import ray

    from cafi.classic import features as feature_defs
    from cafi.classic import fit, gist
    from cafi.models import classic
    from cafi.train import faces, outputs
    from cafi.train.classic_page import render

    started = time.time()
    settings = settings or fit.FitSettings(holdout=heldout)
    if not 0.0 < settings.holdout < 1.0:
        raise CafiError(f"--heldout: {settings.holdout} is not a fraction in (0, 1)")
    labels = read_class_labels(labels_uri, storage, uri_column, label_column, identity_column)
    if protocol_of(out) == "file":  # object stores have no directories to make
        fs_out, out_path = filesystem(out, storage)
        fs_out.makedirs(out_path, exist_ok=True)
    ref, files = run_rows.run_files(run, storage)
    run_rows.require_column(ref, files, "landmarks", "landmarks", NO_LANDMARKS, storage)
    run_rows.require_column(ref, files, "embedding", "embeddings", NO_EMBEDDINGS, storage)
    recognizer = run_rows.embedding_model(ref, files, storage)
    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    embeddings = _embeddings(files, run_rows.arrow_fs(ref, storage), labels["uri"])
    feats, rows = collect_features(faces.face_source(ref, files, storage), labels, embeddings, storage)
    y = labels["label"].to_numpy()[rows]
    used = set(rows.tolist())
    missing = [u for i, u in enumerate(labels["uri"].to_pylist()) if i not in used]
    if len(rows) == 0:
        raise CafiError(f"none of the {labels.num_rows} labelled URIs is a face of run {ref.run_id} with an "
                        f"embedding and landmarks (e.g. {redact_uri(missing[0])})")
    counts = np.bincount(y, minlength=len(classic.CLASSES))
    if (counts < 2).any():
        raise CafiError("each class needs at least 2 labelled faces of the run (a training and a held-out one); "
                        f"found {dict(zip(classic.CLASSES, counts.tolist(), strict=True))}")
    ids = None
    if identity_column:  # a row without an identity is a group of its own
        given = labels["identity"].to_pylist()
        ids = np.array([given[r] if given[r] is not None else f"\0row{r}" for r in rows], dtype=object)
    train_idx, held_idx = fit.split(y, settings.holdout, settings.seed, groups=ids)
    net, history = fit.fit({k: v[train_idx] for k, v in feats.items()}, y[train_idx], settings)
    held_feats = {k: v[held_idx] for k, v in feats.items()}
    held = fit.evaluate(net, held_feats, y[held_idx])
    trained = fit.evaluate(net, {k: v[train_idx] for k, v in feats.items()}, y[train_idx])
    held_scores = classic.score_of(fit.predict(net, held_feats)) if len(held_idx) else np.zeros(0, np.float32)
    definition = {"kinds": list(feature_defs.KINDS), "dims": dict(feature_defs.DIMS),
                  "hog": {"orientations": feature_defs.HOG_ORIENTATIONS, "pixels_per_cell": feature_defs.HOG_CELL,
                          "cells_per_block": feature_defs.HOG_BLOCK, "block_norm": "L2-Hys",
                          "implementation": "scikit-image"},
                  "lbp": {"points": feature_defs.LBP_POINTS, "radius": feature_defs.LBP_RADIUS,
                          "method": "nri_uniform", "grid": feature_defs.LBP_GRID, "implementation": "scikit-image"},
                  "gist": {"image_size": gist.IMAGE_SIZE, "prefilter_fc": gist.PREFILTER_FC, "scales": gist.SCALES,
                           "orientations": gist.ORIENTATIONS, "blocks": gist.BLOCKS, "boundary": gist.BOUNDARY},
                  "cnn": {"source": "the run's stored embedding", "embedding_model": recognizer},
                  "code": classic.CODE, "joint": classic.JOINT}
    meta = {"features": definition, "embedding_model": recognizer, "run_id": ref.run_id,
            "model_version": ref.summary.get("model_version"), "settings": settings.as_dict()}
    pth = join(out, "classic.pth")
    digest = outputs.write_checkpoint(classic.checkpoint_object(net, meta), pth, storage)
    who = (f"{recognizer['stage']} {recognizer['arch']} (sha256 {recognizer['sha256'][:12]}...)" if recognizer
           else "the recognizer of the run it was trained on")
    block = outputs.write_weights_block(
        join(out, "classic.yaml"), "classic", pth, digest, storage,
        comment=f"the classic scorer: score with output.embeddings=true and models.fiqa.also: [classic] (or kind), "
                f"its embeddings from {who}")
    doc = {"labels": redact_uri(labels_uri), "run": redact_uri(ref.uri), "run_id": ref.run_id,
           "model_version": ref.summary.get("model_version"), "embedding_model": recognizer,
           "columns": {"uri": uri_column, "label": label_column, "identity": identity_column},
           "classes": list(classic.CLASSES),
           "rows": {"labelled": labels.num_rows, "used": int(len(rows)), "not_found": len(missing),
                    "not_found_examples": [redact_uri(u) for u in missing[:5]],
                    "per_class": dict(zip(classic.CLASSES, counts.tolist(), strict=True))},
           "split": {"by": "identity" if identity_column else "row", "stratified": True,
                     "heldout_fraction": settings.holdout, "train_rows": int(len(train_idx)),
                     "heldout_rows": int(len(held_idx))},
           "heldout_accuracy": held["accuracy"], "heldout": held, "train": trained,
           "heldout_score_by_class": {c: (float(held_scores[y[held_idx] == i].mean())
                                          if (y[held_idx] == i).any() else None)
                                      for i, c in enumerate(classic.CLASSES)},
           "features": definition, "settings": settings.as_dict(),
           "training": {"where": "the driver, plain torch (no Ray Train)", "optimizer": "Adam",
                        "stages": ["per-kind autoencoders (MSE)", "joint autoencoder (MSE)",
                                   "softmax layer (class-weighted cross-entropy)", "fine-tuning end to end (lr/10)"]},
           "losses": {k: [float(v) for v in vs] for k, vs in history.items()},
           "weights": block["models"]["classic"]["weights"] | {"uri": redact_uri(pth)},
           "seconds": round(time.time() - started, 1)}
    outputs.write_json(join(out, "train.json"), doc, storage)
    outputs.write_text(join(out, "train.html"), render(doc, held_scores, y[held_idx]), storage)
    return doc
