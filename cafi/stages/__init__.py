"""The job's stages: small callables over dict-of-numpy batches, one module per stage.

Model stages: one module each (named after the stage: detect.py, parse.py, components.py and one per
FIQA or IQA scorer), holding its class and its spec (cafi/stages/spec.py); cafi/stages/specs.py finds
them and says which a config runs, in which order.

Around them:
  decide.py      the decision and the manifest rows (CPU tasks; the decision's spec is in specs.py)
  read.py        read tasks: fetch the bytes, make the header checks (no decoding); shards' read step
  decode.py      in the first model actor: bytes -> square RGB crops (GPU for JPEG where there is one)
  faces.py       what scorers read besides the crop: the aligned face, the masked crop
  base.py        ModelStage, what every model stage shares
  actor.py       FusedModels: the model actor (stages in one process, host work overlapped)

Batch columns, in order of appearance:
  uri [+ prev_* reuse columns, cafi/reuse.py], status ("ok" while in flight, then "scored" |
  "no_face" | "error"), error, width, height, data (encoded bytes) -> image (N,S,S,3 uint8)
  -> det_score, landmarks (N,10) -> the FIQA scorers' raw columns [, embedding] -> face_mask (N,S,S),
  mask_fraction -> components -> the IQA scorers' columns -> decide: the derived scores, cafi, accepted,
  decision, reject_reason, ...
"""
