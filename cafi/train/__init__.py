"""`cafi train ...`: scorers learned from a committed run's own rows.

The modules every trainer shares (no trainer's name in them):
  run_rows.py  a run's committed manifest files, its identities (CSV or kept column), checks of what it stored
  faces.py     a Ray Data dataset of 112x112 faces re-aligned from the run's stored landmarks, with targets
  split.py     the held-out split by identity, rank correlation
  outputs.py   writing JSON, text, checkpoints and the held-out identities CSV to any fsspec DIR
One trainer's modules carry its name: SDD-FIQA is sdd_labels.py (the pseudo-label math), sdd_label_job.py
(the labels as a Ray Data job), sdd_fit.py (the TorchTrainer loop), sdd_page.py (train.html) and
sddfiqa.py (the command).
"""
