"""Finding and reading committed runs: what the report and `cafi eval` look at.

A run is `<output>/runs/<run_id>` with its summary and `_SUCCESS`; its rows are those of its own
run id and of the crashed attempts it took over (`includes_runs`), in its model version's
partition. The summary also says how the run decided (thresholds, which FIQA and IQA scorer)
and where its crops live (storage settings).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from cafi import manifest
from cafi.config import DecisionConfig, FusionConfig, ImageConfig, StorageConfig
from cafi.errors import CafiError
from cafi.redact import is_interpolation_text, redact_uri
from cafi.storage import filesystem

BATCH_ROWS = 16_384
DEFAULT_FIQA, DEFAULT_IQA = "serfiq", "dbcnn"  # what runs scored before the scorers became choices


@dataclass
class RunRef:
    output: str     # the output root (holds manifest/ and runs/)
    run_id: str
    uri: str        # <output>/runs/<run_id>
    summary: dict


def _split(uri: str) -> tuple[str, str]:
    base = uri.rstrip("/")
    if "/" not in base:
        return ".", base
    parent, name = base.rsplit("/", 1)
    if parent.endswith("://"):  # s3://bucket
        return parent + name, ""
    return (parent or "/"), name


def resolve_run(uri: str, storage: StorageConfig | None = None) -> RunRef:
    """A run URI (`<output>/runs/<run_id>`) or an output root (its latest committed run)."""
    fs, path = filesystem(uri, storage)
    parent, run_id = _split(uri)
    grand, runs_dir = _split(parent)
    if runs_dir == manifest.RUNS_DIR and run_id and fs.isdir(path):
        if not fs.exists(posixpath.join(path, manifest.SUCCESS)):
            raise CafiError(f"run {run_id} at {redact_uri(uri)} is not committed (no {manifest.SUCCESS}); "
                            "its rows are incomplete")
        with fs.open(posixpath.join(path, manifest.SUMMARY), "r") as fh:
            summary = json.load(fh)
        return RunRef(grand, run_id, uri.rstrip("/"), summary)
    if fs.isdir(posixpath.join(path, manifest.RUNS_DIR)) or fs.isdir(posixpath.join(path, manifest.MANIFEST_DIR)):
        runs = manifest.committed_runs(uri, storage)
        if not runs:
            raise CafiError(f"no committed run under {redact_uri(uri)}")
        latest = runs[-1]
        return RunRef(uri.rstrip("/"), latest["run_id"], manifest.run_uri(uri.rstrip("/"), latest["run_id"]),
                      latest)
    if not fs.exists(path):
        raise CafiError(f"{redact_uri(uri)} does not exist")
    raise CafiError(f"{redact_uri(uri)} is neither a run (<output>/runs/<run_id>) nor a cafi output root")


def run_ids(ref: RunRef) -> list[str]:
    """The run ids whose rows are this run's: its own and those of the attempts it resumed."""
    return sorted({ref.run_id, *(ref.summary.get("includes_runs") or [])})


def config_section(summary: dict, key: str) -> dict:
    """One section of the run's config. A value the summary holds as interpolation text (`${...}`: it
    is never written resolved, cafi/redact.py) is left out: the reader's default applies."""
    return _known_values((summary.get("config") or {}).get(key) or {})


def _known_values(section):
    if isinstance(section, dict):
        return {k: _known_values(v) for k, v in section.items() if not is_interpolation_text(v)}
    return section


def _known(cls: type, values: dict) -> dict:
    """The keys of `values` that are fields of the dataclass `cls` (a summary may be older or newer)."""
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


def decision_config(summary: dict) -> DecisionConfig:
    """The thresholds the run decided with; a key the summary lacks keeps its default (older runs)."""
    values = _known(DecisionConfig, config_section(summary, "decision"))
    if isinstance(values.get("fusion"), dict):
        values["fusion"] = FusionConfig(**_known(FusionConfig, values["fusion"]))
    return DecisionConfig(**values)


def storage_config(summary: dict) -> StorageConfig:
    """The storage settings the run read its crops with (endpoint, region, anon; never credentials)."""
    return StorageConfig(**{k: v for k, v in _known(StorageConfig, config_section(summary, "storage")).items()
                            if k in ("endpoint_url", "region", "anon")})


def image_config(summary: dict) -> ImageConfig:
    """The run's decoding limits, so thumbnails refuse what the run refused."""
    return ImageConfig(**{k: v for k, v in _known(ImageConfig, config_section(summary, "image")).items()
                          if k in ("max_pixels", "max_bytes")})


def sample_reads(summary: dict) -> dict:
    """How the run read its samples, for reading them again (cafi.inputs.samples.read_samples keywords):
    its image column, format, read limit and the URI schemes its input could name."""
    from types import SimpleNamespace

    from cafi.storage import allowed_schemes

    inp = config_section(summary, "input")
    schemes = allowed_schemes(SimpleNamespace(schemes=inp.get("schemes"), uri=inp.get("uri"),
                                              manifest=inp.get("manifest")))
    return {"image_column": inp.get("image_column") or "jpg", "input_format": inp.get("format"),
            "max_bytes": image_config(summary).max_bytes, "schemes": schemes}


def scorers(summary: dict) -> tuple[str, str]:
    """(FIQA column, IQA column) the run decided with: `models.fiqa.kind` and `models.iqa.kind`."""
    models = config_section(summary, "models")
    fiqa = (models.get("fiqa") or {}).get("kind") or DEFAULT_FIQA
    iqa = (models.get("iqa") or {}).get("kind") or DEFAULT_IQA
    return fiqa, iqa


def row_filter(ref: RunRef) -> pc.Expression:
    flt = pc.field("run_id").isin(run_ids(ref))
    version = ref.summary.get("model_version")
    if version:
        flt = flt & (pc.field("model_version") == version)  # prunes model_version= partitions
    return flt


def scan(ref: RunRef, storage: StorageConfig | None, cols: list[str],
         batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The run's rows, a few columns at a time: memory stays a few batches whatever the run's size."""
    scanner = manifest.dataset(ref.output, storage).scanner(
        columns=cols, filter=row_filter(ref), batch_size=batch_rows, batch_readahead=1, fragment_readahead=1,
        use_threads=False, fragment_scan_options=pds.ParquetFragmentScanOptions(pre_buffer=False))
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


@dataclass
class Rows:
    table: pa.Table
    source: str            # what was read, for the printout
    summary: dict          # the summary of the (latest) run: its decision config and scorers
    # with `embedding` read: the recognizers the read rows' embeddings came from (None: not recorded)
    embedding_models: list[dict | None] = dataclasses.field(default_factory=list)


def _embedding_models(output: str, storage: StorageConfig | None, files: pa.ChunkedArray) -> list[dict | None]:
    """The distinct recognizers recorded in the `embedding` field metadata of these manifest files."""
    import pyarrow.parquet as pq

    fs, _ = manifest.arrow_filesystem(manifest.manifest_uri(output), storage)
    found: dict[str, dict | None] = {}
    for path in pc.unique(files).to_pylist():
        model = manifest.embedding_model_of(pq.read_schema(path, filesystem=fs))
        found.setdefault(json.dumps(model, sort_keys=True), model)
    return list(found.values())


def read_rows(uri: str, storage: StorageConfig | None, cols: list[str], uris: pa.Array | None = None) -> Rows:
    """Rows of a run (`<output>/runs/<run_id>`), or of every committed run of an output root's latest
    model version, one per URI; only `uris` when given."""
    ref = resolve_run(uri, storage)
    version = ref.summary.get("model_version")
    if ref.uri.rstrip("/") != uri.rstrip("/"):  # an output root
        committed = [r for r in manifest.committed_runs(ref.output, storage) if r.get("model_version") == version]
        ids = sorted({i for r in committed for i in (r["run_id"], *(r.get("includes_runs") or []))})
        flt = pc.field("run_id").isin(ids) & (pc.field("model_version") == version)
        source = f"{redact_uri(uri)}: model version {version}, {len(committed)} committed run(s)"
    else:
        flt, source = row_filter(ref), f"run {ref.run_id} (model version {version})"
    if uris is not None:
        flt = flt & pc.field("uri").isin(uris)
    read = list(dict.fromkeys([*cols, "uri", "scored_at"]))
    if "embedding" in cols:  # which file each row comes from: the recognizer is recorded per file
        read.append("__filename")
    table = manifest.latest_per_uri(manifest.dataset(ref.output, storage).to_table(columns=read, filter=flt))
    models = []
    if "embedding" in cols:
        models = _embedding_models(ref.output, storage, table["__filename"].filter(pc.is_valid(table["embedding"])))
    return Rows(table.select(cols), source, ref.summary, models)
