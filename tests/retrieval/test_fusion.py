"""Fusion of ranked lists: RRF and weighted min-max, on hand-made runs."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.retrieval.fusion import minmax, minmax_normalize, rrf


def test_rrf_sums_reciprocal_ranks():
    keys, scores = rrf({"bm25": ["a", "b", "c"], "dense": ["b", "d"]}, k=60)
    assert keys[0] == "b"  # found by both
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61)
    assert set(keys) == {"a", "b", "c", "d"}
    assert list(scores) == sorted(scores, reverse=True)


def test_rrf_ties_keep_best_rank_order_and_weights_apply():
    keys, _ = rrf({"x": ["a", "b"], "y": ["b", "a"]})
    assert keys == ["a", "b"]  # equal scores: first seen at the best rank, first run first
    keys, _ = rrf({"x": ["a", "b"], "y": ["b", "a"]}, weights={"x": 1.0, "y": 2.0})
    assert keys == ["b", "a"]
    with pytest.raises(ValueError):
        rrf({"x": ["a"]}, k=-1)


def test_minmax_normalize_edges():
    assert minmax_normalize([]).size == 0
    assert list(minmax_normalize([3.0, 3.0])) == [1.0, 1.0]
    assert list(minmax_normalize([1.0, 3.0, 2.0])) == [0.0, 1.0, 0.5]


def test_minmax_fusion_weights_and_missing_docs():
    runs = {"bm25": (["a", "b"], [10.0, 0.0]), "dense": (["b", "c"], [0.9, 0.1])}
    keys, scores = minmax(runs, weights={"bm25": 0.3, "dense": 0.7})
    got = dict(zip(keys, scores, strict=True))
    assert got["a"] == pytest.approx(0.3)
    assert got["b"] == pytest.approx(0.7)
    assert got["c"] == pytest.approx(0.0)
    assert keys[0] == "b"
    with pytest.raises(ValueError):
        minmax({"x": (["a"], [1.0, 2.0])})


def test_fusion_returns_numpy_scores():
    _, s = rrf({"x": [1, 2, 3]})
    assert isinstance(s, np.ndarray) and s.dtype == np.float64


def test_rrf_over_integer_ids_matches_rrf():
    from rankmill.retrieval.fusion import rrf_ids

    rng = np.random.default_rng(0)
    for trial in range(50):
        runs = [rng.permutation(60)[: rng.integers(0, 40)] for _ in range(rng.integers(1, 4))]
        w = rng.uniform(0.1, 2, size=len(runs)).tolist() if trial % 2 else None
        keys, scores = rrf(
            {str(j): list(r) for j, r in enumerate(runs)},
            k=10.0,
            weights=None if w is None else {str(j): x for j, x in enumerate(w)},
        )
        ids, got = rrf_ids(runs, k=10.0, weights=w)
        assert ids.tolist() == [int(x) for x in keys]
        np.testing.assert_array_equal(got, scores)


def test_rrf_of_many_queries_at_once_matches_each_alone():
    from rankmill.retrieval.fusion import rrf_ids, rrf_rows

    rng = np.random.default_rng(1)
    runs = []
    for depth in (30, 12):
        r = np.full((20, depth), -1, dtype=np.int64)
        for q in range(20):
            n = int(rng.integers(0, depth + 1))
            r[q, :n] = rng.permutation(50)[:n]
        runs.append(r)
    ids, scores = rrf_rows(runs, k=5.0, weights=[1.0, 0.5])
    for q in range(20):
        want_ids, want = rrf_ids([r[q][r[q] >= 0] for r in runs], k=5.0, weights=[1.0, 0.5])
        n = len(want_ids)
        assert ids[q, :n].tolist() == want_ids.tolist() and (ids[q, n:] == -1).all()
        np.testing.assert_array_equal(scores[q, :n], want)
