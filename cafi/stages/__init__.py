"""The job's stages: small callables over dict-of-numpy batches, one module per concern.

  read.py      read tasks: fetch the bytes, make the header checks (no decoding)
  decode.py    in the first model actor: bytes -> square RGB crops (GPU for JPEG where there is one)
  detect.py    Detect (RetinaFace, 5 landmarks)
  fiqa.py      SER-FIQ, MagFace on the aligned face (+ the recognition embedding)
  mask.py      Mask (face parsing) and Components (pose, resolution, sharpness, exposure)
  iqa.py       DBCNN on the masked face, TOPIQ-face on the FFHQ-aligned face
  actor.py     FusedModels: the model actor (stages in one process, host work overlapped)
  registry.py  which stages a config runs, in order, and their dependencies
  decide.py    the decision and the manifest rows

Batch columns, in order of appearance:
  uri [+ prev_* reuse columns, cafi/reuse.py], status ("ok" while in flight, then "scored" |
  "no_face" | "error"), error, width, height, data (encoded bytes) -> image (N,S,S,3 uint8)
  -> det_score, landmarks (N,10) -> serfiq_raw / magface_raw [, embedding] -> face_mask (N,S,S),
  mask_fraction -> components -> dbcnn / topiq_face -> decide: serfiq, magface, cafi, accepted,
  decision, reject_reason, ...
"""

from cafi.decision import ERROR, NO_FACE, OK, SCORED
from cafi.fetch import read_bytes
from cafi.stages.actor import FusedModels, take_over_only
from cafi.stages.base import ModelStage
from cafi.stages.decide import decide
from cafi.stages.detect import Detect
from cafi.stages.fiqa import MagFaceStage, SerFiqStage
from cafi.stages.iqa import DbcnnStage, TopiqFaceStage
from cafi.stages.mask import Components, Mask
from cafi.stages.read import read_objects
from cafi.stages.registry import stage_classes

__all__ = ["ERROR", "NO_FACE", "OK", "SCORED", "Components", "DbcnnStage", "Detect", "FusedModels", "MagFaceStage",
           "Mask", "ModelStage", "SerFiqStage", "TopiqFaceStage", "decide", "read_bytes", "read_objects",
           "stage_classes", "take_over_only"]
