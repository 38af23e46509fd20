"""The score-based FQA classifier (`cafi train classic`'s checkpoint) on the aligned 112x112 face:
`classic` = P(good) + 0.5 P(average), in [0, 1].

Its GIST, HOG and LBP come from the aligned face (cafi/classic/features.py); its CNN feature is the
run's recognition embedding, the `embedding` another FIQA scorer of the run writes in its own pass
(output.embeddings=true): no second recognition pass. Without output.embeddings the config is refused
(ConfigError naming the key). The embedding's recognizer must be the one the checkpoint was trained on
(the checkpoint records it; cafi/preflight.py checks at start). Runs on the CPU: a few small matrices.
"""

from __future__ import annotations

import numpy as np

from cafi.errors import ConfigError
from cafi.stages.base import ModelStage
from cafi.stages.faces import aligned_faces
from cafi.stages.spec import StageSpec


class ClassicStage(ModelStage):
    def load(self) -> None:
        from cafi.models.classic import ClassicScorer

        self.model = ClassicScorer(self._checkpoint(), **self._common())

    def process(self, batch: dict, rows: np.ndarray) -> None:
        from cafi.classic.features import extract

        if "embedding" not in batch:
            raise RuntimeError("classic: the batch holds no `embedding` (the run's embedding source runs first)")
        faces = aligned_faces(batch, rows, self.cfg.models.detector.align)
        batch["classic"][rows] = self.model(extract(faces, np.asarray(batch["embedding"][rows], np.float32)))


def _validate(cfg) -> None:
    if not cfg.output.embeddings:
        raise ConfigError("output.embeddings: the classic scorer's CNN feature is the run's recognition embedding; "
                          "set output.embeddings=true (with a FIQA scorer that yields one: serfiq, magface, crfiqa)")


def _synth(arch: str) -> dict:
    from cafi.models.classic import synth_checkpoint

    return synth_checkpoint()


SPEC = StageSpec(
    name="classic", family="fiqa", section="classic", stage=ClassicStage,
    outputs=("classic",), score="classic", threshold="min_classic",
    reads=lambda cfg: ("aligned", "embedding"),
    settings=lambda cfg, columns: {"sha256": SPEC.checkpoint(cfg).sha256},
    arch=lambda cfg: "classic_fqa", archs=("classic_fqa",), synth=_synth, validate=_validate,
    title="Score-based FQA classifier (P(good) + 0.5 P(average))", value_range=(0.0, 1.0),
)
