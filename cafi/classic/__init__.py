"""The score-based FQA ("classic") classifier's features: GIST, HOG, LBP on the aligned face, and the
run's recognition embedding as the CNN feature (cafi/classic/features.py)."""
