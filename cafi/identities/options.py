"""The settings of `cafi identities`, their defaults and their checks; the order of the reasons."""

from __future__ import annotations

from dataclasses import dataclass

from cafi.errors import CafiError

# The first reason that applies is the sample's reason (cafi/identities/__init__.py says why this order).
REASONS = ("no_embedding", "outlier", "conflict", "duplicate", "over_cap", "small_identity")


@dataclass(frozen=True)
class Options:
    min_centroid_cos: float = 0.225     # ArcFace's hard threshold (cosine <= 0.225: about 77 degrees)
    outlier_mad: float | None = None    # k: also an outlier below the identity's median - k * MAD
    weighted: bool = False              # centroids weighted by the quality's rank within the identity
    subcentres: int = 1                 # K > 1: K sub-centres per identity, the dominant one is the reference
    # Re-encodes and resizes of one photo stay above 0.95 with ArcFace-type embeddings; two photos
    # of one person rarely reach 0.9.
    dup_cos: float = 0.95
    conflict_cos: float = 0.9           # the same photo under another label, allowing a re-crop
    merge_cos: float = 0.7              # two identities' centroids this close: probably one person
    max_per_identity: int | None = None
    min_per_identity: int | None = None
    quality: str | None = None          # None: the run's FIQA kind
    bucket_rows: int = 50_000           # rows per hash bucket: the memory of one task
    nprobe: int = 3                     # index cells each sample is searched in (the conflict search)

    def check(self) -> None:
        checks = [
            (-1.0 <= self.min_centroid_cos <= 1.0, f"--min-centroid-cos {self.min_centroid_cos} is not in [-1, 1]"),
            (self.outlier_mad is None or self.outlier_mad > 0, f"--outlier-mad {self.outlier_mad} is not > 0"),
            (self.subcentres >= 1, f"--subcentres {self.subcentres} is not a positive count"),
            (0 < self.dup_cos <= 1, f"--dup-cos {self.dup_cos} is not in (0, 1]"),
            (0 < self.conflict_cos <= 1, f"--conflict-cos {self.conflict_cos} is not in (0, 1]"),
            (0 < self.merge_cos <= 1, f"--merge-cos {self.merge_cos} is not in (0, 1]"),
            (self.max_per_identity is None or self.max_per_identity >= 1,
             f"--max-per-identity {self.max_per_identity} is not a positive count"),
            (self.min_per_identity is None or self.min_per_identity >= 1,
             f"--min-per-identity {self.min_per_identity} is not a positive count"),
            (self.max_per_identity is None or self.min_per_identity is None
             or self.min_per_identity <= self.max_per_identity,
             f"--min-per-identity {self.min_per_identity} is above --max-per-identity {self.max_per_identity}"),
            (self.bucket_rows >= 1, f"--bucket-rows {self.bucket_rows} is not a positive count"),
            (self.nprobe >= 1, f"--nprobe {self.nprobe} is not a positive count"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CafiError(msg)
