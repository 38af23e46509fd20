"""`cafi eval`: a run's quality columns against human labels, and against recognition (EDC).

This module checks the arguments, reads what is needed once and evaluates against both; the parts
live in their own modules, each importing only those listed before it:

  cafi/eval_stats.py       correlations (SRCC, PLCC) and confusion counts
  cafi/eval_thresholds.py  the best single-threshold filter, the (min FIQA, min IQA) search, own units
  cafi/eval_inputs.py      the labels and identities CSVs
  cafi/eval_rows.py        the manifest columns read, quality values as numpy
  cafi/eval_fusion.py      --fit-fusion: weights of the fused score fitted to the labels
  cafi/eval_labels.py      the labels section: ranking, decision against the human one, suggestion, fit
  cafi/eval_identities.py  the identities section: EDC of every quality column (cafi/edc.py)
  cafi/eval_result.py      the document of both sections and its JSON
  cafi/eval_text.py        the text printed without --json

Labels (a CSV with `uri` and a MOS, higher is better, and/or a human accept/reject):
- every quality column of the manifest that has values (cafi.columns.QUALITY: the scores, CAFI and
  the quality components), oriented so that higher is better, is ranked by its SRCC and PLCC
  against the MOS, and by the F1 of the best single-threshold filter against the human decision
  ("accept" is the positive class; a row without a value is never kept);
- the CAFI decision's precision, recall and F1, and the thresholds of the run's FIQA and IQA
  scorers that maximise F1 (or reach a precision with the best recall), every other rule of the
  run's decision left as it is.

Identities (a CSV with `uri` and an identity): with the stored embeddings, the error-versus-discard
characteristic of every quality column (cafi/edc.py, ISO/IEC 29794-1:2024).

The names the CLI, the tests and bench/eval.py use are importable from here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cafi import edc, runs
from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.eval_identities import EdcSection, evaluate_identities
from cafi.eval_inputs import read_identities, read_labels
from cafi.eval_labels import LabelResult, evaluate_labels
from cafi.eval_result import Result
from cafi.eval_rows import ROW_COLUMNS
from cafi.eval_stats import Confusion, confusion, plcc, srcc
from cafi.eval_text import format_result
from cafi.eval_thresholds import Filter, Suggestion, accept_rule, best_filter, own_units, suggest

__all__ = ["ROW_COLUMNS", "Confusion", "EdcSection", "Filter", "LabelResult", "Result", "Suggestion", "accept_rule",
           "best_filter", "check_options", "confusion", "evaluate", "format_result", "own_units", "plcc",
           "read_identities", "read_labels", "srcc", "suggest"]


def check_options(options: edc.Options) -> None:
    o = options
    checks = [(0 < o.fmr < 1, f"--fmr {o.fmr} is not in (0, 1)"),
              (o.start_fnmr is None or 0 < o.start_fnmr < 1, f"--start-fnmr {o.start_fnmr} is not in (0, 1)"),
              (0 < o.pauc_limit <= 1, f"--pauc-limit {o.pauc_limit} is not in (0, 1]"),
              (o.nonmated >= 1, f"--nonmated {o.nonmated} is not a positive count"),
              (o.min_mated >= 1, f"--min-mated {o.min_mated} is not a positive count"),
              (o.target_fnmr is None or 0 <= o.target_fnmr < 1, f"--target-fnmr {o.target_fnmr} is not in [0, 1)")]
    for ok, msg in checks:
        if not ok:
            raise CafiError(msg)


def evaluate(manifest_uri: str, labels_uri: str | None = None, storage: StorageConfig | None = None,
             precision: float | None = None, mos_column: str = "mos", accept_column: str = "accept",
             identities_uri: str | None = None, identity_column: str = "identity",
             options: edc.Options | None = None, fit_fusion: bool = False) -> Result:
    """Read what is needed once (the labelled and identified rows only) and evaluate against both."""
    if labels_uri is None and identities_uri is None:
        raise CafiError("nothing to evaluate against: give LABELS.csv and/or --identities IDS.csv")
    if fit_fusion and labels_uri is None:
        raise CafiError("--fit-fusion fits to labels: give LABELS.csv")
    if precision is not None and not 0.0 < precision <= 1.0:
        raise CafiError(f"--precision {precision} is not in (0, 1]")
    options = options or edc.Options()
    check_options(options)
    storage = storage if storage is not None else StorageConfig()  # endpoint and region from the environment
    labels = read_labels(labels_uri, storage, mos_column, accept_column) if labels_uri else None
    ids = read_identities(identities_uri, storage, identity_column) if identities_uri else None
    wanted = pa.concat_arrays([t["uri"].combine_chunks() for t in (labels, ids) if t is not None])
    cols = ROW_COLUMNS + (["embedding"] if ids is not None else [])
    rows = runs.read_rows(manifest_uri, storage, cols, pc.unique(wanted))
    result = Result(rows.source)
    if labels is not None:
        result.labels = evaluate_labels(rows, labels, labels_uri, precision, fit_fusion)
    if ids is not None:
        result.edc = evaluate_identities(rows, ids, identities_uri, identity_column, options)
    return result
