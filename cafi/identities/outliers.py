"""Outliers: each sample's cosine to the centroid of the *other* samples of its identity.

A sample must not vote for itself: in an identity of a few samples it pulls a plain centroid towards
itself (with two samples, a plain centroid is always within 45 degrees of both). The leave-one-out
centroid is the group sum less the sample, so a whole bucket is a few vectorised passes. With
weights (the quality's rank within the identity) better samples pull harder; with K sub-centres
(sub-center ArcFace) the reference is the dominant sub-centre of the identity, so a second person
under the label is measured against the majority, not against a mean of the two.
"""

from __future__ import annotations

import numpy as np

from cafi.identities.options import Options
from cafi.identities.vectors import Groups, row_norms

EPS = 1e-6


def rank_weights(groups: Groups, valid: np.ndarray) -> np.ndarray:
    """1 for an identity's best sample down to 1/n for its worst (rows sorted best first); 0 without embedding."""
    return np.where(valid, 1.0 - groups.position() / groups.sizes[groups.gid], 0.0).astype(np.float32)


def leave_one_out_cos(x: np.ndarray, groups: Groups, weights: np.ndarray) -> np.ndarray:
    """cos(x_i, sum_{j != i in its group} w_j x_j); NaN where nothing else of the identity has an embedding."""
    wx = x * weights[:, None]
    rest = groups.sums(wx)[groups.gid]
    rest -= wx
    norm = row_norms(rest)
    dot = np.einsum("ij,ij->i", x, rest)
    others = (groups.sums((weights > 0).astype(np.int64))[groups.gid] - (weights > 0)) > 0
    ok = others & (norm > EPS) & (weights > 0)
    return np.where(ok, dot / np.where(ok, norm, 1.0), np.nan)


def _spherical_kmeans(x: np.ndarray, k: int, iters: int = 10) -> np.ndarray:
    """Labels of a deterministic spherical k-means (farthest-point start from the first row)."""
    centres = [x[0]]
    for _ in range(1, k):
        sims = np.max(x @ np.array(centres).T, axis=1)
        centres.append(x[int(np.argmin(sims))])
    c = np.array(centres)
    labels = np.zeros(len(x), np.int64)
    for _ in range(iters):
        labels = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            s = x[labels == j].sum(axis=0)
            n = np.linalg.norm(s)
            if n > EPS:
                c[j] = s / n
    return labels


def subcentre_cos(x: np.ndarray, groups: Groups, weights: np.ndarray, k: int) -> np.ndarray:
    """Like leave_one_out_cos, against the dominant (most populated) of k sub-centres of each identity:
    its members leave themselves out; the others are compared with the whole dominant sub-centre."""
    cos = leave_one_out_cos(x, groups, weights)
    for g in np.flatnonzero(groups.sizes >= 2 * k):
        rows = np.arange(groups.starts[g], groups.starts[g] + groups.sizes[g])
        rows = rows[weights[rows] > 0]
        if len(rows) < 2 * k:
            continue
        labels = _spherical_kmeans(x[rows], k)
        dominant = np.bincount(labels, minlength=k).argmax()
        members = labels == dominant
        w = weights[rows] * members
        total = (x[rows] * w[:, None]).sum(axis=0)
        rest = total[None, :] - x[rows] * w[:, None]
        norm = np.linalg.norm(rest, axis=1)
        ok = norm > EPS
        cos[rows] = np.where(ok, np.einsum("ij,ij->i", x[rows], rest) / np.where(ok, norm, 1.0), np.nan)
    return cos


def centroid_cos(x: np.ndarray, groups: Groups, valid: np.ndarray, options: Options) -> np.ndarray:
    weights = rank_weights(groups, valid) if options.weighted else valid.astype(np.float32)
    if options.subcentres > 1:
        return subcentre_cos(x, groups, weights, options.subcentres)
    return leave_one_out_cos(x, groups, weights)


def flag(cos: np.ndarray, groups: Groups, options: Options) -> np.ndarray:
    """Outliers: below --min-centroid-cos, or (--outlier-mad k) below the identity's median by more than
    k MADs where the identity has at least 3 measured samples. NaN (nothing to compare with) never is."""
    out = np.isfinite(cos) & (cos < options.min_centroid_cos)
    if options.outlier_mad is not None and groups.count:
        med, m = groups.median(cos)
        mad, _ = groups.median(np.abs(cos - med[groups.gid]))
        low = med - options.outlier_mad * np.maximum(mad, 1e-3)  # a floor: identical samples have MAD 0
        out |= np.isfinite(cos) & (m[groups.gid] >= 3) & (cos < low[groups.gid])
    return out
