"""Error-versus-discard characteristic (EDC) of quality scores, as ISO/IEC 29794-1:2024 defines it.

A quality score is useful for recognition when discarding the samples it rates lowest removes
the comparisons that fail. The EDC measures exactly that (ISO/IEC 29794-1:2024, clause 11,
"Evaluation"): comparisons are discarded in ascending order of their pairwise quality
(clause 10, "Pairwise quality": the lower of the two samples' qualities), and the error rate
of the comparisons that remain is plotted against the fraction discarded, with the decision
threshold fixed once, before anything is discarded. The partial area under the curve (pAUC)
up to a discard limit summarises it: lower is better.

Conventions, following the reference implementation of the clause's editors (Schlett et al.,
"Considerations on the evaluation of biometric quality assessment algorithms", IEEE T-BIOM 2024):
- FNM-EDC: the error is the false non-match rate (FNMR) of the mated comparisons;
- a comparison with similarity >= t is a match (a score equal to t matches);
- t is set once: from the non-mated comparisons at a target false-match rate, or from the mated
  ones at a target starting FNMR (numpy's linear quantile in both cases);
- comparisons with equal pair quality are discarded together: the curve has a point only where
  the pair quality changes, plus the closing point (discard 1, FNMR 0);
- the discard fraction counts comparisons, not samples;
- pAUC is the integral of the step function (each FNMR holds until the next point), not normalised.

Decisions of this module (the standard leaves them open):
- a sample without a quality value (NaN: no face found, a score the run did not compute) counts
  as the lowest quality: its pairs are discarded first, all together;
- the random baseline is the *expected* curve of a uniformly random discard order, which is flat
  at the starting FNMR (a random discard removes errors and non-errors in proportion), so it needs
  no seed and has no sampling noise;
- the ideal baseline discards the mated comparisons in ascending similarity: every false
  non-match first (the "oracle" of the literature).

Memory is bounded by the comparisons, not by samples squared: mated pairs are generated per
identity (sum of k(k-1)/2 over identities of k samples), non-mated pairs are a seeded sample of a
chosen size, and similarities are computed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHUNK = 16_384                 # pairs per similarity chunk (two 32 MB gathers at 512 dims)
MAX_MATED = 20_000_000         # mated pairs kept in memory (about 0.5 GB with their similarities and qualities)
MAX_POINTS = 2_000             # curve points written or drawn; the pAUC always uses every point


# ---------------------------------------------------------------- comparisons

def normalise(embeddings: np.ndarray) -> np.ndarray:
    """float16 (or any) embeddings as L2-normalised float32 rows: float16 storage leaves norms ~1e-3 off."""
    e = np.array(embeddings, dtype=np.float32)  # a copy, normalised in place
    with np.errstate(invalid="ignore", divide="ignore"):
        e /= np.linalg.norm(e, axis=1, keepdims=True)
    return e


def identity_codes(identities: np.ndarray) -> np.ndarray:
    """Identity labels of any type as integer codes 0..m-1."""
    return np.unique(np.asarray(identities), return_inverse=True)[1].astype(np.int64).ravel()


def mated_count(codes: np.ndarray) -> int:
    sizes = np.bincount(codes)
    return int((sizes * (sizes - 1) // 2).sum())


def mated_pairs(codes: np.ndarray, limit: int = MAX_MATED) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair of samples of the same identity, as two index arrays (i, j), i != j.

    Generated per group size: all identities with k samples share one k x k upper triangle."""
    total = mated_count(codes)
    if total > limit:
        raise ValueError(f"{total:,} mated pairs: more than the {limit:,} this evaluation holds in memory; "
                         "evaluate a subset of the samples of the largest identities")
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(codes) else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, len(codes)])
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k in np.unique(sizes[sizes >= 2]):
        a, b = np.triu_indices(int(k), 1)
        s = starts[sizes == k][:, None]
        out_i.append(order[(s + a).ravel()])
        out_j.append(order[(s + b).ravel()])
    return np.concatenate(out_i), np.concatenate(out_j)


def nonmated_total(codes: np.ndarray) -> int:
    n = len(codes)
    sizes = np.bincount(codes) if n else np.zeros(0, np.int64)
    return int((n * n - int((sizes.astype(np.int64) ** 2).sum())) // 2)


def nonmated_pairs(codes: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pairs of samples of different identities: all of them when there are at most `n` pairs of
    samples in all, else `n` drawn uniformly (with replacement) from the non-mated pairs.
    Returns (i, j, sampled)."""
    size = len(codes)
    if size * (size - 1) // 2 <= n:  # small sets: every pair, exactly
        i, j = np.triu_indices(size, 1)
        keep = codes[i] != codes[j]
        return i[keep].astype(np.int64), j[keep].astype(np.int64), False
    if nonmated_total(codes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), False
    got_i, got_j, have = [], [], 0
    while have < n:
        draw = int((n - have) * 1.2) + 1024
        i, j = rng.integers(0, size, draw), rng.integers(0, size, draw)
        keep = codes[i] != codes[j]  # also drops i == j
        got_i.append(i[keep])
        got_j.append(j[keep])
        have += int(keep.sum())
    return np.concatenate(got_i)[:n], np.concatenate(got_j)[:n], True


def similarities(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Cosine similarity of rows i and j of L2-normalised float32 embeddings, in chunks of pairs.

    Random row gathers dominate the cost, so pairs are visited in order of i (one side reads
    memory in order) and each chunk's dot products are one batched matmul."""
    order = np.argsort(i, kind="stable")
    out = np.empty(len(i), dtype=np.float32)
    for s in range(0, len(i), chunk):
        sel = order[s:s + chunk]
        a, b = embeddings[i[sel]], embeddings[j[sel]]
        out[sel] = np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]
    return out


# ---------------------------------------------------------------- the decision threshold (fixed once)

def _float32_ceiling(t: float) -> float:
    """The smallest float32 >= t: for float32 similarities, s >= t then reads the same in float32 and
    in float64 (a float32 rounding of t down onto a similarity would turn it into a match)."""
    t32 = np.float32(t)
    if t32 < t:
        t32 = np.nextafter(t32, np.float32(np.inf))
    return float(t32)


def threshold_at_fmr(nonmated: np.ndarray, fmr: float) -> float:
    """The similarity t at which the non-mated comparisons' false-match rate (share with s >= t) is
    `fmr`: their (1 - fmr) linear quantile."""
    return _float32_ceiling(np.quantile(np.asarray(nonmated, np.float64), 1.0 - fmr))


def threshold_at_fnmr(mated: np.ndarray, fnmr: float) -> float:
    """The similarity t at which the mated comparisons' false non-match rate (share with s < t) is
    about `fnmr`: their `fnmr` linear quantile."""
    return _float32_ceiling(np.quantile(np.asarray(mated, np.float64), fnmr))


def false_match_rate(nonmated: np.ndarray, threshold: float) -> float:
    return float(np.mean(nonmated >= threshold)) if len(nonmated) else float("nan")


def false_non_match_rate(mated: np.ndarray, threshold: float) -> float:
    return float(np.mean(mated < threshold)) if len(mated) else float("nan")


# ---------------------------------------------------------------- the curve

def pair_quality(quality: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """ISO/IEC 29794-1:2024 clause 10: the pairwise quality is the lower of the two samples' qualities
    (oriented: higher is better). NaN (no value) is the lowest quality of all: -inf."""
    q = np.where(np.isnan(quality), -np.inf, np.asarray(quality, np.float64))
    return np.minimum(q[i], q[j])


@dataclass
class Curve:
    """FNMR of the remaining mated comparisons after discarding a fraction of them.

    At point k, the comparisons with pair quality below `quality[k]` are discarded; `quality` is the
    threshold that achieves it (the last point, everything discarded, has +inf)."""

    discard: np.ndarray
    fnmr: np.ndarray
    quality: np.ndarray

    def at(self, x: float) -> float:
        """The step function's value at discard fraction x."""
        return float(self.fnmr[max(0, int(np.searchsorted(self.discard, x, side="right")) - 1)])


def edc(similarity: np.ndarray, quality: np.ndarray, threshold: float) -> Curve:
    """ISO/IEC 29794-1:2024 clause 11: the FNM-EDC of mated comparisons (`similarity`, pair `quality`)
    at a fixed `threshold`. Discards in ascending quality; equal qualities go together."""
    n = len(similarity)
    if n == 0:
        return Curve(np.array([0.0, 1.0]), np.array([0.0, 0.0]), np.array([-np.inf, np.inf]))
    order = np.argsort(quality, kind="stable")
    q = np.asarray(quality, np.float64)[order]
    errors = (np.asarray(similarity)[order] < threshold).astype(np.int64)
    remaining_errors = np.cumsum(errors[::-1])[::-1]             # errors among comparisons k..n-1
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])          # where a run of equal qualities begins
    discard = starts / n
    fnmr = remaining_errors[starts] / (n - starts)
    quality_at = q[starts]
    if discard[-1] < 1.0:  # the closing point: everything discarded
        discard, fnmr, quality_at = np.r_[discard, 1.0], np.r_[fnmr, 0.0], np.r_[quality_at, np.inf]
    return Curve(discard.astype(np.float64), fnmr.astype(np.float64), quality_at)


def ideal_edc(similarity: np.ndarray, threshold: float) -> Curve:
    """The best possible discard order: ascending similarity, so every false non-match goes first."""
    return edc(similarity, np.asarray(similarity, np.float64), threshold)


def random_edc(similarity: np.ndarray, threshold: float) -> Curve:
    """The expected EDC of a uniformly random discard order: flat at the starting FNMR (discarding
    k of n at random leaves E0(n-k)/n errors among n-k comparisons, on average)."""
    start = false_non_match_rate(similarity, threshold) if len(similarity) else 0.0
    return Curve(np.array([0.0, 1.0]), np.array([start, 0.0]), np.array([np.nan, np.nan]))


def pauc(curve: Curve, limit: float) -> float:
    """Area under the step function from discard 0 to `limit` (each FNMR holds until the next point)."""
    x = np.r_[curve.discard, np.inf]
    widths = np.clip(np.minimum(x[1:], limit) - x[:-1], 0.0, None)
    return float(np.sum(curve.fnmr * widths))


@dataclass
class Target:
    """Where a curve first reaches a target FNMR: the discarded fraction and the (oriented) quality
    threshold that discards it; `quality` None: reached without discarding anything."""

    fnmr: float
    reached: bool
    discard: float | None = None
    quality: float | None = None
    below: float | None = None         # the highest quality discarded: any threshold in (below, quality] does it


def reach(curve: Curve, target: float) -> Target:
    """The first point of the curve (the closing point excluded) with FNMR <= target."""
    hits = np.flatnonzero((curve.fnmr <= target) & (curve.discard < 1.0))
    if len(hits) == 0:
        return Target(target, False)
    k = int(hits[0])
    if k == 0:
        return Target(target, True, 0.0)
    return Target(target, True, float(curve.discard[k]), float(curve.quality[k]), float(curve.quality[k - 1]))


def resample(curve: Curve, points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` (discard, fnmr) pairs for files and charts: the curve itself when short, else
    its step function read at evenly spaced discard fractions."""
    if len(curve.discard) <= points:
        return curve.discard, curve.fnmr
    grid = np.linspace(0.0, 1.0, points)
    idx = np.searchsorted(curve.discard, grid, side="right") - 1
    return grid, curve.fnmr[np.clip(idx, 0, len(curve.fnmr) - 1)]


# ---------------------------------------------------------------- one evaluation

@dataclass
class Options:
    nonmated: int = 1_000_000          # non-mated pairs sampled (all of them if there are fewer)
    seed: int = 0
    fmr: float = 1e-3                  # the threshold's false-match rate, unless start_fnmr is given
    start_fnmr: float | None = None    # the threshold's starting FNMR instead
    pauc_limit: float = 0.2
    min_mated: int = 100
    target_fnmr: float | None = None


@dataclass
class ScoreResult:
    name: str                          # a quality column, "ideal" or "random"
    order: str                         # "score", "ideal" or "random"
    curve: Curve
    pauc: float
    relative: float                    # (pAUC - ideal) / (random - ideal): 0 ideal, 1 random, > 1 worse
    fnmr_at_limit: float
    unrated_pairs: int = 0             # mated pairs with a sample without a value (discarded first)
    target: Target | None = None


@dataclass
class Result:
    samples: int
    identities: int
    mated: int
    nonmated: int = 0
    nonmated_sampled: bool = False
    threshold: float | None = None
    fmr: float | None = None           # achieved on the non-mated comparisons (None: not computed)
    start_fnmr: float | None = None
    options: Options = field(default_factory=Options)
    scores: list[ScoreResult] = field(default_factory=list)   # best (lowest pAUC) first
    ideal: ScoreResult | None = None
    random: ScoreResult | None = None
    message: str | None = None         # why there are no curves


def _scored(name: str, order: str, curve: Curve, limit: float, unrated: int = 0,
            target: float | None = None) -> ScoreResult:
    return ScoreResult(name, order, curve, pauc(curve, limit), float("nan"), curve.at(limit), unrated,
                       reach(curve, target) if target is not None else None)


def evaluate(embeddings: np.ndarray, identities: np.ndarray, qualities: dict[str, np.ndarray],
             options: Options | None = None) -> Result:
    """The FNM-EDC of every quality score over every mated pair of these samples.

    `embeddings`: (n, d) recognition embeddings; `identities`: n labels; `qualities`: name -> n values,
    oriented so that higher is better (NaN: no value). Samples are compared by cosine similarity."""
    opt = options or Options()
    codes = identity_codes(identities)
    mated = mated_count(codes)
    res = Result(len(codes), int(codes.max()) + 1 if len(codes) else 0, mated, options=opt)
    if mated < opt.min_mated:
        res.message = (f"only {mated:,} mated pairs (pairs of embedded samples of one identity; "
                       f"{res.samples:,} samples of {res.identities:,} identities), fewer than the minimum of "
                       f"{opt.min_mated:,} (--min-mated): no EDC is computed")
        return res
    emb = normalise(embeddings)
    i, j = mated_pairs(codes)
    mated_sim = similarities(emb, i, j)
    if opt.start_fnmr is None:
        ni, nj, res.nonmated_sampled = nonmated_pairs(codes, opt.nonmated, np.random.default_rng(opt.seed))
        res.nonmated = len(ni)
        if res.nonmated == 0:
            res.message = "no non-mated pairs (a single identity): the FMR threshold cannot be set; use --start-fnmr"
            return res
        nonmated_sim = similarities(emb, ni, nj)
        res.threshold = threshold_at_fmr(nonmated_sim, opt.fmr)
        res.fmr = false_match_rate(nonmated_sim, res.threshold)
    else:
        res.threshold = threshold_at_fnmr(mated_sim, opt.start_fnmr)
    res.start_fnmr = false_non_match_rate(mated_sim, res.threshold)
    limit, target = opt.pauc_limit, opt.target_fnmr
    res.ideal = _scored("ideal", "ideal", ideal_edc(mated_sim, res.threshold), limit, target=target)
    res.random = _scored("random", "random", random_edc(mated_sim, res.threshold), limit)
    for name, q in qualities.items():
        q = np.asarray(q, np.float64)
        unrated = int(np.sum(np.isnan(q[i]) | np.isnan(q[j])))
        res.scores.append(_scored(name, "score", edc(mated_sim, pair_quality(q, i, j), res.threshold), limit,
                                  unrated, target))
    span = res.random.pauc - res.ideal.pauc
    for s in (res.ideal, res.random, *res.scores):
        s.relative = (s.pauc - res.ideal.pauc) / span if span > 0 else float("nan")
    res.scores.sort(key=lambda s: (s.pauc, s.name))
    return res
