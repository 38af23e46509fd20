"""The manifest columns `cafi eval` reads from a run, and its quality columns as float64 numpy (a null
is NaN): what the labels and the identities sections both evaluate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi import columns
from cafi.columns import Column

ROW_COLUMNS = ["uri", "status", "accepted", "reject_reason", *(c.name for c in columns.QUALITY)]


def floats(table: pa.Table, col: str) -> np.ndarray:
    """One column as float64 numpy, a null as NaN."""
    return pc.fill_null(table[col], float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def present_quality(table: pa.Table) -> list[Column]:
    """The quality columns of the manifest with at least one value among these rows."""
    return [c for c in columns.QUALITY if c.name in table.column_names and np.isfinite(floats(table, c.name)).any()]
