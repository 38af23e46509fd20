"""Per-identity caps and each sample's first reason.

Rows are sorted best quality first within each identity (`rank` 1 is the best). The reasons that do
not depend on the others' fate (no embedding, outlier, conflict, duplicate) come first; then, of what
is left of each identity, the --max-per-identity best stay and the rest are `over_cap`; then an
identity left with fewer than --min-per-identity samples loses them all (`small_identity`).
"""

from __future__ import annotations

import numpy as np

from cafi.identities.options import Options
from cafi.identities.vectors import Groups


def first_reason(flags: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The first reason (in the order of `flags`) that is set on each row; None where none is."""
    reason = np.full(n, None, dtype=object)
    for name, mask in flags.items():
        reason[(reason == None) & mask] = name  # noqa: E711 - elementwise on an object array
    return reason


def apply_caps(reason: np.ndarray, groups: Groups, options: Options) -> np.ndarray:
    """`reason` with over_cap and small_identity added (a copy)."""
    reason = reason.copy()
    left = reason == None  # noqa: E711
    if options.max_per_identity is not None and groups.count:
        before = groups.sums(left.astype(np.int64))          # survivors per identity
        seen = np.cumsum(left) - left                         # survivors before each row, all groups
        start = np.concatenate([[0], np.cumsum(before)[:-1]])
        position = seen - start[groups.gid]                   # survivors of its identity before it
        over = left & (position >= options.max_per_identity)
        reason[over] = "over_cap"
        left &= ~over
    if options.min_per_identity is not None and groups.count:
        kept = groups.sums(left.astype(np.int64))
        small = left & (kept[groups.gid] < options.min_per_identity)
        reason[small] = "small_identity"
    return reason
