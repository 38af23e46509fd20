"""`cafi identities`: curation of a committed run's identities, not only of its crops.

A face training set is a set of identities; per-crop quality cannot see label noise, duplicate
photos, one person under two labels or identities that swamp the rest. This package reads a
run's stored embeddings and a quality column with an identity per sample, and labels every
sample `keep` or the first `reason` that removes it, in this order (REASONS):

  no_embedding     the run stored no embedding for it (no face, error): nothing to compare
  outlier          its cosine to the centroid of the *other* samples of its identity is below
                   --min-centroid-cos (default 0.225: the ArcFace paper's hard threshold for
                   cleaning MS1MV0), or with --outlier-mad k below its identity's median by more
                   than k median absolute deviations
  conflict         a sample of another identity is at cosine >= --conflict-cos (the same photo
                   under two labels); both sides are flagged (`conflict_with`), and both are
                   removed unless one side is an outlier of its own identity and the other is not
                   (then only the outlier's label is the wrong one)
  duplicate        another sample of its identity at cosine >= --dup-cos has better quality: the
                   best copy is kept, the others are `duplicate_of` it
  over_cap         beyond the --max-per-identity best (by --quality) of what is left of its identity
  small_identity   its identity keeps fewer than --min-per-identity samples after the rules above

Why the absolute outlier rule is the default: it is the published, at-scale rule (ArcFace's
MS1MV0 cleaning; sub-center ArcFace drops samples beyond 70-80 degrees of the dominant centre),
and it means the same thing for an identity of 3 samples as for one of 3,000. A rule relative to
the identity flags the tail of every clean identity (below median - k MAD there is always
someone), needs several samples to estimate a median and a MAD, and moves with the noise it
should find: in an identity that is mostly noise, the noise sets the median. The relative rule is
there for embeddings of another scale (a recognition model whose genuine cosines sit elsewhere).

Modules, each importing only those above it: options (the settings and their checks), vectors
(embeddings and groups as numpy), outliers, duplicates, caps, ann (the faiss index), buckets (the
Ray Data hash buckets by identity), analyse (one bucket's within-identity work), conflicts (the
cross-identity search, in parallel tasks per index cell group), merges (identity pairs whose
centroids are close), finish (keep and reason per bucket), page (identities.html), command (the
whole command and its outputs).
"""
