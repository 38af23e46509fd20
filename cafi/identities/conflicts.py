"""Identity conflicts: samples of different identities at cosine >= --conflict-cos.

The index is an inverted file spread over tasks: every sample is stored in its nearest cell and looked
up in its `nprobe` nearest cells (cafi/identities/ann.py); cells are hashed into groups, one Ray task
per group searches its cells exactly (faiss range search), so no task holds more than its group. A
pair is found when either sample's probed cells hold the other: both sides are searched.

`resolve` turns the pairs into one row per flagged sample: the most similar sample of another
identity (`conflict_with`) and whether the conflict removes it. Both sides are removed, unless one
is an outlier of its own identity and the other is not: then the outlier carries the wrong label.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cafi.config import StorageConfig
from cafi.identities import ann
from cafi.identities.analyse import CELLS
from cafi.identities.buckets import read_parts
from cafi.identities.vectors import embeddings

PAIRS = pa.schema([("uri_a", pa.string()), ("uri_b", pa.string()), ("cos", pa.float32()),
                   ("outlier_a", pa.bool_()), ("outlier_b", pa.bool_())])
RESOLVED = pa.schema([("uri", pa.string()), ("conflict_with", pa.string()), ("conflict_cos", pa.float32()),
                      ("conflict_drop", pa.bool_())])


def search_group(root: str, files: list[str], storage: StorageConfig, t: float) -> pa.Table:
    """The task of one cell group: every cross-identity pair at cosine >= t whose stored side is here."""
    ann.threads(1)
    return search_cells(read_parts(root, files, storage, CELLS), t)


def search_cells(table: pa.Table, t: float) -> pa.Table:
    """Cell rows (cafi/identities/analyse.py CELLS) -> the cross-identity pairs at cosine >= t, each cell
    searched exactly: its stored rows against every row that probes it."""
    x, _ = embeddings(table["embedding"])
    q, b, c = ann.pairs_by_cell(x, table["cell"].to_numpy(), table["primary"].to_numpy(zero_copy_only=False), t)
    ident = table["identity"].to_numpy(zero_copy_only=False)
    other = ident[q] != ident[b]
    q, b, c = q[other], b[other], c[other]
    uri, out = table["uri"], table["outlier"]
    return pa.table({"uri_a": uri.take(pa.array(q)), "uri_b": uri.take(pa.array(b)), "cos": pa.array(c, pa.float32()),
                     "outlier_a": out.take(pa.array(q)), "outlier_b": out.take(pa.array(b))}, schema=PAIRS)


def unique_pairs(pairs: pa.Table) -> pa.Table:
    """Each unordered pair once (found from both sides, or in several cells), uri_a < uri_b."""
    if pairs.num_rows == 0:
        return PAIRS.empty_table()
    swap = pc.greater(pairs["uri_a"], pairs["uri_b"])
    t = pa.table({"uri_a": pc.if_else(swap, pairs["uri_b"], pairs["uri_a"]),
                  "uri_b": pc.if_else(swap, pairs["uri_a"], pairs["uri_b"]), "cos": pairs["cos"],
                  "outlier_a": pc.if_else(swap, pairs["outlier_b"], pairs["outlier_a"]),
                  "outlier_b": pc.if_else(swap, pairs["outlier_a"], pairs["outlier_b"])}, schema=PAIRS)
    t = t.group_by(["uri_a", "uri_b"], use_threads=False).aggregate(
        [("cos", "max"), ("outlier_a", "max"), ("outlier_b", "max")])
    t = t.rename_columns({"cos_max": "cos", "outlier_a_max": "outlier_a", "outlier_b_max": "outlier_b"})
    return t.select(PAIRS.names).cast(PAIRS).sort_by([("uri_a", "ascending"), ("uri_b", "ascending")])


def resolve(pairs: pa.Table) -> pa.Table:
    """One row per sample in a conflict: its most similar partner and whether the conflict removes it."""
    if pairs.num_rows == 0:
        return RESOLVED.empty_table()
    sides = pa.concat_tables([
        pa.table({"uri": pairs["uri_a"], "partner": pairs["uri_b"], "cos": pairs["cos"],
                  "mine": pairs["outlier_a"], "theirs": pairs["outlier_b"]}),
        pa.table({"uri": pairs["uri_b"], "partner": pairs["uri_a"], "cos": pairs["cos"],
                  "mine": pairs["outlier_b"], "theirs": pairs["outlier_a"]})])
    # removed unless the partner is the outlier and this sample is not
    sides = sides.append_column("drop", pc.invert(pc.and_(sides["theirs"], pc.invert(sides["mine"]))))
    sides = sides.sort_by([("uri", "ascending"), ("cos", "descending"), ("partner", "ascending")])
    uris = sides["uri"].combine_chunks()
    first = np.ones(len(uris), bool)
    if len(uris) > 1:
        first[1:] = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1)).to_numpy(zero_copy_only=False)
    best = sides.filter(pa.array(first))
    drop = sides.group_by("uri", use_threads=False).aggregate([("drop", "max")])
    drop = drop.sort_by("uri")
    return pa.table({"uri": best["uri"], "conflict_with": best["partner"], "conflict_cos": best["cos"],
                     "conflict_drop": drop["drop_max"]}, schema=RESOLVED)
