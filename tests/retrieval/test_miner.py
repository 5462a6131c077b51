"""The mining engine with the real all-MiniLM-L6-v2 on a small hand-made corpus."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.retrieval.bm25 import BM25Index
from rankmill.retrieval.cache import EmbeddingCache
from rankmill.retrieval.dense import DenseEncoder
from rankmill.retrieval.miner import MineQuery, Miner, MiningParams, doc_text, ensure_corpus_index

pytestmark = pytest.mark.slow

TOPICS = {
    "bees": [
        "Honey bees collect nectar and turn it into honey inside the hive.",
        "A bee colony has one queen, thousands of workers and some drones.",
        "Bees pollinate flowering plants while they gather pollen.",
        "Beekeepers harvest honey from wooden frames in the hive boxes.",
    ],
    "volcanoes": [
        "Lava from the volcano flowed downhill and covered the village road.",
        "Volcanic eruptions throw ash high into the atmosphere.",
        "Magma rises through cracks in the crust before an eruption.",
    ],
    "bread": [
        "Yeast ferments sugar and makes bread dough rise.",
        "Sourdough bread uses a starter of wild yeast and bacteria.",
        "Knead the dough for ten minutes before the first proof.",
    ],
    "trains": [
        "High-speed trains run on dedicated tracks at 300 km/h.",
        "The steam locomotive pulled twelve coaches up the hill.",
    ],
}
DOCS = [(f"{t}{i}", text) for t, texts in TOPICS.items() for i, text in enumerate(texts)]
# An exact copy of the positive under another id: caught by text, never matched as a positive.
DOCS.append(("bees0-copy", TOPICS["bees"][0]))
IDS = [d for d, _ in DOCS]
TEXTS = [t for _, t in DOCS]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def miner(cache):
    p = MiningParams(num_negatives=3, pool_size=8, filters={"max_relative_score": None})
    m = Miner(p, cache_dir=cache, seed=7)
    m.index_corpus(IDS, None, TEXTS)
    return m


def test_encoder_normalizes_and_prompts_change_embeddings():
    enc = DenseEncoder(query_prompt="query: ")
    q = enc.encode_queries(["how do bees make honey"])
    d = enc.encode_documents(["how do bees make honey"])
    assert q.shape == (1, enc.dim) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(q, d)
    assert enc.cache_key("query") != enc.cache_key("document")


def test_positives_excluded_by_id_and_copies_by_text(miner):
    [r] = miner.mine([MineQuery("q1", "how do bees make honey", positive_ids=["bees0"])])
    assert r.positive_ids == ["bees0"] and r.reject is None
    assert "bees0" not in r.negative_ids
    assert "bees0-copy" not in r.negative_ids  # near-duplicate of the positive
    assert r.skipped["positive"] == 1 and r.skipped["near_duplicate_of_positive"] == 1
    assert len(r.negative_ids) == 3
    assert r.negative_ranks == sorted(r.negative_ranks)
    assert len(r.candidate_ids) == 8 and "bees0" in r.candidate_ids  # the pool keeps positives
    assert set(r.retrievers) <= {"bm25", "dense", "bm25+dense"}
    assert all(s is None or s >= 1 for s in r.bm25_ranks)
    assert [s is None for s in r.bm25_scores] == [s is None for s in r.bm25_ranks]


def test_exclusions_and_missing_positives(miner):
    [r] = miner.mine(
        [MineQuery("q1", "how do bees make honey", ["bees0", "nope"], excluded_ids=["bees3"])]
    )
    assert "bees3" not in r.negative_ids and r.skipped.get("excluded") == 1
    assert r.missing_positive_ids == ["nope"]
    [r] = miner.mine([MineQuery("q2", "volcano lava", positive_ids=["nope"])])
    assert r.reject == "no_positive" and r.negative_ids == [] and r.candidate_ids


def test_relative_margin_keeps_only_clearly_weaker_negatives(miner, cache):
    p = MiningParams(num_negatives=20, pool_size=5)
    m = Miner(p, cache_dir=cache, seed=7)
    m.index_corpus(IDS, None, TEXTS)
    [r] = m.mine([MineQuery("q", "how do bees make honey", ["bees3"])])
    pos = r.positive_scores[0]
    assert r.negative_scores and max(r.negative_scores) <= pos - 0.05 * abs(pos) + 1e-9
    assert r.skipped.get("relative_margin", 0) >= 1
    assert m.cache.computed_rows == 0  # same corpus, same model: read from the cache


def test_results_do_not_depend_on_batching(tmp_path):
    p = MiningParams(
        num_negatives=3, sampling={"strategy": "random"}, filters={"max_relative_score": None}
    )
    m = Miner(p, cache_dir=str(tmp_path), seed=3)
    m.index_corpus(IDS, None, TEXTS)
    qs = [
        MineQuery("a", "honey bees", ["bees1"]),
        MineQuery("b", "bread yeast", ["bread0"]),
        MineQuery("c", "volcano ash", ["volcanoes1"]),
    ]
    together = [r.negative_ids for r in m.mine(qs)]
    apart = [m.mine([q])[0].negative_ids for q in qs]
    assert together == apart


def test_minmax_fusion(tmp_path):
    p = MiningParams(
        num_negatives=2, pool_size=4, fusion="minmax", filters={"max_relative_score": None}
    )
    m = Miner(p, cache_dir=None, seed=1)
    m.index_corpus(IDS, None, TEXTS)
    [r] = m.mine([MineQuery("q", "bread dough yeast", ["bread0"])])
    assert r.candidate_ids[0] in {"bread0", "bread1", "bread2"}


def test_bm25_only_loads_no_dense_model_and_margins_on_bm25_scores(tmp_path):
    p = MiningParams(retrievers=["bm25"], num_negatives=3, pool_size=6)
    assert p.negatives_from == "fused" and p.score_kind() == "bm25"
    m = Miner(p, cache_dir=str(tmp_path / "emb"), seed=1)
    assert m.encoder is None
    m.index_corpus(IDS, None, TEXTS, root=str(tmp_path / "idx"))
    assert m.emb is None and m.dense is None
    [folder] = [f for f in (tmp_path / "idx").iterdir() if f.is_dir()]
    assert not (folder / "embeddings.npy").exists()
    query = "bee hive honey from the colony"
    [r] = m.mine([MineQuery("q", query, ["bees0"])])
    direct = BM25Index().build(TEXTS).all_scores([query])[0]
    assert r.positive_scores == pytest.approx([direct[IDS.index("bees0")]])
    assert r.negative_ids and r.negative_scores == pytest.approx(
        [direct[IDS.index(d)] for d in r.negative_ids]
    )
    pos = r.positive_scores[0]
    assert max(r.negative_scores) <= pos - 0.05 * abs(pos) + 1e-6
    assert set(r.retrievers) == {"bm25"} and set(r.dense_scores) == {None}
    ranked = [IDS[i] for i in np.argsort(-direct, kind="stable") if direct[i] > 0]
    assert r.candidate_ids == ranked[:6]
    with pytest.raises(ValueError, match="negatives_from"):
        MiningParams(retrievers=["bm25"], negatives_from="dense")
    with pytest.raises(ValueError, match="max_positive_similarity"):
        MiningParams(retrievers=["bm25"], filters={"max_positive_similarity": 0.9})


def test_corpus_index_is_built_once_and_memory_mapped(tmp_path):
    p = MiningParams(num_negatives=2)
    enc = DenseEncoder()
    full = [doc_text(None, t) for t in TEXTS]
    cache = EmbeddingCache(str(tmp_path / "emb"))
    folder, built = ensure_corpus_index(p, IDS, full, str(tmp_path / "idx"), enc, cache, 7)
    again, built_again = ensure_corpus_index(p, IDS, full, str(tmp_path / "idx"), enc, cache, 7)
    assert (built, built_again) == (True, False) and folder == again
    a, b = Miner(p, seed=7, encoder=enc), Miner(p, seed=7, encoder=enc)
    a.load_index(folder)
    b.load_index(folder)
    assert isinstance(a.emb, np.memmap) and a.emb.filename == b.emb.filename
    assert isinstance(a.bm25.data, np.memmap)
    q = [MineQuery("q", "how do bees make honey", ["bees0"])]
    assert a.mine(q)[0].negative_ids == b.mine(q)[0].negative_ids
    # Another corpus, another folder.
    other, _ = ensure_corpus_index(p, IDS[:-1], full[:-1], str(tmp_path / "idx"), enc, cache, 7)
    assert other != folder


def test_doc_text_adds_a_title_once():
    assert doc_text("Bees", "Bees make honey.") == "Bees make honey."
    assert doc_text("Bees", "They make honey.") == "Bees\nThey make honey."
    assert doc_text(None, "x") == "x"


def test_cross_encoder_rescoring_sets_the_filter_scale(tmp_path):
    import torch

    from rankmill.retrieval.dense import resolve_model

    torch.manual_seed(0)  # the MiniLM checkpoint has no reranker head: a seeded random one
    p = MiningParams(
        num_negatives=2,
        pool_size=5,
        rescore_depth=6,
        cross_encoder=resolve_model("all-MiniLM-L6-v2"),
        filters={"max_relative_score": None},
    )
    m = Miner(p, cache_dir=str(tmp_path), seed=1)
    m.index_corpus(IDS, None, TEXTS)
    [r] = m.mine([MineQuery("q", "how do bees make honey", ["bees0"])])
    assert len(r.negative_ids) == 2 and max(r.negative_ranks) <= 6
    expect = m.rescorer.score(
        "how do bees make honey", [TEXTS[IDS.index(d)] for d in r.negative_ids]
    )
    np.testing.assert_allclose(r.negative_scores, expect, rtol=1e-5)


def test_copies_among_negatives_are_taken_once():
    ids = IDS + ["bees1-copy"]
    texts = TEXTS + [TOPICS["bees"][1]]
    p = MiningParams(num_negatives=4, filters={"max_relative_score": None})
    m = Miner(p, cache_dir=None, seed=2)
    m.index_corpus(ids, None, texts)
    [r] = m.mine([MineQuery("q", "bee colony queen and workers", ["bees0"])])
    assert len({"bees1", "bees1-copy"} & set(r.negative_ids)) == 1
    assert r.skipped.get("near_duplicate") == 1 and len(r.negative_ids) == 4
