"""The job's stages: small callables over dict-of-numpy batches, one module per stage.

Model stages, each one module with its class and its spec (cafi/stages/spec.py), found by
cafi/stages/specs.py:
  detect.py      RetinaFace: best face, 5 landmarks
  serfiq.py      SER-FIQ on the aligned face (+ the recognition embedding)
  magface.py     MagFace on the aligned face
  parse.py       face parsing: the face mask and its fraction
  components.py  pose, resolution, sharpness, exposure (reads the live mask)
  dbcnn.py       DBCNN on the masked face
  topiq_face.py  TOPIQ-face on the FFHQ-aligned face
  decide.py      the decision and the manifest rows (CPU tasks; its spec holds the decision's settings)

Around them:
  read.py        read tasks: fetch the bytes, make the header checks (no decoding); shards' read step
  decode.py      in the first model actor: bytes -> square RGB crops (GPU for JPEG where there is one)
  faces.py       what scorers read besides the crop: the aligned face, the masked crop
  base.py        ModelStage, what every model stage shares
  actor.py       FusedModels: the model actor (stages in one process, host work overlapped)

Batch columns, in order of appearance:
  uri [+ prev_* reuse columns, cafi/reuse.py], status ("ok" while in flight, then "scored" |
  "no_face" | "error"), error, width, height, data (encoded bytes) -> image (N,S,S,3 uint8)
  -> det_score, landmarks (N,10) -> serfiq_raw / magface_raw [, embedding] -> face_mask (N,S,S),
  mask_fraction -> components -> dbcnn / topiq_face -> decide: serfiq, magface, cafi, accepted,
  decision, reject_reason, ...
"""
