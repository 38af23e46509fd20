"""The document `cafi eval` produces: the run it read, the labels section and the EDC section, and
its strict-JSON form (what `--json` prints and `--out` writes as edc.json)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from cafi.eval_identities import EdcSection
from cafi.eval_labels import LabelResult


@dataclass
class Result:
    source: str
    labels: LabelResult | None = None
    edc: EdcSection | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "labels": self.labels.as_dict() if self.labels else None,
                "edc": self.edc.as_dict() if self.edc else None}

    def to_json(self) -> str:
        """The document as strict JSON: an undefined number (a correlation of a constant) is null."""
        return json.dumps(_finite(self.as_dict()), indent=2, default=str, allow_nan=False)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
