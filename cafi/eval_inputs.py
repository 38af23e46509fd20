"""The CSVs `cafi eval` reads, from any storage cafi.storage reaches: the labels (`uri`, a MOS and/or
a human accept/reject) and the identities (`uri`, an identity), each as a pyarrow table."""

from __future__ import annotations

import csv
import io
import math

import pyarrow as pa

from cafi.config import StorageConfig
from cafi.errors import CafiError
from cafi.storage import filesystem

TRUE_WORDS = {"1", "true", "t", "yes", "y", "accept", "accepted", "keep", "pass"}
FALSE_WORDS = {"0", "false", "f", "no", "n", "reject", "rejected", "drop", "fail"}


def _parse_accept(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if v == "":
        return None
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise CafiError(f"{where}: accept value {value!r} is not one of 1/0, true/false, yes/no, accept/reject")


def _read_csv(uri: str, storage: StorageConfig | None, what: str, needs: list[str], wanted: str
              ) -> tuple[list[str], list[tuple[int, str, dict]]]:
    """A CSV with a unique, non-empty `uri` per row: (columns, [(line, uri, row)]). At least one of the
    columns `needs` must be there (`wanted` says which in words)."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise CafiError(f"{what}: {uri} does not exist")
    with fs.open(path, "rb") as fh:
        text = fh.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    if "uri" not in cols:
        raise CafiError(f"{what}: {uri} has no 'uri' column (columns: {cols})")
    if not any(c in cols for c in needs):
        raise CafiError(f"{what}: {uri} needs {wanted} (columns: {cols})")
    rows, seen = [], {}
    for line, row in enumerate(reader, start=2):
        u = (row.get("uri") or "").strip()
        if not u:
            raise CafiError(f"{what} {uri} line {line}: empty uri")
        if u in seen:
            raise CafiError(f"{what} {uri} line {line}: uri {u} is {'labelled' if what == 'labels' else 'listed'} "
                            f"twice (first on line {seen[u]})")
        seen[u] = line
        rows.append((line, u, row))
    if not rows:
        raise CafiError(f"{what}: {uri} has no rows")
    return cols, rows


def read_labels(uri: str, storage: StorageConfig | None = None, mos_column: str = "mos",
                accept_column: str = "accept") -> pa.Table:
    """The labels CSV as a table: uri, mos (float64, may be null), accept (bool, may be null)."""
    cols, rows = _read_csv(uri, storage, "labels", [mos_column, accept_column],
                           f"a {mos_column!r} and/or an {accept_column!r} column")
    has_mos, has_accept = mos_column in cols, accept_column in cols
    mos, accept = [], []
    for line, _, row in rows:
        where = f"labels {uri} line {line}"
        m = (row.get(mos_column) or "").strip() if has_mos else ""
        try:
            mos.append(float(m) if m else None)
        except ValueError:
            raise CafiError(f"{where}: {mos_column} {m!r} is not a number") from None
        if mos[-1] is not None and not math.isfinite(mos[-1]):
            raise CafiError(f"{where}: {mos_column} {m!r} is not a finite number")
        accept.append(_parse_accept(row.get(accept_column) or "", where) if has_accept else None)
    return pa.table({"uri": pa.array([u for _, u, _ in rows], pa.string()), "mos": pa.array(mos, pa.float64()),
                     "accept": pa.array(accept, pa.bool_())})


def read_identities(uri: str, storage: StorageConfig | None = None, column: str = "identity") -> pa.Table:
    """The identities CSV as a table: uri, identity (string; every row needs one)."""
    _, rows = _read_csv(uri, storage, "identities", [column], f"an {column!r} column (--identity-column)")
    ids = []
    for line, _, row in rows:
        v = (row.get(column) or "").strip()
        if not v:
            raise CafiError(f"identities {uri} line {line}: empty {column}")
        ids.append(v)
    return pa.table({"uri": pa.array([u for _, u, _ in rows], pa.string()), "identity": pa.array(ids, pa.string())})
