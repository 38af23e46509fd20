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

    def oriented(self, values: np.ndarray) -> np.ndarray:
        """The values turned so that higher is better (NaN stays NaN)."""
        v = np.asarray(values, dtype=np.float64)
        return {"higher": v, "lower": -v, "abs_lower": -np.abs(v), "near_half": -np.abs(v - 0.5)}[self.better]


_F = pa.float32()

COLUMNS: tuple[Column, ...] = (
    # -- identity and input
    Column("uri", pa.string(), "input URI; `<shard uri>#<key>` for a sample of a WebDataset or Parquet shard"),
    Column("status", pa.string(), "scored | no_face | error"),
    Column("error", pa.string(), "why the input could not be scored (status error), else null"),
    Column("width", pa.int32(), "source image width before square-padding and resizing", "px"),
    Column("height", pa.int32(), "source image height", "px"),
    # -- detection (RetinaFace)
    Column("det_score", _F, "confidence of the best face", "0..1", "higher"),
    Column("landmarks", pa.list_(_F, 10), "eyes, nose, mouth corners (x, y) in crop pixels (crop_size)", "px"),
    # -- face parsing
    Column("mask_fraction", _F, "face-label pixels over crop pixels", "0..1", "higher"),
    # -- quality components (cafi/components.py defines each one)
    Column("yaw", _F, "head yaw from the 5 landmarks, relative to the line of sight; + = the face turns towards "
           "the image's left (its nose points left)", "deg", "abs_lower"),
    Column("pitch", _F, "head pitch relative to the line of sight; + = the face looks up", "deg", "abs_lower"),
    Column("roll", _F, "in-plane head roll; + = the face is rotated clockwise in the image (the eye on the "
           "image's right is lower)", "deg", "abs_lower"),
    Column("inter_eye_px", _F, "eye-centre distance in source-image pixels", "px", "higher"),
    Column("face_fraction", _F, "bounding box of the face mask over the crop area (0 when the mask is empty)",
           "0..1", "higher"),
    Column("sharpness", _F, "variance of the Laplacian of BT.601 luma Y' over the eroded face mask",
           "(0..255)^2", "higher"),
    Column("luma_mean", _F, "mean BT.601 luma Y' of face pixels", "0..1", "near_half"),
    Column("luma_std", _F, "standard deviation of face-pixel luminance", "0..1", "higher"),
    Column("under_exposed", _F, "fraction of face pixels with Y' <= 25 of 255", "0..1", "lower"),
    Column("over_exposed", _F, "fraction of face pixels with Y' >= 247 of 255", "0..1", "lower"),
    Column("dynamic_range", _F, "entropy of the face-pixel luminance histogram", "bits (0..8)", "higher"),
    # -- face-image quality (FIQA) scorers
    Column("serfiq", _F, "SER-FIQ, rescaled 1/(1+exp(-alpha*(raw-r)))", "0..1", "higher"),
    Column("serfiq_raw", _F, "SER-FIQ: 2*sigmoid(-mean pairwise distance of T dropout embeddings)", "0..1",
           "higher"),
    Column("magface", _F, "MagFace quality: the embedding norm, or OFIQ's 0..100 mapping of it if configured",
           "norm or 0..100", "higher"),
    Column("magface_raw", _F, "MagFace embedding L2 norm", "norm (~10..110)", "higher"),
    Column("crfiqa", _F, "CR-FIQA: the quality head's regression of the relative classifiability", "raw",
           "higher"),
    Column("sddfiqa", _F, "SDD-FIQA: IR-50 regression of the similarity-distribution-distance label", "~0..100",
           "higher"),
    Column("classic", _F, "score-based FQA classifier (your `cafi train classic` checkpoint): P(good) + "
           "0.5 P(average) over GIST, HOG, LBP and the recognition embedding", "0..1", "higher"),
    # -- image-quality (IQA) scorers
    Column("dbcnn", _F, "DBCNN on the masked face (KonIQ-10k MOS scale for the published weights)", "0..100",
           "higher"),
    Column("topiq_face", _F, "TOPIQ-face (pyiqa topiq_nr-face) on the FFHQ-aligned face", "0..1", "higher"),
    # -- decision
    Column("cafi", _F, "the configured IQA score of accepted rows (null when rejected)", "", "higher"),
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
