"""The held-out split of a trainer, by identity (no identity on both sides), and the rank correlation it
reports on the held-out rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def split_identities(identities: np.ndarray, fraction: float, seed: int) -> set[str]:
    """The held-out identities: a seeded `fraction` of the distinct ones (at least one, never all)."""
    names = np.unique(np.asarray(identities, dtype=str))
    if len(names) < 2:
        raise ValueError(f"a held-out split by identity needs 2 identities with labels, got {len(names)}")
    n = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    return set(np.random.default_rng(seed).permutation(names)[:n].tolist())


def split_table(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table, set[str]]:
    """(training rows, held-out rows, held-out identities) of a table with an `identity` column."""
    held = split_identities(table["identity"].to_numpy(zero_copy_only=False), fraction, seed)
    is_held = pc.is_in(table["identity"], value_set=pa.array(sorted(held), pa.string()))
    return table.filter(pc.invert(is_held)), table.filter(is_held), held


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN for fewer than 2 points."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)
