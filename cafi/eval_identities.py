"""The identities section of `cafi eval`: with the run's stored embeddings, the error-versus-discard
characteristic of every quality column (cafi/edc.py, ISO/IEC 29794-1:2024), and EdcSection, the
section's tables (pAUC rows, resampled curves) and its JSON document."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import columns, edc, runs
from cafi.errors import CafiError
from cafi.eval_rows import floats, present_quality
from cafi.eval_thresholds import between, own_units


@dataclass
class EdcSection:
    file: str
    identity_column: str
    listed: int                   # rows of the identities file
    found: int                    # ... whose URI is in the manifest
    embedded: int                 # ... with an embedding: the samples compared
    result: edc.Result
    embedding_model: dict | None = None  # the recognizer of the embeddings (None: not recorded)

    def recognizer(self) -> str:
        """Which recognizer made the embeddings compared, in words."""
        m = self.embedding_model
        if m is None:
            return "not recorded (scored before cafi recorded it)"
        return f"{m['arch']} (the {m['stage']} stage's own pass; sha256 {m['sha256'][:12]})"

    def target_of(self, s: edc.ScoreResult) -> dict | None:
        t = s.target
        if t is None:
            return None
        out = {"fnmr": t.fnmr, "reached": t.reached, "discard": t.discard, "threshold": None, "rule": None}
        if t.reached and t.quality is not None and s.order == "score":
            below = t.below if t.below is not None and math.isfinite(t.below) else None
            out["threshold"], out["rule"] = own_units(columns.BY_NAME[s.name], between(below, t.quality))
        elif t.reached and s.order == "score":
            out["rule"] = "none needed (reached without discarding)"
        return out

    def pauc_rows(self) -> list[dict]:
        """ideal, every score (best first), random."""
        r = self.result
        if r.ideal is None:
            return []
        rows = []
        for s in (r.ideal, *r.scores, r.random):
            col = columns.BY_NAME.get(s.name) if s.order == "score" else None
            rows.append({"score": s.name, "order": s.order, "better": col.better if col else None,
                         "pauc": s.pauc, "relative": s.relative, "fnmr_at_limit": s.fnmr_at_limit,
                         "unrated_pairs": s.unrated_pairs, "target": self.target_of(s)})
        return rows

    def curves(self, points: int = edc.MAX_POINTS) -> list[dict]:
        r = self.result
        out = []
        for s in ([r.ideal, *r.scores, r.random] if r.ideal is not None else []):
            x, y = edc.resample(s.curve, points)
            out.append({"score": s.name, "order": s.order, "discard": x.tolist(), "fnmr": y.tolist()})
        return out

    def as_dict(self) -> dict:
        r, o = self.result, self.result.options
        sampling = ("every non-mated pair" if not r.nonmated_sampled else
                    f"a seeded sample of {r.nonmated:,} non-mated pairs, uniform with replacement (seed {o.seed})")
        return {
            "identities_file": self.file, "identity_column": self.identity_column, "listed": self.listed,
            "embedding_model": self.embedding_model,
            "found": self.found, "samples": r.samples, "identities": r.identities, "mated_pairs": r.mated,
            "nonmated_pairs": r.nonmated, "nonmated_sampling": sampling if o.start_fnmr is None else None,
            "threshold": {"similarity": r.threshold, "set_by": "fmr" if o.start_fnmr is None else "start_fnmr",
                          "fmr_target": o.fmr if o.start_fnmr is None else None, "fmr": r.fmr,
                          "start_fnmr_target": o.start_fnmr, "start_fnmr": r.start_fnmr},
            "pauc_limit": o.pauc_limit, "target_fnmr": o.target_fnmr, "min_mated": o.min_mated,
            "conventions": {"match": "cosine similarity >= threshold", "pair_quality": "min of the two samples",
                            "missing_quality": "lowest: those pairs are discarded first, together",
                            "ideal": "ascending similarity (false non-matches first)",
                            "random": "expected curve of a random order: flat at the starting FNMR",
                            "pauc": "step-function integral from 0 to pauc_limit, not normalised; relative = "
                                    "(pauc - ideal) / (random - ideal)"},
            "message": r.message, "pauc": self.pauc_rows(), "curves": self.curves(),
        }


def _vectors(embeddings: pa.ChunkedArray) -> np.ndarray:
    """(n, 512) float16 numpy from the manifest's fixed-size-list column (no nulls), one copy."""
    return np.concatenate([c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), -1)
                           for c in embeddings.chunks if len(c)] or [np.zeros((0, columns.EMBEDDING_DIM))])


def evaluate_identities(rows: runs.Rows, ids: pa.Table, ids_uri: str, column: str,
                        options: edc.Options) -> EdcSection:
    pos = pc.index_in(rows.table["uri"], value_set=ids["uri"])
    listed = pc.is_valid(pos)
    found = int(pc.sum(listed).as_py() or 0)
    if found == 0:
        raise CafiError(f"none of the {ids.num_rows} URIs of the identities file is in {rows.source} "
                        f"(first: {ids['uri'][0].as_py()})")
    # The samples compared: listed, with an embedding. Only their embeddings are copied, once.
    keep = pc.and_(listed, pc.is_valid(rows.table["embedding"]))
    sample = rows.table.select([c.name for c in columns.QUALITY]).filter(keep)
    if sample.num_rows == 0:
        raise CafiError(f"{rows.source} has no embeddings for these {found} samples: re-score with "
                        "output.embeddings=true to store them")
    model = one_recognizer(rows)
    vectors = _vectors(rows.table["embedding"].filter(keep))
    identities = ids["identity"].take(pos.filter(keep)).to_numpy(zero_copy_only=False)
    qualities = {c.name: c.oriented(floats(sample, c.name)) for c in present_quality(sample)}
    try:
        result = edc.evaluate(vectors, identities, qualities, options)
    except ValueError as exc:  # too many mated pairs to hold
        raise CafiError(str(exc)) from None
    return EdcSection(ids_uri, column, ids.num_rows, found, sample.num_rows, result, model)


def one_recognizer(rows: runs.Rows) -> dict | None:
    """The one recognizer the rows' embeddings come from (from the manifest files' `embedding` metadata).
    Rows of one model version share it (the embedding source is part of the version); rows embedded by
    different recognizers are not comparable pairs, so they are refused rather than mixed. Files written
    before cafi recorded it (no metadata) are of the same model version, hence of the same recognizer."""
    models = [m for m in rows.embedding_models if m is not None]
    if len(models) > 1:
        names = ", ".join(f"{m['arch']} (sha256 {m['sha256'][:12]})" for m in models)
        raise CafiError(f"the embeddings of {rows.source} come from {len(models)} recognizers ({names}): "
                        "an EDC compares pairs of one recognizer; evaluate one run whose embeddings come "
                        "from one model")
    return models[0] if models else None
