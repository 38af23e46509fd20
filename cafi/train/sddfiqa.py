"""`cafi train sddfiqa RUN_OR_OUTPUT --identities IDS.csv --out DIR --labels-only`: SDD-FIQA pseudo-labels
of a committed run's rows, from the recognition embeddings the run stored (`output.embeddings=true`),
written to DIR/labels.parquet (uri, identity, label, n_same) and DIR/labels.json (where they came from and
their statistics). The identities come from a CSV (`uri` + `--identity-column`, default `identity`) or,
without --identities, from a column the run kept from its input (`--identity-column COL`).

Without --labels-only, the regressor (TFace's IR-50, or with --backbone maniqa the seed team's MANIQA in its
place) is then trained on them (cafi/train/sdd_fit.py) over faces re-aligned from the run's landmarks
(cafi/train/faces.py), held-out identities apart (cafi/train/split.py), and DIR/sddfiqa.pth, sddfiqa.yaml,
train.json, train.html, heldout.csv are written (cafi/train/outputs.py, sdd_page.py).

The run's manifest files are read by Ray Data on the workers (cafi/train/sdd_label_job.py); the driver
reads only the identities CSV, the files' metadata, the pool sample and the labels it writes.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import runs
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.redact import redact_uri
from cafi.storage import join
from cafi.train import run_rows, sdd_label_job, sdd_labels
from cafi.train.outputs import local_copy, read_json, write_json

log = logging.getLogger(__name__)

NO_EMBEDDINGS = ("SDD-FIQA pseudo-labels are computed from the run's recognition embeddings; re-score with "
                 "output.embeddings=true to store them")
NO_LANDMARKS = "training re-aligns each face from the landmarks the run stored"


def _select(table: pa.Table, ids, kept: str | None) -> pa.Table:
    import ray

    ids = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids
    return run_rows.with_identity(table, ids, kept, ["uri", "embedding", "scored_at"])


def labels(uri: str, out: str, identities: str | None = None, identity_column: str = "identity",
           seed: int = 0, storage: StorageConfig | None = None) -> dict:
    """Compute and write DIR/labels.parquet and DIR/labels.json; returns the latter's content."""
    started = time.time()
    ref, files = run_rows.run_files(uri, storage)
    run_rows.require_column(ref, files, "embedding", "embeddings", NO_EMBEDDINGS, storage)
    recognizer = run_rows.embedding_model(ref, files, storage)
    ids, kept = run_rows.identity_source(ref, identities, identity_column, storage)
    import ray

    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    fs = run_rows.arrow_fs(ref, storage)
    cols = ["uri", "embedding", "scored_at", *([kept] if kept else [])]
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols, partitioning=None)
    ids_ref = ray.put(ids) if ids is not None else None
    ds = ds.map_batches(_select, fn_kwargs={"ids": ids_ref, "kept": kept}, batch_format="pyarrow")
    n_estimate = sum(run_rows.file_rows(p, fs) for p in files)
    if ids is not None:
        n_estimate = min(n_estimate, ids.num_rows)
    result = sdd_label_job.pseudo_labels(ds, n_estimate, seed)
    stats = sdd_label_job.write_labels(result, join(out, "labels.parquet"), storage)
    if stats["rows"] == 0:
        raise CafiError(f"none of the rows of run {ref.run_id} with an embedding has an identity")
    doc = {"run": redact_uri(ref.uri), "run_id": ref.run_id, "model_version": ref.summary.get("model_version"),
           "identities_file": redact_uri(identities) if identities else None,
           "identity_column": identity_column, "identity_source": "csv" if ids is not None else "kept column",
           "listed": ids.num_rows if ids is not None else None, "embedding_model": recognizer, "seed": seed,
           "definition": {"same_identity_draws": sdd_labels.SAME, "other_identity_draws": sdd_labels.OTHER,
                          "repeats": sdd_labels.REPEATS, "distance": "1-D Wasserstein",
                          "normalisation": "each draw min-max scaled to 0..100 over the set, then averaged",
                          "pool": f"other identities drawn from a random slice of {sdd_labels.SUBPOOL} of a seeded "
                                  f"sample of up to {sdd_label_job.POOL} rows of the set"},
           "labels": stats, "seconds": round(time.time() - started, 1)}
    write_json(join(out, "labels.json"), doc, storage)
    return doc


# ---------------------------------------------------------------- training (cafi/train/sdd_fit.py)

def _init_state(init: str | None, summary: dict, width: int, units: tuple[int, ...], cache_dir: str,
                storage: StorageConfig | None) -> tuple[dict | None, dict]:
    """The weights training starts from and where they came from: --init PATH, else the SDD-FIQA weights
    the run's config names (the published checkpoint, when configured), else random initialisation."""
    from cafi.models import sddfiqa
    from cafi.models.registry import published
    from cafi.runs import config_section
    from cafi.weights import Checkpoint, load_into, sha256_of

    record = published("sddfiqa_ir50")
    layout = {"state_key": record.state_key, "strip_prefixes": record.strip_prefixes,
              "drop_prefixes": record.drop_prefixes}
    configured = ((config_section(summary, "models").get("sddfiqa") or {}).get("weights") or {})
    if init:
        with local_copy(init, storage) as local:
            ckpt = Checkpoint(model="--init", uri=local, sha256=sha256_of(local), **layout)
            net = load_into(sddfiqa.build(width, units), ckpt, cache_dir, storage)
        return net.state_dict(), {"source": "--init", "uri": redact_uri(init), "sha256": ckpt.sha256}
    if configured.get("uri") and configured.get("sha256") and not configured.get("synthetic"):
        ckpt = Checkpoint(model="sddfiqa", uri=configured["uri"], sha256=configured["sha256"].lower(), **layout)
        net = load_into(sddfiqa.build(width, units), ckpt, cache_dir, storage)
        return net.state_dict(), {"source": "the run's models.sddfiqa.weights", "uri": redact_uri(ckpt.uri),
                                  "sha256": ckpt.sha256}
    return None, {"source": "random", "uri": None, "sha256": None,
                  "note": "no --init and no SDD-FIQA weights in the run's config: the regressor starts from "
                          "random initialisation (TFace starts from its recognition model's weights)"}


# --backbone -> the sddfiqa arch it trains (maniqa_tiny: toy widths, for tests)
BACKBONES = {"ir50": "sddfiqa_ir50", "maniqa": "sddfiqa_maniqa", "maniqa_tiny": "sddfiqa_maniqa_tiny"}


def _maniqa_init(init: str | None, summary: dict, arch: str, cache_dir: str,
                 storage: StorageConfig | None) -> tuple[dict | None, dict]:
    """The MANIQA-backbone regressor's starting weights: --init PATH (a MANIQA state dict), else the run's
    own MANIQA-backbone SDD-FIQA weights, else the MANIQA IQA weights the run's config names (pyiqa's
    KonIQ-10k MANIQA: the seed team fine-tuned the IQA network), else random initialisation."""
    from cafi.models import maniqa
    from cafi.models.registry import published
    from cafi.runs import config_section
    from cafi.weights import Checkpoint, load_into, sha256_of

    record = published(arch)
    layout = {"state_key": record.state_key, "strip_prefixes": record.strip_prefixes,
              "drop_prefixes": record.drop_prefixes}
    if init:
        with local_copy(init, storage) as local:
            ckpt = Checkpoint(model="--init", uri=local, sha256=sha256_of(local), **layout)
            net = load_into(maniqa.build_regressor(arch), ckpt, cache_dir, storage)
        return net.state_dict(), {"source": "--init", "uri": redact_uri(init), "sha256": ckpt.sha256}
    models = config_section(summary, "models")
    for section, default in (("sddfiqa", "sddfiqa_ir50"), ("maniqa", "maniqa_koniq")):
        cfg = models.get(section) or {}
        weights = cfg.get("weights") or {}
        fits = maniqa.DIMS.get(cfg.get("arch") or default) == maniqa.DIMS[arch]
        if fits and weights.get("uri") and weights.get("sha256") and not weights.get("synthetic"):
            ckpt = Checkpoint(model=section, uri=weights["uri"], sha256=weights["sha256"].lower(), **layout)
            net = load_into(maniqa.build_regressor(arch), ckpt, cache_dir, storage)
            return net.state_dict(), {"source": f"the run's models.{section}.weights", "uri": redact_uri(ckpt.uri),
                                      "sha256": ckpt.sha256}
    return None, {"source": "random", "uri": None, "sha256": None,
                  "note": "no --init and no MANIQA weights in the run's config: the regressor starts from random "
                          "initialisation (the seed team started from MANIQA's KonIQ-10k weights)"}


def train(uri: str, out: str, identities: str | None = None, identity_column: str = "identity", seed: int = 0,
          epochs: int = 10, batch_size: int = 64, workers: int = 1, use_gpu: bool = False, init: str | None = None,
          lr: float = 1e-3, heldout: float = 0.1, width: int | None = None, units: tuple[int, ...] | None = None,
          storage: StorageConfig | None = None, backbone: str = "ir50") -> dict:
    """Labels (as `labels`), then the regressor trained on them; writes DIR/sddfiqa.pth, sddfiqa.yaml,
    train.json, train.html and heldout.csv (the held-out identities' rows, as `cafi eval --identities`
    reads them). Returns train.json's content. `backbone` ir50 (TFace's regressor; `width` and `units`
    reduce it for tests) or maniqa (MANIQA in its place, its checkpoint in MANIQA's layout)."""
    import pyarrow.parquet as pq
    import torch

    from cafi.models.sddfiqa import IR50_UNITS, IR50_WIDTH
    from cafi.runs import config_section
    from cafi.storage import filesystem
    from cafi.train import faces, outputs, sdd_fit, sdd_page, split

    started = time.time()
    if backbone not in BACKBONES:
        raise CafiError(f"--backbone: {backbone!r} is not one of {', '.join(BACKBONES)}")
    arch = BACKBONES[backbone]
    width, units = width or IR50_WIDTH, tuple(units or IR50_UNITS)
    published_layout = (width, units) == (IR50_WIDTH, IR50_UNITS) and backbone in ("ir50", "maniqa")
    ref, files = run_rows.run_files(uri, storage)
    run_rows.require_column(ref, files, "landmarks", "landmarks", NO_LANDMARKS, storage)
    label_doc = _earlier_labels(uri, out, identities, identity_column, seed, storage)
    if label_doc is None:
        label_doc = labels(uri, out, identities=identities, identity_column=identity_column, seed=seed,
                           storage=storage)
    else:  # a training started again (resumed): the labels it trained on, not new ones
        log.info("sddfiqa training: using the labels in %s (same run, identities and seed)", redact_uri(out))
    fs_out, labels_path = filesystem(join(out, "labels.parquet"), storage)
    with fs_out.open(labels_path, "rb") as fh:
        table = pq.read_table(fh, columns=["uri", "identity", "label"])
    table = table.filter(pc.is_valid(table["label"]))
    train_labels, val_labels, held = split.split_table(table, heldout, seed)
    models_cfg = config_section(ref.summary, "models")
    cache_dir = os.path.expanduser(models_cfg.get("cache_dir") or "~/.cache/cafi/weights")
    if backbone == "ir50":
        init_state, init_doc = _init_state(init, ref.summary, width, units, cache_dir, storage)
    else:
        init_state, init_doc = _maniqa_init(init, ref.summary, arch, cache_dir, storage)
    if init_doc["source"] == "random":
        log.warning("sddfiqa training: %s", init_doc["note"])
    source = faces.face_source(ref, files, storage)
    train_ds, val_ds = (faces.cached(faces.faces_dataset(source, t.select(["uri", "label"]), storage), t.num_rows)
                        for t in (train_labels, val_labels))
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "width": width, "units": list(units),
              "init_state": init_state, "backbone": "ir50" if backbone == "ir50" else arch,
              "train_rows": train_labels.num_rows, "workers": workers}
    result = sdd_fit.fit(train_ds, val_ds, config, out, workers, use_gpu)
    if result.checkpoint is None:
        raise CafiError(f"training wrote no checkpoint under {redact_uri(outputs.ray_storage(out))}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, sdd_fit.STATE_FILE), map_location="cpu", weights_only=True)
        with np.load(os.path.join(d, sdd_fit.HELDOUT_FILE)) as z:
            pred, lab = z["pred"], z["label"]
    pth = join(out, "sddfiqa.pth")
    # IR-50: TFace's DataParallel layout; MANIQA: its own bare state dict (as pyiqa's ckpt_koniq10k.pt)
    digest = outputs.write_checkpoint(published_state(state["model"]) if backbone == "ir50" else state["model"],
                                      pth, storage)
    reduced = f"width {width}, units {list(units)}" if backbone == "ir50" else "MANIQA at toy widths"
    block = outputs.write_weights_block(
        join(out, "sddfiqa.yaml"), "sddfiqa", pth, digest, storage,
        comment=None if published_layout else f"a reduced net ({reduced}) for tests and benches",
        settings=None if backbone == "ir50" else {"arch": arch})
    history = state["history"]
    doc = {"run": label_doc["run"], "run_id": label_doc["run_id"], "model_version": label_doc["model_version"],
           "identities_file": label_doc["identities_file"], "identity_column": identity_column,
           "identity_source": label_doc["identity_source"], "embedding_model": label_doc["embedding_model"],
           "seed": seed, "labels": label_doc["labels"],
           "split": {"by": "identity", "heldout_fraction": heldout, "heldout_identities": len(held),
                     "train_rows": train_labels.num_rows, "heldout_rows": val_labels.num_rows,
                     "heldout_csv": redact_uri(join(out, "heldout.csv"))},
           "init": init_doc,
           "arch": ({"name": "sddfiqa_ir50" if published_layout else "sddfiqa_ir (reduced)", "width": width,
                     "units": list(units), "published_layout": published_layout} if backbone == "ir50" else
                    {"name": arch, "backbone": "MANIQA (pyiqa maniqa_arch layout)",
                     "published_layout": published_layout,
                     "input": "the aligned 112x112 face scaled bilinearly to one ViT crop"}),
           "training": {"loss": "SmoothL1", "optimizer": "Adam", "lr": lr,
                        "lr_schedule": "half cosine to lr/20 over the epochs", "batch_size": batch_size,
                        "augmentation": "random horizontal flip", "workers": workers, "use_gpu": use_gpu,
                        "epochs": epochs, "epochs_done": int(state["epoch"])},
           "epochs": history, "heldout_srcc": history[-1]["heldout_srcc"] if history else None,
           "weights": block["models"]["sddfiqa"]["weights"] | {"uri": redact_uri(pth)},
           "seconds": round(time.time() - started, 1)}
    write_json(join(out, "train.json"), doc, storage)
    outputs.write_text(join(out, "train.html"), sdd_page.render(doc, pred, lab), storage)
    # every labelled row of the held-out identities, for `cafi eval RUN --identities DIR/heldout.csv`
    outputs.write_identities_csv(join(out, "heldout.csv"), val_labels["uri"].to_pylist(),
                                 val_labels["identity"].to_pylist(), storage)
    return doc


def _earlier_labels(uri: str, out: str, identities: str | None, identity_column: str, seed: int,
                    storage: StorageConfig | None) -> dict | None:
    """DIR/labels.json when DIR already holds the labels of this run, identities and seed."""
    from cafi.storage import filesystem

    doc = read_json(join(out, "labels.json"), storage)
    fs, path = filesystem(join(out, "labels.parquet"), storage)
    if doc is None or not fs.exists(path):
        return None
    ref = runs.resolve_run(uri, storage)
    same = (doc.get("run") == redact_uri(ref.uri) and doc.get("run_id") == ref.run_id and doc.get("seed") == seed
            and doc.get("identities_file") == (redact_uri(identities) if identities else None)
            and doc.get("identity_column") == identity_column)
    return doc if same else None


def published_state(state: dict) -> dict:
    """The published file's layout: net.state_dict() of a DataParallel-wrapped net (`module.` before each key)."""
    return {f"module.{k}": v for k, v in state.items()}
