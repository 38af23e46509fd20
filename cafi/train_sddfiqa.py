"""`cafi train sddfiqa RUN_OR_OUTPUT --identities IDS.csv --out DIR --labels-only`: SDD-FIQA pseudo-labels
of a committed run's rows, from the recognition embeddings the run stored (`output.embeddings=true`),
written to DIR/labels.parquet (uri, identity, label, n_same) and DIR/labels.json (where they came from and
their statistics). The identities come from a CSV (`uri` + `--identity-column`, default `identity`) or,
without --identities, from a column the run kept from its input (`--identity-column COL`).

The run's manifest files are read by Ray Data on the workers (cafi/sdd_job.py); the driver reads only
the identities CSV, the files' metadata, the pool sample and the labels it writes.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import manifest, runs, sdd_job, sdd_labels
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.redact import redact_uri
from cafi.storage import filesystem, join

log = logging.getLogger(__name__)

NO_EMBEDDINGS = ("stored no embeddings: SDD-FIQA pseudo-labels are computed from the run's recognition "
                 "embeddings; re-score with output.embeddings=true to store them")


def run_files(uri: str, storage: StorageConfig | None) -> tuple[runs.RunRef, list[str]]:
    """The run (or the output root's latest model version) and its manifest files."""
    ref = runs.resolve_run(uri, storage)
    version = ref.summary.get("model_version")
    if ref.uri.rstrip("/") != uri.rstrip("/"):  # an output root: every committed run of its latest version
        committed = [r for r in manifest.committed_runs(ref.output, storage) if r.get("model_version") == version]
        ids = {i for r in committed for i in (r["run_id"], *(r.get("includes_runs") or []))}
    else:
        ids = set(runs.run_ids(ref))
    files = [p for p, run_id in manifest.version_files(ref.output, version, storage) if run_id in ids]
    if not files:
        raise CafiError(f"{redact_uri(uri)} has no manifest files")
    return ref, files


def _embedded(meta) -> bool:
    """Whether a Parquet file may hold a non-null embedding (its statistics say; unknown counts as yes)."""
    leaf = [i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("embedding.")]
    if not leaf:
        return False
    for g in range(meta.num_row_groups):
        col = meta.row_group(g).column(leaf[0])
        st = col.statistics
        if st is None or not st.has_null_count or st.null_count < col.num_values:
            return True
    return False


def check_embeddings(ref: runs.RunRef, files: list[str], storage: StorageConfig | None) -> dict | None:
    """Stop early (metadata only) when the run stored no embeddings; the one recognizer they come from."""
    import pyarrow.parquet as pq

    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)
    if not any(_embedded(pq.ParquetFile(p, filesystem=fs).metadata) for p in files):
        raise CafiError(f"run {ref.run_id} {NO_EMBEDDINGS}")
    found = {}
    for p in files:  # the recognizer each file records in its `embedding` field metadata
        model = manifest.embedding_model_of(pq.read_schema(p, filesystem=fs))
        if model is not None:
            found.setdefault(json.dumps(model, sort_keys=True), model)
    models = list(found.values())
    if len(models) > 1:
        raise CafiError(f"the embeddings of run {ref.run_id} come from {len(models)} recognizers: pseudo-labels "
                        "compare pairs of one recognizer")
    return models[0] if models else None


def _with_identity(table: pa.Table, ids: pa.Table | None, kept: str | None) -> pa.Table:
    """The batch's rows with an embedding and an identity (from the CSV, or the kept column)."""
    if ids is not None:
        pos = pc.index_in(table["uri"], value_set=ids["uri"])
        identity = ids["identity"].take(pos)
    else:
        identity = pc.cast(table[kept], pa.string())
    keep = pc.and_(pc.is_valid(identity), pc.is_valid(table["embedding"]))
    return pa.table({"uri": table["uri"], "identity": identity, "embedding": table["embedding"],
                     "scored_at": table["scored_at"]}).filter(keep)


def labels(uri: str, out: str, identities: str | None = None, identity_column: str = "identity",
           seed: int = 0, storage: StorageConfig | None = None) -> dict:
    """Compute and write DIR/labels.parquet and DIR/labels.json; returns the latter's content."""
    from cafi.eval_inputs import read_identities

    started = time.time()
    ref, files = run_files(uri, storage)
    recognizer = check_embeddings(ref, files, storage)
    ids = read_identities(identities, storage, identity_column) if identities else None
    kept = None
    if ids is None:
        kept = identity_column
        names = manifest.kept_columns([ref.summary]).names
        if kept not in names:
            raise CafiError(f"run {ref.run_id} kept no column {kept!r} (kept: {names or 'none'}): give "
                            "--identities IDS.csv or the kept column holding the identity")
    import ray

    if not ray.is_initialized():
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=True)
    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)
    cols = ["uri", "embedding", "scored_at", *([kept] if kept else [])]
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols, partitioning=None)
    ids_ref = ray.put(ids) if ids is not None else None
    ds = ds.map_batches(_select, fn_kwargs={"ids": ids_ref, "kept": kept}, batch_format="pyarrow")
    n_estimate = sum(pq_rows(p, fs) for p in files)
    if ids is not None:
        n_estimate = min(n_estimate, ids.num_rows)
    result = sdd_job.pseudo_labels(ds, n_estimate, seed)
    stats = sdd_job.write_labels(result, join(out, "labels.parquet"), storage)
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
                                  f"sample of up to {sdd_job.POOL} rows of the set"},
           "labels": stats, "seconds": round(time.time() - started, 1)}
    write_json(join(out, "labels.json"), doc, storage)
    return doc


def _select(table: pa.Table, ids, kept: str | None) -> pa.Table:
    import ray

    return _with_identity(table, ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids, kept)


def pq_rows(path: str, fs) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def write_json(uri: str, doc: dict, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "w") as fh:
        json.dump(doc, fh, indent=2, default=float)


# ---------------------------------------------------------------- training (cafi/sdd_train.py)

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
        fs, path = filesystem(init, storage)
        with tempfile_copy(fs, path) as local:
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


class tempfile_copy:
    """A local path to a file of any filesystem (the file itself when local)."""

    def __init__(self, fs, path: str):
        self.fs, self.path, self.tmp = fs, path, None

    def __enter__(self) -> str:
        import tempfile

        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            return self.path
        self.tmp = tempfile.NamedTemporaryFile(suffix=".pth", delete=False)
        self.tmp.close()
        self.fs.get(self.path, self.tmp.name)
        return self.tmp.name

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            os.remove(self.tmp.name)


def train(uri: str, out: str, identities: str | None = None, identity_column: str = "identity", seed: int = 0,
          epochs: int = 10, batch_size: int = 64, workers: int = 1, use_gpu: bool = False, init: str | None = None,
          lr: float = 1e-3, heldout: float = 0.1, width: int | None = None, units: tuple[int, ...] | None = None,
          storage: StorageConfig | None = None) -> dict:
    """Labels (as `labels`), then the regressor trained on them; writes DIR/sddfiqa.pth, sddfiqa.yaml,
    train.json, train.html. Returns train.json's content."""
    import pyarrow.parquet as pq
    import torch
    import yaml

    from cafi import sdd_train, sdd_train_page
    from cafi.config import ImageConfig
    from cafi.models.sddfiqa import IR50_UNITS, IR50_WIDTH
    from cafi.runs import config_section, sample_reads
    from cafi.weights import sha256_of

    started = time.time()
    width, units = width or IR50_WIDTH, tuple(units or IR50_UNITS)
    published_layout = (width, units) == (IR50_WIDTH, IR50_UNITS)
    label_doc = _earlier_labels(uri, out, identities, identity_column, seed, storage)
    if label_doc is None:
        label_doc = labels(uri, out, identities=identities, identity_column=identity_column, seed=seed,
                           storage=storage)
    else:  # a training started again (resumed): the labels it trained on, not new ones
        log.info("sddfiqa training: using the labels in %s (same run, identities and seed)", redact_uri(out))
    ref, files = run_files(uri, storage)
    fs_out, labels_path = filesystem(join(out, "labels.parquet"), storage)
    with fs_out.open(labels_path, "rb") as fh:
        table = pq.read_table(fh, columns=["uri", "identity", "label"])
    table = table.filter(pc.is_valid(table["label"]))
    held = sdd_train.split_identities(table["identity"].to_numpy(zero_copy_only=False), heldout, seed)
    is_held = pc.is_in(table["identity"], value_set=pa.array(sorted(held)))
    val_labels, train_labels = table.filter(is_held), table.filter(pc.invert(is_held))
    models_cfg = config_section(ref.summary, "models")
    cache_dir = os.path.expanduser(models_cfg.get("cache_dir") or "~/.cache/cafi/weights")
    init_state, init_doc = _init_state(init, ref.summary, width, units, cache_dir, storage)
    if init_doc["source"] == "random":
        log.warning("sddfiqa training: %s", init_doc["note"])
    image = config_section(ref.summary, "image")
    image_cfg = ImageConfig(**{k: image[k] for k in ("crop_size", "max_pixels", "max_bytes") if k in image})
    align = (models_cfg.get("detector") or {}).get("align") or "arcface"
    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(ref.output), storage)
    reads = sample_reads(ref.summary)
    train_ds, val_ds = (sdd_train.cached(sdd_train.faces_dataset(files, fs, t.select(["uri", "label"]), reads,
                                                                image_cfg, align, storage), t.num_rows)
                        for t in (train_labels, val_labels))
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "width": width, "units": list(units),
              "init_state": init_state}
    result = sdd_train.fit(train_ds, val_ds, config, out, workers, use_gpu)
    if result.checkpoint is None:
        raise CafiError(f"training wrote no checkpoint under {redact_uri(sdd_train.ray_storage(out))}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, sdd_train.STATE_FILE), map_location="cpu", weights_only=True)
        with np.load(os.path.join(d, sdd_train.HELDOUT_FILE)) as z:
            pred, lab = z["pred"], z["label"]
    with tempfile_copy_out() as local:
        torch.save(published_state(state["model"]), local)
        digest = sha256_of(local)
        put(local, join(out, "sddfiqa.pth"), storage)
    pth = join(out, "sddfiqa.pth")
    block = {"models": {"sddfiqa": {"weights": {"uri": pth, "sha256": digest}}}}
    fs_y, path_y = filesystem(join(out, "sddfiqa.yaml"), storage)
    with fs_y.open(path_y, "w") as fh:
        if not published_layout:
            fh.write(f"# a reduced net (width {width}, units {list(units)}) for tests and benches: the sddfiqa "
                     "stage loads only the published IR-50 layout\n")
        yaml.safe_dump(block, fh, sort_keys=False)
    history = state["history"]
    doc = {"run": label_doc["run"], "run_id": label_doc["run_id"], "model_version": label_doc["model_version"],
           "identities_file": label_doc["identities_file"], "identity_column": identity_column,
           "identity_source": label_doc["identity_source"], "embedding_model": label_doc["embedding_model"],
           "seed": seed, "labels": label_doc["labels"],
           "split": {"by": "identity", "heldout_fraction": heldout, "heldout_identities": len(held),
                     "train_rows": train_labels.num_rows, "heldout_rows": val_labels.num_rows},
           "init": init_doc,
           "arch": {"name": "sddfiqa_ir50" if published_layout else "sddfiqa_ir (reduced)", "width": width,
                    "units": list(units), "published_layout": published_layout},
           "training": {"loss": "SmoothL1", "optimizer": "Adam", "lr": lr,
                        "lr_schedule": "half cosine to lr/20 over the epochs", "batch_size": batch_size,
                        "augmentation": "random horizontal flip", "workers": workers, "use_gpu": use_gpu,
                        "epochs": epochs, "epochs_done": int(state["epoch"])},
           "epochs": history, "heldout_srcc": history[-1]["heldout_srcc"] if history else None,
           "weights": block["models"]["sddfiqa"]["weights"] | {"uri": redact_uri(pth)},
           "seconds": round(time.time() - started, 1)}
    write_json(join(out, "train.json"), doc, storage)
    fs_h, path_h = filesystem(join(out, "train.html"), storage)
    with fs_h.open(path_h, "w") as fh:
        fh.write(sdd_train_page.render(doc, pred, lab))
    return doc


def _earlier_labels(uri: str, out: str, identities: str | None, identity_column: str, seed: int,
                    storage: StorageConfig | None) -> dict | None:
    """DIR/labels.json when DIR already holds the labels of this run, identities and seed."""
    fs, path = filesystem(join(out, "labels.json"), storage)
    if not fs.exists(path) or not fs.exists(filesystem(join(out, "labels.parquet"), storage)[1]):
        return None
    with fs.open(path, "r") as fh:
        doc = json.load(fh)
    ref = runs.resolve_run(uri, storage)
    same = (doc.get("run") == redact_uri(ref.uri) and doc.get("run_id") == ref.run_id and doc.get("seed") == seed
            and doc.get("identities_file") == (redact_uri(identities) if identities else None)
            and doc.get("identity_column") == identity_column)
    return doc if same else None


def published_state(state: dict) -> dict:
    """The published file's layout: net.state_dict() of a DataParallel-wrapped net (`module.` before each key)."""
    return {f"module.{k}": v for k, v in state.items()}


class tempfile_copy_out:
    """A local temporary file path, removed afterwards."""

    def __enter__(self) -> str:
        import tempfile

        fd, self.path = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        return self.path

    def __exit__(self, *exc) -> None:
        os.remove(self.path)


def put(local: str, uri: str, storage: StorageConfig | None) -> None:
    fs, path = filesystem(uri, storage)
    with open(local, "rb") as src, fs.open(path, "wb") as dst:
        for chunk in iter(lambda: src.read(8 << 20), b""):
            dst.write(chunk)
