"""Per-operator wall time and rows of a run, read from Ray Data's execution stats (the summary's `stages`)."""

from __future__ import annotations

import re

_HEAD = re.compile(r"^Operator \d+ (.+?): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s")
_ROWS = re.compile(r"^\* Output num rows per block: .*?(\d+) total")


def stage_stats(ds) -> dict:
    """The executed dataset's stats text and its operators (informative: never fails a run)."""
    try:
        text = ds.stats()
    except Exception:  # noqa: BLE001 - stats are informative, never fatal
        return {}
    return {"ray_data_stats": text, "operators": parse_operator_stats(text)}


def parse_operator_stats(text: str) -> list[dict]:
    """Name, wall time and output rows of each operator in `ds.stats()` text."""
    ops: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            current = {"operator": head.group(1), "tasks": int(head.group(2)), "blocks": int(head.group(3)),
                       "wall_seconds": float(head.group(4))}
            ops.append(current)
            continue
        rows = _ROWS.match(line.strip()) if current else None
        if rows and current is not None:
            current["rows"] = int(rows.group(1))
            if current["wall_seconds"] > 0:
                current["rows_per_second"] = round(current["rows"] / current["wall_seconds"], 3)
    return ops
