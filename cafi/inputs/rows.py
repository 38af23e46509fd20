"""What a shard read yields: one `Sample` per uri, gathered into the pipeline's read rows.

The columns are those of the files input's read tasks (cafi/stages/read.py) -- uri, status ("ok" |
"error"), error ("" while in flight), width, height, data (encoded bytes; b"" when refused) -- plus
shard_offset, shard_size and the kept columns (cafi/inputs/keep.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cafi import imaging
from cafi.config import ImageConfig
from cafi.decision import ERROR, OK
from cafi.inputs import keep


@dataclass
class Sample:
    uri: str
    key: str | None                 # None: the row of the shard itself (it could not be read, or not to the end)
    error: str | None = None
    data: bytes = b""
    width: int = 0
    height: int = 0
    offset: int | None = None       # tar: the image member's data offset; parquet: the row index
    size: int | None = None         # tar: the image member's size
    kept: dict = field(default_factory=dict)
    bad_json: bool = False          # its .json is not a JSON object (or cannot be parsed): the kept fields are null

    def check(self, image_cfg: ImageConfig) -> Sample:
        """The header checks of the read tasks: size, format, limits (no decoding)."""
        if self.error is None:
            head = imaging.probe(self.data, image_cfg)
            self.width, self.height, self.error = head.width, head.height, head.error
        if self.error is not None:
            self.data = b""
        return self


class Rows:
    """Samples gathered into numpy batches of the read columns."""

    def __init__(self, kept: list[str], with_size: bool):
        self.kept, self.with_size = kept, with_size
        self.samples: list[Sample] = []

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def take(self) -> dict:
        s, self.samples = self.samples, []
        batch = {
            "uri": np.array([x.uri for x in s], dtype=object),
            "status": np.array([OK if x.error is None else ERROR for x in s], dtype=object),
            "error": np.array([x.error or "" for x in s], dtype=object),
            "width": np.array([x.width for x in s], dtype=np.int32),
            "height": np.array([x.height for x in s], dtype=np.int32),
            "data": np.array([x.data for x in s] + [b""], dtype=object)[:-1],  # [b""]: never a 2-D bytes array
            # None where a row has no offset: Ray Data carries it as null (decide writes null)
            "shard_offset": np.array([x.offset for x in s], dtype=object),
        }
        if self.with_size:
            batch["shard_size"] = np.array([x.size for x in s], dtype=object)
        for name in self.kept:
            batch[name] = keep.wire([x.kept.get(name) for x in s])
        return batch
