"""SDD-FIQA pseudo-labels: the numpy core on constructed identity sets (fast), and `cafi train sddfiqa
--labels-only` end to end on a committed run with embeddings (slow: starts Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr, wasserstein_distance

from cafi.cli import main
from cafi.decision import OK
from cafi.train import sdd_labels

try:  # tests/ is a package here; still importable if it is not
    from .test_edc import identity_set
    from .test_report import decision_cfg, embedding_array, scored_table, write_run
except ImportError:  # pragma: no cover
    from test_edc import identity_set  # type: ignore[no-redef]
    from test_report import decision_cfg, embedding_array, scored_table, write_run  # type: ignore


def labels_of(emb: np.ndarray, ids: np.ndarray, seed: int, pool_size: int | None = None):
    """Labels of a whole constructed set as one bucket, pool = a seeded sample (all rows by default)."""
    from cafi.train.sdd_label_job import identity_codes

    codes = identity_codes(ids)
    order = np.argsort(codes, kind="stable")
    rng = np.random.default_rng(seed)
    pool = np.sort(rng.choice(len(ids), pool_size or len(ids), replace=False))
    pool = pool[np.argsort(codes[pool], kind="stable")]
    dist, n_same = sdd_labels.bucket_distances(emb[order], codes[order], sdd_labels.unit(emb[pool]), codes[pool],
                                               np.random.default_rng(seed))
    ok = n_same > 0
    labels = sdd_labels.normalise(dist, dist[ok].min(axis=0), dist[ok].max(axis=0))
    out, out_n = np.empty(len(ids)), np.empty(len(ids), int)
    out[order], out_n[order] = labels, n_same
    return out, out_n


def test_wasserstein_matches_scipy_for_every_size():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(60, 3, 24)), rng.normal(0.3, 0.5, size=(60, 3, 24))
    n_u = rng.integers(1, 25, 60)
    got = sdd_labels.wasserstein(u, n_u, v)
    want = np.array([[wasserstein_distance(u[i, r, :n_u[i]], v[i, r]) for r in range(3)] for i in range(60)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_draws_are_distinct_others_of_the_same_identity():
    k = np.array([2, 10, 25, 26, 60, 400])
    p = np.array([1, 0, 24, 3, 59, 200])
    pos, n_same = sdd_labels.same_draws(k, p, np.random.default_rng(1))
    assert n_same.tolist() == [1, 9, 24, 24, 24, 24]
    for i in range(len(k)):
        for r in range(sdd_labels.REPEATS):
            d = pos[i, r, :n_same[i]]
            assert len(set(d.tolist())) == n_same[i] and p[i] not in d and d.min() >= 0 and d.max() < k[i]
    assert not np.array_equal(pos[5, 0], pos[5, 1])  # fresh draws for a large identity


def test_labels_follow_the_hidden_quality():
    """Genuine similarity falls smoothly with a hidden quality q (noise ~ 2 (1 - q)): the pseudo-label
    ranks the samples as q does."""
    emb, ids, q, _ = identity_set(n_ids=80, per=8, seed=5, dim=128, sigma=2.0, power=1.0)
    labels, n_same = labels_of(emb, ids, seed=0, pool_size=400)
    assert (n_same == 7).all()
    assert spearmanr(labels, q).statistic >= 0.8
    assert labels.min() >= 0 and labels.max() <= 100


def test_one_sample_identities_get_no_label_and_the_seed_reproduces():
    emb, ids, q, _ = identity_set(n_ids=40, per=6, seed=2, dim=64)
    ids = ids.copy()
    ids[[0, 7, 100]] = ["solo-a", "solo-b", "solo-c"]  # three identities of one sample
    a, n_a = labels_of(emb, ids, seed=3)
    b, n_b = labels_of(emb, ids, seed=3)
    c, _ = labels_of(emb, ids, seed=4)
    solo = np.isin(ids, ["solo-a", "solo-b", "solo-c"])
    assert np.isnan(a[solo]).all() and (n_a[solo] == 0).all()
    assert not np.isnan(a[~solo]).any() and (n_a[~solo] >= 4).all()
    np.testing.assert_array_equal(a[~solo], b[~solo])
    np.testing.assert_array_equal(n_a, n_b)
    assert not np.allclose(a[~solo], c[~solo])  # the draws depend on the seed


def test_too_few_other_identities_is_said():
    emb, ids, _, _ = identity_set(n_ids=2, per=10, seed=1, dim=32)
    with pytest.raises(ValueError, match="24 samples of other identities"):
        labels_of(emb, ids, seed=0)


# ---------------------------------------------------------------- the command on a committed run

RUN_ID = "20250101T000000Z-5dd0f1"


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A committed run of 50 identities x 6 samples with embeddings whose genuine similarity falls with a
    hidden quality q; two identities of one sample; one row without an embedding (no face)."""
    root = tmp_path_factory.mktemp("sddfiqa")
    emb, ids, q, _ = identity_set(n_ids=50, per=6, seed=11, sigma=2.0, power=1.0)
    ids = ids.copy()
    ids[[5, 200]] = ["solo-1", "solo-2"]
    n = len(ids)
    uris = [f"/crops/{k}.jpg" for k in range(n)]
    scored = np.ones(n, bool)
    scored[40] = False
    status = np.where(scored, OK, "no_face").tolist()
    nan = np.full(n, np.nan)
    values = {"uri": uris, "status": status, "serfiq": np.where(scored, q, nan),
              "embedding": embedding_array(emb, scored)}
    cfg = decision_cfg(min_serfiq=0.0)
    out = str(root / "out")
    run = write_run(out, scored_table(values, cfg, RUN_ID, "v1"), RUN_ID, cfg, files=3)
    path = root / "ids.csv"
    path.write_text("uri,person\n" + "".join(f"{u},{i}\n" for u, i in zip(uris, ids, strict=True)))
    no_emb = str(root / "plain")
    values_plain = dict(values, embedding=embedding_array(emb, np.zeros(n, bool)))
    plain = write_run(no_emb, scored_table(values_plain, cfg, RUN_ID, "v1"), RUN_ID, cfg)
    return {"run": run, "ids": str(path), "q": q, "uris": uris, "identities": ids, "scored": scored, "plain": plain}


def test_without_embeddings_it_says_so_and_stops(labelled_run, tmp_path, capsys):
    argv = ["train", "sddfiqa", labelled_run["plain"], "--identities", labelled_run["ids"],
            "--identity-column", "person", "--out", str(tmp_path / "o"), "--labels-only"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stored no embeddings" in err and "output.embeddings=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_identity_from_the_csv_or_a_kept_column():
    from cafi.train.run_rows import with_identity

    emb = embedding_array(np.eye(4, 512), np.array([True, True, False, True]))
    batch = pa.table({"uri": ["a", "b", "c", "d"], "embedding": emb, "scored_at": pa.array([1, 2, 3, 4]),
                      "person": pa.array([7, None, 8, 9])})
    ids = pa.table({"uri": ["d", "a", "c"], "identity": ["x", "y", "z"]})
    got = with_identity(batch, ids, None, ["uri", "embedding", "scored_at"])  # b is not listed, c has no embedding
    assert got["uri"].to_pylist() == ["a", "d"] and got["identity"].to_pylist() == ["y", "x"]
    kept = with_identity(batch, None, "person", ["uri", "embedding", "scored_at"])  # b has no identity, c no embedding
    assert kept["uri"].to_pylist() == ["a", "d"] and kept["identity"].to_pylist() == ["7", "9"]


def test_a_missing_kept_identity_column_is_named(labelled_run, tmp_path, capsys):
    argv = ["train", "sddfiqa", labelled_run["run"], "--identity-column", "person", "--out", str(tmp_path / "o"),
            "--labels-only"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "kept no column 'person'" in err and "--identities" in err


@pytest.mark.slow
def test_cli_pseudo_labels_end_to_end(labelled_run, ray_local, s3, capsys, monkeypatch, tmp_path):
    from cafi.train import sdd_label_job
    from cafi.train.sddfiqa import labels

    small_set = sdd_label_job.LOCAL_ROWS
    monkeypatch.setattr(sdd_label_job, "LOCAL_ROWS", 0)  # the distributed path (buckets, pool, shuffle)
    s3.mkdir("sdd-labels")
    out = "s3://sdd-labels/train/v1"  # DIR is any fsspec URI: here the loopback S3
    argv = ["train", "sddfiqa", labelled_run["run"], "--identities", labelled_run["ids"],
            "--identity-column", "person", "--out", out, "--labels-only", "--seed", "7"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "297 of 299 rows labelled" in printed and "2 rows of one-sample identities" in printed
    with s3.open(f"{out}/labels.parquet", "rb") as fh:
        table = pq.read_table(fh)
    assert table.schema.names == ["uri", "identity", "label", "n_same"]
    assert table.schema.field("label").type == pa.float32()
    got = table.to_pandas().set_index("uri")
    uris = np.array(labelled_run["uris"])
    scored = labelled_run["scored"]
    assert sorted(got.index) == sorted(uris[scored])  # the row without an embedding is not there
    solo = got.identity.str.startswith("solo-")
    assert got.label[solo].isna().all() and (got.n_same[solo] == 0).all()
    assert got.label[~solo].notna().all() and got.label[~solo].between(0, 100).all()
    q = dict(zip(uris, labelled_run["q"], strict=True))
    lab = got.label[~solo]
    assert spearmanr(lab, [q[u] for u in lab.index]).statistic >= 0.8
    with s3.open(f"{out}/labels.json", "r") as fh:
        doc = json.load(fh)
    assert doc["labels"]["rows"] == 299 and doc["labels"]["unlabelled_one_sample"] == 2
    assert doc["labels"]["identities"] == 52 and sum(doc["labels"]["histogram"]["counts"]) == 297
    assert doc["seed"] == 7 and doc["run_id"] == RUN_ID
    # A set this small is labelled on the driver by default (no shuffle): the same draws, so the same
    # labels up to float rounding (BLAS sums the products in an order that depends on the memory layout).
    monkeypatch.setattr(sdd_label_job, "LOCAL_ROWS", small_set)
    labels(labelled_run["run"], str(tmp_path / "here"), labelled_run["ids"], "person", seed=7)
    here = pq.read_table(tmp_path / "here" / "labels.parquet").to_pandas().set_index("uri")
    assert here.index.sort_values().equals(got.index.sort_values())
    assert np.allclose(here.label.reindex(got.index), got.label, rtol=0, atol=1e-3, equal_nan=True)
    assert here.n_same.reindex(got.index).equals(got.n_same)
