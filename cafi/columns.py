"""Every manifest column in one place: its Arrow type, unit, direction and meaning.

The manifest is one table across model versions: a column a version does not compute is null
there (a reader of older files sees nulls for newer columns). `SCHEMA` is what every writer
writes and every reader reads; `QUALITY` lists the columns that measure quality, each with the
direction in which it is better, so the report and `cafi eval` can rank any of them.

Directions ("better"):
  higher      larger is better (scores, sharpness, resolution)
  lower       smaller is better (exposure clipping fractions)
  abs_lower   smaller magnitude is better (head-pose angles: 0 = frontal)
  near_half   closer to 0.5 is better (mean luminance on a 0..1 scale)

`span` is a quality column's documented range, where it has one: the fused score (cafi/fusion.py)
maps each column onto [0, 1] by it (`Column.unit_interval`). Columns whose scale depends on the data or the
checkpoint (pixels, Laplacian variance, raw regressions) have none: a fusion that weighs them names
their range in `decision.fusion.ranges`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

EMBEDDING_DIM = 512


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    unit: str = ""
    better: str | None = None  # None: not a quality measure
    span: tuple[float, float] | None = None  # documented range: the fused score's mapping onto [0, 1]

    def oriented(self, values: np.ndarray) -> np.ndarray:
        """The values turned so that higher is better (NaN stays NaN)."""
        v = np.asarray(values, dtype=np.float64)
        return {"higher": v, "lower": -v, "abs_lower": -np.abs(v), "near_half": -np.abs(v - 0.5)}[self.better]

    def unit_interval(self, values: np.ndarray, span: tuple[float, float] | None = None) -> np.ndarray:
        """The values mapped onto [0, 1], 1 = best, by `span` (default: the documented one), clipped:
        higher (v-lo)/(hi-lo), lower its complement, abs_lower 1 - |v|/hi (an angle: 1 - angle/90),
        near_half 1 - 2|x-0.5| of x = (v-lo)/(hi-lo). NaN stays NaN."""
        lo, hi = span if span is not None else self.span
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            if self.better == "abs_lower":
                return 1.0 - np.clip(np.abs(v) / hi, 0.0, 1.0)
            x = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
            return {"higher": x, "lower": 1.0 - x, "near_half": 1.0 - 2.0 * np.abs(x - 0.5)}[self.better]


_F = pa.float32()

COLUMNS: tuple[Column, ...] = (
    # -- identity and input
    Column("uri", pa.string(), "input URI; `<shard uri>#<key>` for a sample of a WebDataset or Parquet shard"),
    Column("status", pa.string(), "scored | no_face | error"),
    Column("error", pa.string(), "why the input could not be scored (status error), else null"),
    Column("width", pa.int32(), "source image width before square-padding and resizing", "px"),
    Column("height", pa.int32(), "source image height", "px"),
    # -- detection (RetinaFace)
    Column("det_score", _F, "confidence of the best face", "0..1", "higher", span=(0.0, 1.0)),
    Column("landmarks", pa.list_(_F, 10), "eyes, nose, mouth corners (x, y) in crop pixels (crop_size)", "px"),
    # -- face parsing
    Column("mask_fraction", _F, "face-label pixels over crop pixels", "0..1", "higher", span=(0.0, 1.0)),
    # -- quality components (cafi/components.py defines each one)
    Column("yaw", _F, "head yaw from the 5 landmarks, relative to the line of sight; + = the face turns towards "
           "the image's left (its nose points left)", "deg", "abs_lower", span=(0.0, 90.0)),
    Column("pitch", _F, "head pitch relative to the line of sight; + = the face looks up", "deg", "abs_lower",
           span=(0.0, 90.0)),
    Column("roll", _F, "in-plane head roll; + = the face is rotated clockwise in the image (the eye on the "
           "image's right is lower)", "deg", "abs_lower", span=(0.0, 90.0)),
    Column("inter_eye_px", _F, "eye-centre distance in source-image pixels", "px", "higher"),
    Column("face_fraction", _F, "bounding box of the face mask over the crop area (0 when the mask is empty)",
           "0..1", "higher", span=(0.0, 1.0)),
    Column("sharpness", _F, "variance of the Laplacian of BT.601 luma Y' over the eroded face mask",
           "(0..255)^2", "higher"),
    Column("luma_mean", _F, "mean BT.601 luma Y' of face pixels", "0..1", "near_half", span=(0.0, 1.0)),
    Column("luma_std", _F, "standard deviation of face-pixel luminance", "0..1", "higher",
           span=(0.0, 0.5)),  # the largest deviation values in [0, 1] can have
    Column("under_exposed", _F, "fraction of face pixels with Y' <= 25 of 255", "0..1", "lower", span=(0.0, 1.0)),
    Column("over_exposed", _F, "fraction of face pixels with Y' >= 247 of 255", "0..1", "lower", span=(0.0, 1.0)),
    Column("dynamic_range", _F, "entropy of the face-pixel luminance histogram", "bits (0..8)", "higher",
           span=(0.0, 8.0)),
    # -- face-image quality (FIQA) scorers
    Column("serfiq", _F, "SER-FIQ, rescaled 1/(1+exp(-alpha*(raw-r)))", "0..1", "higher", span=(0.0, 1.0)),
    Column("serfiq_raw", _F, "SER-FIQ: 2*sigmoid(-mean pairwise distance of T dropout embeddings)", "0..1",
           "higher", span=(0.0, 1.0)),
    Column("magface", _F, "MagFace quality: the embedding norm, or OFIQ's 0..100 mapping of it if configured",
           "norm or 0..100", "higher"),
    Column("magface_raw", _F, "MagFace embedding L2 norm", "norm (~10..110)", "higher",
           span=(10.0, 110.0)),  # MagFace's magnitude bounds l_a, u_a
    Column("crfiqa", _F, "CR-FIQA: the quality head's regression of the relative classifiability", "raw",
           "higher"),
    Column("sddfiqa", _F, "SDD-FIQA: IR-50 regression of the similarity-distribution-distance label", "~0..100",
           "higher", span=(0.0, 100.0)),
    Column("classic", _F, "score-based FQA classifier (your `cafi train classic` checkpoint): P(good) + "
           "0.5 P(average) over GIST, HOG, LBP and the recognition embedding", "0..1", "higher", span=(0.0, 1.0)),
    # -- image-quality (IQA) scorers
    Column("dbcnn", _F, "DBCNN on the masked face (KonIQ-10k MOS scale for the published weights)", "0..100",
           "higher", span=(0.0, 100.0)),
    Column("topiq_face", _F, "TOPIQ-face (pyiqa topiq_nr-face) on the FFHQ-aligned face", "0..1", "higher",
           span=(0.0, 1.0)),
    # -- decision
    Column("cafi", _F, "the configured IQA score of accepted rows (null when rejected)", "", "higher"),
    Column("fused", _F, "weighted mean of the columns of decision.fusion.weights, each mapped onto 0..1 by its "
           "range (cafi/fusion.py); null without weights or where a weighted column is null", "0..1", "higher",
           span=(0.0, 1.0)),
    Column("accepted", pa.bool_(), "true when no rule rejected the row"),
    Column("decision", pa.string(), "accepted | rejected (a partition column by default)"),
    Column("reject_reason", pa.string(), "first failed rule (cafi/decision.py REASONS), null when accepted"),
    # -- recognition embedding (output.embeddings)
    Column("embedding", pa.list_(pa.float16(), EMBEDDING_DIM),
           "L2-normalised recognition embedding of the aligned face (dropout off), float16"),
    # -- shard inputs (input.format webdataset | parquet)
    Column("shard_offset", pa.int64(), "tar: byte offset of the image member's data; parquet: row index"),
    Column("shard_size", pa.int64(), "tar: image member size in bytes; parquet: null", "bytes"),
    # -- provenance
    Column("model_version", pa.string(), "fingerprint of every checkpoint and score-changing setting"),
    Column("run_id", pa.string(), "the run that wrote the row"),
    Column("scored_at", pa.timestamp("us"), "when the row was decided (UTC)"),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
SCHEMA = pa.schema([(c.name, c.type) for c in COLUMNS])
QUALITY: tuple[Column, ...] = tuple(c for c in COLUMNS if c.better is not None)
COMPONENTS = ("yaw", "pitch", "roll", "inter_eye_px", "face_fraction", "sharpness", "luma_mean", "luma_std",
              "under_exposed", "over_exposed", "dynamic_range")
