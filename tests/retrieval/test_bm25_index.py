"""BM25 and the faiss index wrappers on tiny inputs (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.retrieval.bm25 import BM25Index
from rankmill.retrieval.index import DenseIndex, IndexParams

DOCS = [
    "honey bees make honey in the hive",
    "lava flows downhill from the volcano",
    "yeast makes bread dough rise",
    "bees pollinate flowers",
]


def test_bm25_ranks_term_matches_and_pads_misses():
    idx = BM25Index().build(DOCS)
    scores, ids = idx.search(["honey bees", "zebra", "the"], k=6)
    assert ids.shape == (3, 6)
    assert ids[0, 0] == 0 and ids[0, 1] == 3 and ids[0, 2] == -1
    assert (ids[1] == -1).all() and (scores[1] == 0).all()  # no term in the corpus
    assert (ids[2] == -1).all()  # only a stopword
    assert (np.diff(scores[0][ids[0] >= 0]) <= 0).all()


def test_bm25_search_before_build():
    with pytest.raises(RuntimeError):
        BM25Index().search(["x"], 1)


def _emb(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_is_exact_and_pads_past_the_corpus():
    docs, qs = _emb(50), _emb(5, seed=1)
    idx = DenseIndex(IndexParams()).build(docs, chunk=7)
    scores, ids = idx.search(qs, k=60)
    truth = np.argsort(-(qs @ docs.T), axis=1)
    assert (ids[:, :50] == truth).all()
    assert (ids[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(kind):
    docs, qs = _emb(2000), _emb(20, seed=2)
    idx = DenseIndex(IndexParams(kind=kind, nprobe=16)).build(docs)
    _, ids = idx.search(qs, k=10)
    truth = np.argsort(-(qs @ docs.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall > 0.8
