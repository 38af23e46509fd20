"""The one config schema for a cafi job.

Every key is documented once, in configs/default.yaml; this module holds the types, the
defaults and the checks. Configs compose left to right (`--config a.yaml --config b.yaml`)
and dotlist overrides (`models.dbcnn.batch_size=64`) come last.

A leaf module: it imports nothing of the models or stages. The checks that need their tables (parser
labels, published checkpoints) are the stages' own (cafi.stages.specs.validate). The loaded config is
immutable (frozen dataclasses); the same object reaches every Ray worker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cafi import fusion
from cafi.errors import ConfigError


@dataclass(frozen=True)
class WeightsConfig:
    uri: str = MISSING
    sha256: str = MISSING
    # Set by `cafi weights synth`: scores made with these weights are marked synthetic.
    synthetic: bool = False


@dataclass(frozen=True)
class StageConfig:
    """Where and how a model stage runs. Shared by the four model stages."""

    batch_size: int = 8
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    min_actors: int = 1
    max_actors: int = 1
    # Torch intra-op threads per actor; 0 = max(1, round(num_cpus)); -1 = every CPU of the node.
    torch_threads: int = -1


@dataclass(frozen=True)
class DetectorConfig(StageConfig):
    arch: str = "retinaface_resnet50"
    align: str = "retinaface"
    conf_threshold: float = 0.8
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class ParserConfig(StageConfig):
    arch: str = "bisenet"
    input_size: int = 512
    face_labels: list[str] = field(
        default_factory=lambda: [
            "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip",
        ]
    )
    fill: list[int] = field(default_factory=lambda: [0, 0, 0])
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class SerfiqConfig(StageConfig):
    family: ClassVar[str] = "fiqa"  # a scorer section: its name is a models.fiqa kind

    arch: str = "arcface_ir_se50"  # arcface_ir_se50 (facexlib's weights) | arcface_ir_se50_tiny (tests)
    samples: int = 100
    dropout: float = 0.5
    alpha: float = 130.0
    r: float = 0.88
    seed: int = 0
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class MagfaceConfig(StageConfig):
    family: ClassVar[str] = "fiqa"

    # OFIQ's unified quality score (0..100) instead of the raw embedding norm (decision time).
    ofiq_mapping: bool = False
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class CrfiqaConfig(StageConfig):
    family: ClassVar[str] = "fiqa"

    # crfiqa_iresnet100 (CR-FIQA(L), MS1MV2) | crfiqa_iresnet50 (CR-FIQA(S), CASIA-WebFace)
    arch: str = "crfiqa_iresnet100"
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class SddfiqaConfig(StageConfig):
    family: ClassVar[str] = "fiqa"

    # sddfiqa_ir50 (TFace's regressor) | sddfiqa_maniqa (MANIQA in its place: cafi train sddfiqa --backbone
    # maniqa) | sddfiqa_maniqa_tiny (tests)
    arch: str = "sddfiqa_ir50"
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class ClassicConfig(StageConfig):
    family: ClassVar[str] = "fiqa"

    # No published weights: the checkpoint `cafi train classic` wrote (its DIR/classic.yaml block).
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class TopiqFaceConfig(StageConfig):
    family: ClassVar[str] = "iqa"

    # Score the masked face; false (default) = the FFHQ-aligned face as TOPIQ-face was trained on.
    masked: bool = False
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class DbcnnConfig(StageConfig):
    family: ClassVar[str] = "iqa"

    arch: str = "dbcnn"  # dbcnn (pyiqa's KonIQ-10k weights) | dbcnn_tiny (tests)
    # Score the masked face (background replaced by models.parser.fill): the CAFI method.
    masked: bool = True
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class ManiqaConfig(StageConfig):
    family: ClassVar[str] = "iqa"

    arch: str = "maniqa_koniq"  # maniqa_koniq (pyiqa's KonIQ-10k weights) | maniqa_tiny (tests)
    # Score the masked face (background replaced by models.parser.fill), as DBCNN does.
    masked: bool = True
    # Test-time crops per face (pyiqa's test_sample): their tokens' weighted scores are pooled.
    crops: int = 20
    batch_size: int = 2
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class MusiqConfig(StageConfig):
    family: ClassVar[str] = "iqa"

    arch: str = "musiq_koniq"  # musiq_koniq (pyiqa's KonIQ-10k weights) | musiq_tiny (tests)
    masked: bool = True
    weights: WeightsConfig | None = None


@dataclass(frozen=True)
class ScorerChoice:
    """Which scorer of a family the decision uses (`kind`), and extra ones to compute beside it."""

    kind: str = MISSING
    also: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelsConfig:
    # auto: CUDA in actors that hold a GPU, CPU elsewhere.
    device: str = "auto"
    # fp32 | fp16 | bf16; autocast applies on CUDA only.
    precision: str = "fp32"
    # torch.compile the model forwards (pays compile time once per actor and batch size).
    compile: bool = False
    cache_dir: str = "~/.cache/cafi/weights"
    fiqa: ScorerChoice = field(default_factory=lambda: ScorerChoice(kind="serfiq"))
    iqa: ScorerChoice = field(default_factory=lambda: ScorerChoice(kind="dbcnn"))
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    parser: ParserConfig = field(default_factory=ParserConfig)
    serfiq: SerfiqConfig = field(default_factory=SerfiqConfig)
    magface: MagfaceConfig = field(default_factory=MagfaceConfig)
    crfiqa: CrfiqaConfig = field(default_factory=CrfiqaConfig)
    sddfiqa: SddfiqaConfig = field(default_factory=SddfiqaConfig)
    classic: ClassicConfig = field(default_factory=ClassicConfig)
    dbcnn: DbcnnConfig = field(default_factory=DbcnnConfig)
    topiq_face: TopiqFaceConfig = field(default_factory=TopiqFaceConfig)
    maniqa: ManiqaConfig = field(default_factory=ManiqaConfig)
    musiq: MusiqConfig = field(default_factory=MusiqConfig)


@dataclass(frozen=True)
class InputConfig:
    uri: str | None = None
    manifest: str | None = None
    uri_column: str = "uri"
    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"]
    )
    limit: int | None = None
    # files | webdataset | parquet: one object per crop, or shards of many (cafi/inputs/).
    format: str = "files"
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"])
    image_column: str = "jpg"
    key_column: str | None = "key"
    keep_columns: list[str] = field(default_factory=list)
    shard_buffer_mb: int = 256
    # URI schemes an input may name (a manifest's rows, a listing's objects); null: the input's own.
    schemes: list[str] | None = None


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    # Seconds a throttled or dropped read or write of one object keeps being retried (cafi/fetch.py).
    retry_budget_s: float = 300.0


@dataclass(frozen=True)
class ImageConfig:
    crop_size: int = 384
    min_side: int = 32
    max_pixels: int = 40_000_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class FusionConfig:
    """The fused score (cafi/fusion.py): column -> weight, and [low, high] ranges for columns without a
    documented one (or to replace it)."""

    weights: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class DecisionConfig:
    """Thresholds of the decision rules (cafi/decision.py); null turns a rule off."""

    min_serfiq: float = 0.3
    min_magface: float | None = None
    min_crfiqa: float | None = None
    min_sddfiqa: float | None = None
    min_classic: float | None = None
    min_mask_fraction: float = 0.05
    min_dbcnn: float | None = None
    min_topiq_face: float | None = None
    min_maniqa: float | None = None
    min_musiq: float | None = None
    max_yaw: float | None = None
    max_pitch: float | None = None
    min_inter_eye_px: float | None = None
    min_sharpness: float | None = None
    min_luma_mean: float | None = None
    max_luma_mean: float | None = None
    max_under_exposed: float | None = None
    max_over_exposed: float | None = None
    min_fused: float | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass(frozen=True)
class OutputConfig:
    uri: str = MISSING
    partition_by: list[str] = field(default_factory=lambda: ["model_version", "decision"])
    min_rows_per_file: int = 2000
    # Write each face's plain recognition embedding (L2-normalised, float16) into the manifest.
    embeddings: bool = False
    # Write runs/<run_id>/report.html when the run commits.
    report: bool = True


@dataclass(frozen=True)
class ReadConfig:
    batch_size: int = 8
    num_cpus: float = 0.5


@dataclass(frozen=True)
class RayConfig:
    # None: join the cluster of a submitted Ray job (RAY_ADDRESS), else start a local Ray.
    address: str | None = None
    num_cpus: int | None = None
    progress_bars: bool = True
    # Fuse the four model stages into one actor (worth it where no device boundary is crossed).
    fuse_models: bool = True
    # GPU actor pools start at max_actors so an autoscaling cluster adds GPU workers for them
    # (cafi/autoscale.py): auto = when the job joined an existing Ray cluster; always; never.
    scale_gpu_pools: str = "auto"
    # Object-store bytes (MiB) the job's blocks may hold at once; null = Ray Data's own share.
    object_store_mb: int | None = 256
    # Calls in flight per model actor: 2 overlaps one batch's host work with the previous one's models.
    actor_concurrency: int = 2
    # Deaths of a model worker while on the same input before that input is an error row (cafi/stages/deaths.py).
    max_worker_deaths: int = 2
    # Batches a model actor runs through its models at once on the CPU, each on its own thread with a
    # share of the torch threads (weights shared); 0 = one per torch thread; 1 = one batch at a time.
    cpu_replicas: int = 0


@dataclass(frozen=True)
class SmokeConfig:
    # Generate sample crops into input.uri and synthetic weights into weights_dir, then score them.
    enabled: bool = False
    samples: int = 24
    weights_dir: str = "out/smoke/weights"


@dataclass(frozen=True)
class JobConfig:
    run_id: str | None = None
    incremental: bool = True
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)


ALIGN_MODES = ("retinaface", "none")
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SCALE_GPU_POOLS = ("auto", "always", "never")
OUTPUT_COLUMNS_FOR_PARTITION = ("model_version", "decision", "status", "reject_reason", "run_id")


def scorer_kinds(family: str) -> tuple[str, ...]:
    """The scorer sections of a family (fiqa, iqa): the kinds models.<family>.kind may name."""
    models = ModelsConfig()
    return tuple(f.name for f in fields(models) if getattr(getattr(models, f.name), "family", None) == family)


def load_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> JobConfig:
    """Merge the schema defaults, YAML files and dotlist overrides; validate; return a typed config."""
    schema = OmegaConf.structured(JobConfig)
    OmegaConf.set_readonly(schema, False)  # the frozen schema is merged into, then built as frozen objects
    try:
        merged = schema
        for path in files:
            if not os.path.exists(path):
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: required but not set")
        cfg = OmegaConf.to_object(merged)
        raw = OmegaConf.to_container(merged, resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc)) from None
    validate(cfg)
    # Kept beside the typed config (not a field: no key of the schema), so summaries and reports can
    # show an interpolated value as its `${...}` text instead of what it resolved to (cafi/redact.py).
    object.__setattr__(cfg, _UNRESOLVED, raw)
    return cfg


_UNRESOLVED = "_unresolved"


def unresolved(cfg: JobConfig) -> dict | None:
    """The config as loaded, interpolations unresolved (`${oc.env:TOKEN}`); None for a config built in
    code or copied with dataclasses.replace (those know no interpolation)."""
    return getattr(cfg, _UNRESOLVED, None)


def _describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in struct" in str(exc) or "Key '" in first_line and "not" in first_line:
        return f"{key}: unknown key ({first_line})"
    return f"{key}: {first_line}" if key else first_line


def _check(ok: bool, key: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def validate(cfg: JobConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    _check(
        (cfg.input.uri is None) != (cfg.input.manifest is None),
        "input.uri / input.manifest", "exactly one of them set", (cfg.input.uri, cfg.input.manifest),
    )
    _check(bool(cfg.output.uri), "output.uri", "a directory or object-store prefix", cfg.output.uri)
    _check(cfg.run_id is None or re.fullmatch(r"[A-Za-z0-9.-]{1,64}", cfg.run_id) is not None, "run_id",
           "letters, digits, '.' and '-' (it prefixes data file names), at most 64", cfg.run_id)
    _check(cfg.output.min_rows_per_file >= 1, "output.min_rows_per_file", "an integer >= 1",
           cfg.output.min_rows_per_file)
    _check(cfg.input.limit is None or cfg.input.limit > 0, "input.limit", "a positive integer or null",
           cfg.input.limit)
    _validate_input(cfg)
    for col in cfg.output.partition_by:
        _check(col in OUTPUT_COLUMNS_FOR_PARTITION, "output.partition_by",
               f"columns from {OUTPUT_COLUMNS_FOR_PARTITION}", col)
    img = cfg.image
    _check(32 <= img.crop_size <= 2048, "image.crop_size", "an integer in [32, 2048]", img.crop_size)
    _check(img.min_side >= 1, "image.min_side", "an integer >= 1", img.min_side)
    _check(img.max_pixels > img.min_side**2, "image.max_pixels", "an integer > min_side^2", img.max_pixels)
    _check(img.max_bytes > 0, "image.max_bytes", "a positive integer", img.max_bytes)
    _check(cfg.storage.retry_budget_s >= 0, "storage.retry_budget_s", "a number of seconds >= 0",
           cfg.storage.retry_budget_s)
    _check(cfg.read.batch_size > 0, "read.batch_size", "a positive integer", cfg.read.batch_size)
    _check(cfg.read.num_cpus > 0, "read.num_cpus", "a positive number", cfg.read.num_cpus)

    m = cfg.models
    _check(m.device in DEVICES, "models.device", f"one of {DEVICES}", m.device)
    _check(m.precision in PRECISIONS, "models.precision", f"one of {PRECISIONS}", m.precision)
    for family in ("fiqa", "iqa"):
        kinds = scorer_kinds(family)
        choice = getattr(m, family)
        _check(choice.kind in kinds, f"models.{family}.kind", f"one of {kinds}", choice.kind)
        for extra in choice.also:
            _check(extra in kinds and extra != choice.kind, f"models.{family}.also",
                   f"scorers from {kinds} other than models.{family}.kind", extra)
    _check(m.detector.align in ALIGN_MODES, "models.detector.align", f"one of {ALIGN_MODES}", m.detector.align)
    _check(0.0 < m.detector.conf_threshold < 1.0, "models.detector.conf_threshold", "a number in (0, 1)",
           m.detector.conf_threshold)
    _check(64 <= m.parser.input_size <= 1024 and m.parser.input_size % 32 == 0, "models.parser.input_size",
           "a multiple of 32 in [64, 1024]", m.parser.input_size)
    _check(len(m.parser.face_labels) > 0, "models.parser.face_labels", "at least one label", m.parser.face_labels)
    _check(len(m.parser.fill) == 3 and all(0 <= v <= 255 for v in m.parser.fill), "models.parser.fill",
           "three integers in [0, 255] (RGB)", m.parser.fill)
    s = m.serfiq
    _check(s.samples >= 2, "models.serfiq.samples", "an integer >= 2", s.samples)
    _check(0.0 < s.dropout < 1.0, "models.serfiq.dropout", "a number in (0, 1)", s.dropout)
    _check(s.alpha > 0, "models.serfiq.alpha", "a positive number", s.alpha)
    _check(0.0 <= s.r <= 1.0, "models.serfiq.r", "a number in [0, 1]", s.r)
    _check(1 <= m.maniqa.crops <= 64, "models.maniqa.crops", "an integer in [1, 64]", m.maniqa.crops)
    for f in fields(m):
        if isinstance(getattr(m, f.name), StageConfig):
            _validate_stage(f"models.{f.name}", getattr(m, f.name))

    _check(1 <= cfg.ray.actor_concurrency <= 8, "ray.actor_concurrency", "an integer in [1, 8]",
           cfg.ray.actor_concurrency)
    _check(isinstance(cfg.ray.max_worker_deaths, int) and cfg.ray.max_worker_deaths >= 1, "ray.max_worker_deaths",
           "an integer >= 1", cfg.ray.max_worker_deaths)
    _check(0 <= cfg.ray.cpu_replicas <= 64, "ray.cpu_replicas",
           "0 (one per torch thread of the actor) or an integer in [1, 64]", cfg.ray.cpu_replicas)
    _check(cfg.ray.object_store_mb is None or cfg.ray.object_store_mb >= 64, "ray.object_store_mb",
           "null or at least 64 (MiB)", cfg.ray.object_store_mb)
    _check(cfg.ray.scale_gpu_pools in SCALE_GPU_POOLS, "ray.scale_gpu_pools", f"one of {SCALE_GPU_POOLS}",
           cfg.ray.scale_gpu_pools)
    d = cfg.decision
    _check(0.0 <= d.min_serfiq <= 1.0, "decision.min_serfiq", "a number in [0, 1]", d.min_serfiq)
    _check(d.min_classic is None or 0.0 <= d.min_classic <= 1.0, "decision.min_classic", "null or a number in [0, 1]",
           d.min_classic)
    _check(0.0 <= d.min_mask_fraction <= 1.0, "decision.min_mask_fraction", "a number in [0, 1]",
           d.min_mask_fraction)
    fusion.check(d)


INPUT_FORMATS = ("files", "webdataset", "parquet")
# Batch columns of the pipeline a kept column may not shadow (the manifest's own are cafi.columns).
_RESERVED_COLUMNS = ("data", "image", "face_mask")


def _validate_input(cfg: JobConfig) -> None:
    inp = cfg.input
    _check(inp.format in INPUT_FORMATS, "input.format", f"one of {INPUT_FORMATS}", inp.format)
    exts = [e.lstrip(".") for e in inp.image_extensions]
    _check(len(exts) > 0 and all(e and "/" not in e for e in exts), "input.image_extensions",
           "a non-empty list of member suffixes such as jpg, png (the part after the sample key)",
           inp.image_extensions)
    _check(bool(inp.image_column), "input.image_column", "the name of the image-bytes column", inp.image_column)
    _check(inp.key_column is None or bool(inp.key_column), "input.key_column", "a column name, or null (row index)",
           inp.key_column)
    _check(1 <= inp.shard_buffer_mb <= 65536, "input.shard_buffer_mb", "an integer in [1, 65536] (MiB)",
           inp.shard_buffer_mb)
    _check(inp.schemes is None or (len(inp.schemes) > 0 and all(
        isinstance(s, str) and s.replace("+", "").replace("-", "").replace(".", "").isalnum() and s[:1].isalpha()
        for s in inp.schemes)), "input.schemes",
        "null (the input's own scheme) or a non-empty list of URI schemes such as [s3] or [file, s3], without ://",
        inp.schemes)
    from cafi.columns import SCHEMA  # local: keeps config import light

    for name in inp.keep_columns:
        _check(bool(name) and name not in SCHEMA.names and name not in _RESERVED_COLUMNS
               and not name.startswith("prev_") and name not in OUTPUT_COLUMNS_FOR_PARTITION, "input.keep_columns",
               "names that are not manifest columns (cafi/columns.py) nor data, image, face_mask, prev_*", name)
    _check(len(set(inp.keep_columns)) == len(inp.keep_columns), "input.keep_columns", "names without repeats",
           inp.keep_columns)
    _check(not inp.keep_columns or inp.format != "files" or inp.manifest is not None, "input.keep_columns",
           "input.manifest to copy them from (a prefix listing of files has no columns), or a shard input.format",
           inp.keep_columns)


def _validate_stage(prefix: str, st: StageConfig) -> None:
    _check(st.batch_size > 0, f"{prefix}.batch_size", "a positive integer", st.batch_size)
    _check(st.num_cpus >= 0, f"{prefix}.num_cpus", "a number >= 0", st.num_cpus)
    _check(st.num_gpus >= 0, f"{prefix}.num_gpus", "a number >= 0", st.num_gpus)
    _check(st.num_cpus > 0 or st.num_gpus > 0, f"{prefix}.num_cpus", "> 0 when num_gpus is 0", st.num_cpus)
    _check(st.min_actors >= 1, f"{prefix}.min_actors", "an integer >= 1", st.min_actors)
    _check(st.max_actors >= st.min_actors, f"{prefix}.max_actors", "an integer >= min_actors", st.max_actors)
    _check(st.torch_threads >= -1, f"{prefix}.torch_threads", "an integer >= -1", st.torch_threads)
    weights = st.weights  # type: ignore[attr-defined]
    if weights is None:  # the published checkpoint of the arch
        return
    _check(bool(weights.uri), f"{prefix}.weights.uri", "a URI or path", weights.uri)
    sha = weights.sha256.lower()
    _check(len(sha) == 64 and all(c in "0123456789abcdef" for c in sha), f"{prefix}.weights.sha256",
           "64 hex characters", weights.sha256)


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: JobConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
