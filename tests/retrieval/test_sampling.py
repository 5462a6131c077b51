"""Negative samplers: ranges, strategies, strata, seeding, rejection."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.retrieval.sampling import SamplingParams, Stratum, sample_negatives

RANKS = np.arange(1, 201)  # survivors at every rank 1..200


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_top_takes_best_ranked_in_range():
    out = sample_negatives(RANKS, 3, SamplingParams(), rng())
    assert list(RANKS[out]) == [1, 2, 3]
    out = sample_negatives(RANKS, 3, SamplingParams(range_min=10, range_max=12), rng())
    assert list(RANKS[out]) == [11, 12]  # only two in range: fewer, not out of range
    gaps = np.array([2, 5, 9, 30])
    assert list(gaps[sample_negatives(gaps, 2, SamplingParams(range_min=4), rng())]) == [5, 9]


def test_random_is_seeded_in_range_and_sorted():
    p = SamplingParams(strategy="random", range_min=20, range_max=60)
    a = sample_negatives(RANKS, 8, p, rng(1))
    b = sample_negatives(RANKS, 8, p, rng(1))
    c = sample_negatives(RANKS, 8, p, rng(2))
    assert list(a) == list(b) and list(a) != list(c)
    r = RANKS[a]
    assert len(set(r)) == 8 and r.min() > 20 and r.max() <= 60
    assert list(r) == sorted(r)


def test_stratified_mix_top10_plus_4_plus_4():
    ranks = np.arange(1, 1001)
    p = SamplingParams(strategy="stratified")  # default: top-10 + 4 of 11-100 + 4 of 101-1000
    r = ranks[sample_negatives(ranks, 18, p, rng(3))]
    assert list(r[:10]) == list(range(1, 11))
    assert ((r >= 11) & (r <= 100)).sum() == 4
    assert ((r >= 101) & (r <= 1000)).sum() == 4


def test_stratified_backfills_thin_bands_best_first():
    ranks = np.array([1, 2, 50, 51, 52, 53, 54])
    p = SamplingParams(
        strategy="stratified",
        strata=[Stratum(ranks=(1, 10), count=4, pick="top"), Stratum(ranks=(11, 100), count=1)],
    )
    r = ranks[sample_negatives(ranks, 5, p, rng())]
    # band 1 has only two; band 2 gives one; two more come best-first from what is left
    assert len(r) == 5 and {1, 2} <= set(r)
    assert ((r >= 50) & (r <= 54)).sum() == 3


def test_reject_callback_skips_and_moves_on():
    refused = {2, 4}
    out = sample_negatives(
        RANKS, 3, SamplingParams(), rng(), reject=lambda p: int(RANKS[p]) in refused
    )
    assert list(RANKS[out]) == [1, 3, 5]


def test_edges_and_validation():
    assert sample_negatives(np.array([], dtype=int), 3, SamplingParams(), rng()).size == 0
    assert sample_negatives(RANKS, 0, SamplingParams(), rng()).size == 0
    with pytest.raises(ValueError):
        SamplingParams(range_min=10, range_max=5)
    with pytest.raises(ValueError):
        Stratum(ranks=(5, 1), count=1)
    assert SamplingParams().depth(100) == 100
    assert SamplingParams(range_max=500).depth(100) == 500
    assert SamplingParams(strategy="stratified").depth(100) == 1000
