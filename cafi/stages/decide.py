"""Decide (CPU tasks, cheap): the CAFI decision on each row, and the manifest rows themselves.

Scores made from the stored raw ones (each scorer's `derive`: SER-FIQ's rescaling, MagFace's OFIQ
mapping), the fused score (cafi/fusion.py) and the thresholds apply here, so changing them runs no
model (a threshold-only re-score).
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow as pa

from cafi import fusion
from cafi.columns import SCHEMA
from cafi.config import JobConfig
from cafi.decision import OK, SCORED, reject_reasons
from cafi.inputs import keep
from cafi.stages.specs import all_specs, chosen, score_rules


def derived_scores(batch: dict, cfg: JobConfig) -> dict[str, np.ndarray]:
    """Scores computed from the stored raw ones at decision time (a change here runs no model)."""
    return {s.score: s.derive(batch, cfg) for s in all_specs()
            if s.derive is not None and s.outputs[0] in batch}


def _arrow(name: str, values, n: int) -> pa.Array:
    typ = SCHEMA.field(name).type
    if values is None:
        return pa.nulls(n, typ)
    if pa.types.is_fixed_size_list(typ):
        flat = np.asarray(values).reshape(-1)
        valid = ~np.isnan(np.asarray(values, dtype=np.float32)).all(axis=1)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat, typ.value_type), typ.list_size)
        return arr if valid.all() else pa.FixedSizeListArray.from_arrays(
            pa.array(flat, typ.value_type), typ.list_size, mask=pa.array(~valid))
    if pa.types.is_floating(typ):
        return pa.array(np.asarray(values, dtype=np.float32), typ, from_pandas=True)  # NaN -> null
    if pa.types.is_integer(typ):  # an integer column with nulls arrives as floats with NaN (shard_offset)
        return pa.array(values, typ, from_pandas=True)
    return pa.array(values, typ)


def decide(batch: dict, cfg: JobConfig, model_version: str, run_id: str, kept: pa.Schema | None = None) -> pa.Table:
    """CAFI decision: keep or reject with a reason. Returns the manifest rows (no pixels), with the
    input's kept columns (`kept`: input.keep_columns and their types) after the cafi columns."""
    fiqa, iqa = cfg.models.fiqa.kind, cfg.models.iqa.kind
    n = len(batch["uri"])
    cols = {**batch, **derived_scores(batch, cfg)}
    f = cfg.decision.fusion
    if f.weights:
        cols["fused"] = fusion.fused(cols, f.weights, f.ranges, n)
    status = np.asarray(batch["status"], dtype=object).copy()
    cols["status"] = status
    reason = reject_reasons(cols, cfg.decision, *score_rules(cfg.decision, fiqa, iqa))
    accepted = (status == OK) & (reason == None)  # noqa: E711
    status[status == OK] = SCORED
    iqa_score = np.asarray(cols.get(chosen(cfg, "iqa").score, np.full(n, np.nan)), dtype=np.float32)
    now = np.datetime64(_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), "us")
    cols.update({
        "status": status,
        "error": np.array([e if e else None for e in batch["error"]], dtype=object),
        "cafi": np.where(accepted, iqa_score, np.nan).astype(np.float32), "accepted": accepted.astype(bool),
        "decision": np.where(accepted, "accepted", "rejected").astype(object), "reject_reason": reason,
        "model_version": np.full(n, model_version, dtype=object), "run_id": np.full(n, run_id, dtype=object),
        "scored_at": np.full(n, now),
    })
    # An explicit schema: a block whose rows are all null in a column keeps the column's type.
    arrays = [_arrow(name, cols.get(name), n) for name in SCHEMA.names]
    return keep.append(pa.Table.from_arrays(arrays, schema=SCHEMA), batch, kept)
