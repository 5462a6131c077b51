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


WORDS = "bee hive honey lava ash magma bread yeast dough train track steam the a of and".split()
ODD = [
    "Héllo wörld, it's a_b test 42 x ΣΟΦΙΑ",
    "naïve café 3.14 __init__ l'été ½ 二十 e\u0301t\u00e9",
    "",
    "UPPER lower MiXeD-case hyphen-ated co-op",
]


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)] + ODD


def test_tokens_and_scores_match_bm25s():
    import bm25s

    from rankmill.retrieval.bm25 import stopword_list, tokenize

    docs = _corpus(300, 0)
    queries = ["honey bee hive", "lava lava ash", "zebra", "café été", "the", "TRAIN steam x"]
    tokens, owner = tokenize(docs, stopword_list("en"))
    ours = [[] for _ in docs]
    for t, o in zip(tokens.to_pylist(), owner.tolist(), strict=True):
        ours[o].append(t)
    theirs = bm25s.tokenize(docs, stopwords="en", return_ids=False, show_progress=False)
    assert ours == theirs

    idx = BM25Index(k1=0.9, b=0.4).build(docs)
    ref = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    ref.index(theirs, show_progress=False)
    q_tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    for mine, toks in zip(idx.all_scores(queries), q_tokens, strict=True):
        expect = ref.get_scores(toks) if toks else np.zeros(len(docs))  # bm25s: [] raises
        np.testing.assert_allclose(mine, expect, rtol=2e-6, atol=1e-6)
    # search is the same ranking, ties by corpus position
    scores, ids = idx.search(queries, k=20)
    for row, (s, j) in enumerate(zip(scores, ids, strict=True)):
        full = idx.all_scores([queries[row]])[0]
        expect = [d for d in np.lexsort((np.arange(len(full)), -full)) if full[d] > 0][:20]
        assert j[: len(expect)].tolist() == expect and (j[len(expect) :] == -1).all()
        np.testing.assert_array_equal(s[: len(expect)], full[expect])


def test_saved_index_is_memory_mapped_and_scores_the_same(tmp_path):
    docs = _corpus(50, 1)
    idx = BM25Index().build(docs)
    idx.save(str(tmp_path))
    back = BM25Index.load(str(tmp_path))
    assert isinstance(back.data, np.memmap) and back.num_docs == len(docs)
    q = ["honey yeast", "dough the bread"]
    for a, b in zip(idx.search(q, 10), back.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_query_scores_the_same_whatever_it_is_searched_with(monkeypatch):
    import rankmill.retrieval.bm25 as bm25

    docs = _corpus(200, 2)
    idx = BM25Index().build(docs)
    qs = ["honey bee", "lava magma ash ash", "yeast", "steam train track the"]
    together = idx.search(qs, 30)
    monkeypatch.setattr(bm25, "_CELLS", 1)  # one query per block
    apart = idx.search(qs, 30)
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_array_equal(a, b)


def test_top_k_is_exact_at_the_cut():
    from rankmill.retrieval.index import top_k

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties
    s, i = top_k(scores, 7)
    for row in range(50):
        expect = np.lexsort((np.arange(40), -scores[row]))[:7]
        assert i[row].tolist() == expect.tolist()
        np.testing.assert_array_equal(s[row], scores[row, expect])


def test_exact_scores_equal_row_dots_and_identical_rows_tie():
    from rankmill.retrieval.index import exact_scores, exact_topk, row_dots

    docs, qs = _emb(300, d=384, seed=4), _emb(9, d=384, seed=5)
    docs[7] = docs[250]  # an identical document far away in the corpus
    got = exact_scores(docs, qs)
    for r in range(len(qs)):
        np.testing.assert_array_equal(got[r], row_dots(docs, qs[r]))
    # every query against docs 7 and 250: tied, 7 first; the same alone or in any chunking
    s_all, i_all = exact_topk(docs, qs, 300, chunk=64)
    for r in range(len(qs)):
        at = {int(d): n for n, d in enumerate(i_all[r])}
        assert at[7] + 1 == at[250] and s_all[r, at[7]] == s_all[r, at[250]]
        s_one, i_one = exact_topk(docs, qs[r : r + 1], 300, chunk=300)
        np.testing.assert_array_equal(i_one[0], i_all[r])
        np.testing.assert_array_equal(s_one[0], s_all[r])
