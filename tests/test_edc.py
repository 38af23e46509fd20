"""The EDC (cafi/edc.py) on identity sets whose quality is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cafi import edc


def identity_set(n_ids: int = 100, per: int = 4, sigma: float = 20.0, power: float = 6.0, seed: int = 0,
                 dim: int = 512):
    """Embeddings whose genuine similarity falls with a hidden quality q in [0, 1]:
    normalise(identity centre + sigma * (1 - q)**power * noise). With a high power only low-quality
    samples are noisy, so a pair's similarity is set by its worse sample, as the min pair quality assumes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_ids), per)
    q = rng.uniform(0, 1, len(ids))
    noise = rng.normal(size=(len(ids), dim)) / math.sqrt(dim)
    emb = centres[ids] + sigma * (1 - q)[:, None] ** power * noise
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float16), np.array([f"person-{i}" for i in ids]), q, rng


@pytest.fixture(scope="module")
def constructed():
    emb, ids, q, rng = identity_set()
    qualities = {"true": q, "random": rng.uniform(size=len(q)), "reversed": -q}
    return emb, ids, q, edc.evaluate(emb, ids, qualities, edc.Options(nonmated=200_000, target_fnmr=0.05))


# ---------------------------------------------------------------- the curve by hand


def test_curve_by_hand_ties_go_together():
    sim = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.95])
    q = np.array([5.0, 1.0, 3.0, 1.0, 3.0, 7.0])       # two pairs at q=1 (both errors), two at q=3
    c = edc.edc(sim, q, threshold=0.5)
    # Points only where the quality changes: 0, 2/6, 4/6, 5/6, then the closing point.
    assert c.discard.tolist() == pytest.approx([0, 2 / 6, 4 / 6, 5 / 6, 1.0])
    assert c.fnmr.tolist() == pytest.approx([2 / 6, 0, 0, 0, 0])
    assert c.quality.tolist() == [1.0, 3.0, 5.0, 7.0, np.inf]
    # pAUC: the step function's area: 2/6 held over [0, 2/6).
    assert edc.pauc(c, 0.2) == pytest.approx(2 / 6 * 0.2)
    assert edc.pauc(c, 1.0) == pytest.approx(2 / 6 * 2 / 6)
    assert c.at(0.0) == c.at(0.33) == pytest.approx(2 / 6) and c.at(2 / 6) == 0
    # A similarity equal to the threshold is a match.
    assert edc.edc(np.array([0.5, 0.4]), np.array([1.0, 2.0]), 0.5).fnmr[0] == 0.5


def test_ideal_and_random_baselines():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=1000)
    t = edc.threshold_at_fnmr(sim, 0.1)
    start = edc.false_non_match_rate(sim, t)
    ideal, rand = edc.ideal_edc(sim, t), edc.random_edc(sim, t)
    # The ideal order removes every false non-match first: FNMR 0 once the starting error is discarded.
    assert ideal.at(start) == 0 and ideal.at(start - 0.002) > 0
    assert edc.pauc(ideal, 0.2) == pytest.approx(sum((100 - k) / (1000 - k) for k in range(100)) / 1000)
    # The random order's expectation is flat at the starting error.
    assert rand.at(0.0) == rand.at(0.5) == start and edc.pauc(rand, 0.2) == pytest.approx(0.2 * start)
    # No quality does better than the ideal order.
    for _ in range(5):
        assert edc.pauc(edc.edc(sim, rng.normal(size=1000), t), 0.2) >= edc.pauc(ideal, 0.2)


def test_thresholds_fixed_once():
    rng = np.random.default_rng(2)
    nonmated = rng.normal(0, 0.05, 100_000).astype(np.float32)
    t = edc.threshold_at_fmr(nonmated, 1e-3)
    assert np.sum(nonmated >= t) == 100  # FMR exactly 1e-3 on this sample (linear quantile)
    assert edc.false_match_rate(nonmated, t) == pytest.approx(1e-3)
    mated = rng.normal(0.6, 0.2, 1000).astype(np.float32)
    t = edc.threshold_at_fnmr(mated, 0.05)
    assert edc.false_non_match_rate(mated, t) == pytest.approx(0.05)
    # The threshold is a float32, so float32 and float64 comparisons agree.
    assert np.float32(t) == t and np.array_equal(mated >= t, mated.astype(np.float64) >= t)


# ---------------------------------------------------------------- pairs and similarities


def test_mated_pairs_are_every_same_identity_pair():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 40, 300)
    i, j = edc.mated_pairs(codes)
    got = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist(), strict=True)}
    want = {(a, b) for a in range(300) for b in range(a + 1, 300) if codes[a] == codes[b]}
    assert got == want and len(i) == len(want) == edc.mated_count(codes)
    with pytest.raises(ValueError, match="mated pairs"):
        edc.mated_pairs(codes, limit=len(want) - 1)


def test_nonmated_pairs_all_or_a_seeded_sample():
    codes = np.repeat(np.arange(30), 5)
    i, j, sampled = edc.nonmated_pairs(codes, 1_000_000, np.random.default_rng(0))
    assert not sampled and len(i) == edc.nonmated_total(codes) == (150 * 150 - 30 * 25) // 2
    assert np.all(codes[i] != codes[j])
    i, j, sampled = edc.nonmated_pairs(codes, 5000, np.random.default_rng(7))
    assert sampled and len(i) == 5000 and np.all(codes[i] != codes[j])
    i2, j2, _ = edc.nonmated_pairs(codes, 5000, np.random.default_rng(7))
    assert np.array_equal(i, i2) and np.array_equal(j, j2)  # seeded


def test_similarities_in_chunks_are_cosines_in_float32():
    rng = np.random.default_rng(4)
    emb16 = rng.normal(size=(50, 512)).astype(np.float16)
    emb = edc.normalise(emb16)
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    i, j = rng.integers(0, 50, 999), rng.integers(0, 50, 999)
    want = np.array([np.dot(emb[a], emb[b]) for a, b in zip(i, j, strict=True)])
    assert np.allclose(edc.similarities(emb, i, j, chunk=64), want, atol=1e-5)


# ---------------------------------------------------------------- quality known by construction


def test_constructed_quality_is_near_ideal(constructed):
    _, _, _, res = constructed
    true = next(s for s in res.scores if s.name == "true")
    # The EDC falls, about as fast as the ideal order's...
    assert true.curve.at(0.1) < 0.75 * res.start_fnmr and true.fnmr_at_limit < 0.5 * res.start_fnmr
    assert true.fnmr_at_limit < res.ideal.fnmr_at_limit + 0.05
    # ...and its area is close to the ideal order's, far below the random order's.
    assert true.relative < 0.2, (true.pauc, res.ideal.pauc, res.random.pauc)
    assert res.scores[0] is true  # best first


def test_random_quality_is_flat_and_reversed_is_worse(constructed):
    _, _, _, res = constructed
    by = {s.name: s for s in res.scores}
    assert abs(by["random"].relative - 1) < 0.15
    assert by["random"].fnmr_at_limit == pytest.approx(res.start_fnmr, rel=0.2)
    assert by["reversed"].pauc > res.random.pauc and by["reversed"].relative > 1.1
    assert [s.name for s in res.scores] == ["true", "random", "reversed"]


def test_fnmr_at_zero_discard_is_the_starting_error(constructed):
    emb, ids, _, res = constructed
    assert res.mated == 100 * 6 and res.identities == 100 and res.samples == 400
    assert res.fmr == pytest.approx(1e-3, rel=0.05) and res.nonmated == edc.nonmated_total(edc.identity_codes(ids))
    e = edc.normalise(emb)
    i, j = edc.mated_pairs(edc.identity_codes(ids))
    start = float(np.mean(edc.similarities(e, i, j) < res.threshold))
    assert res.start_fnmr == pytest.approx(start)
    for s in (res.ideal, res.random, *res.scores):
        assert s.curve.discard[0] == 0 and s.curve.fnmr[0] == pytest.approx(start), s.name


def test_target_threshold_reaches_the_target(constructed):
    emb, ids, q, res = constructed
    true = next(s for s in res.scores if s.name == "true")
    t = true.target
    assert t.reached and 0 < t.discard < 1 and t.quality is not None
    # Keeping the samples at or above that quality leaves mated pairs with FNMR <= the target.
    e = edc.normalise(emb)
    i, j = edc.mated_pairs(edc.identity_codes(ids))
    keep = (q[i] >= t.quality) & (q[j] >= t.quality)
    sim = edc.similarities(e, i, j)
    assert np.mean(sim[keep] < res.threshold) <= 0.05
    assert 1 - keep.mean() == pytest.approx(t.discard)
    assert not next(s for s in res.scores if s.name == "reversed").target.reached or \
        next(s for s in res.scores if s.name == "reversed").target.discard > t.discard


def test_pair_quality_is_the_minimum():
    """Two mated pairs: (0, 1) fails and has qualities (0.0, 1.0); (2, 3) matches with (0.4, 0.4). The
    minimum discards the failing pair first (FNMR 0 at half discarded); the mean (0.5 vs 0.4) would
    discard the matching pair first (FNMR 1)."""
    emb = np.array([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.float32)
    ids = np.array(["a", "a", "b", "b"])
    q = np.array([0.0, 1.0, 0.4, 0.4])
    assert edc.pair_quality(q, np.array([0, 2]), np.array([1, 3])).tolist() == [0.0, 0.4]
    res = edc.evaluate(emb, ids, {"q": q}, edc.Options(start_fnmr=0.5, min_mated=1, pauc_limit=1.0))
    assert res.start_fnmr == 0.5
    curve = res.scores[0].curve
    assert curve.at(0.5) == 0.0
    assert res.scores[0].pauc == pytest.approx(res.ideal.pauc) == pytest.approx(0.25)


def test_samples_without_quality_go_first():
    q = np.array([np.nan, 0.5, 0.1, 0.9])
    pq = edc.pair_quality(q, np.array([0, 1, 2]), np.array([1, 2, 3]))
    assert pq.tolist() == [-np.inf, 0.1, 0.1]
    c = edc.edc(np.array([0.1, 0.9, 0.9]), pq, 0.5)
    assert c.discard.tolist() == pytest.approx([0, 1 / 3, 1]) and c.fnmr.tolist() == pytest.approx([1 / 3, 0, 0])


def test_too_few_mated_pairs_give_a_message_not_a_curve():
    emb, ids, q, _ = identity_set(n_ids=30, per=2)
    res = edc.evaluate(emb, ids, {"q": q}, edc.Options(min_mated=31))
    assert res.mated == 30 and res.scores == [] and res.ideal is None and res.threshold is None
    assert res.message.startswith("only 30 mated pairs") and "fewer than the minimum of 31" in res.message
    ok = edc.evaluate(emb, ids, {"q": q}, edc.Options(min_mated=30))
    assert ok.message is None and len(ok.scores) == 1


def test_resample_keeps_the_step_function():
    rng = np.random.default_rng(6)
    sim, q = rng.normal(size=20_000), rng.normal(size=20_000)
    c = edc.edc(sim, q, 0.0)
    x, y = edc.resample(c, 500)
    assert len(x) == 500 and x[0] == 0 and x[-1] == 1
    assert all(y[k] == c.at(x[k]) for k in range(0, 500, 37))
    short = edc.edc(sim[:50], q[:50], 0.0)
    assert edc.resample(short, 500)[0] is short.discard
