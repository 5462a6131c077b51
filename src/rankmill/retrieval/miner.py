"""The mining engine: retrieve a candidate pool per query, filter false negatives, sample
hard negatives. The ``mine`` stage runs one :class:`Miner` per Ray actor; benchmarks call it
directly.

>>> miner = Miner(MiningParams(), cache_dir="runs/x/cache/embeddings", seed=13)
>>> miner.index_corpus(doc_ids, titles, texts)          # embeds once (cached), builds indexes
>>> results = miner.mine([MineQuery("q1", "what is ...", positive_ids=["d7"])])

Scores used by the filters are dense cosines (or cross-encoder scores when ``cross_encoder``
is set) for every candidate, whichever retriever found it, so a BM25-only find is judged on
the same scale as the positive. Each query's random choices come from a generator seeded by
(run seed, query id), so results do not depend on how queries are split into work units.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from rankmill.config import Model
from rankmill.retrieval import fusion
from rankmill.retrieval.bm25 import BM25Index
from rankmill.retrieval.cache import EmbeddingCache
from rankmill.retrieval.dense import DEFAULT_MODEL, DenseEncoder
from rankmill.retrieval.filters import (
    DuplicateGuard,
    FilterOutcome,
    FilterParams,
    filter_candidates,
)
from rankmill.retrieval.index import DenseIndex, IndexParams
from rankmill.retrieval.sampling import SamplingParams, sample_negatives

log = logging.getLogger(__name__)


class MiningParams(Model):
    """Retrieval, filtering and sampling settings of hard-negative mining."""

    retrievers: list[Literal["bm25", "dense"]] = Field(
        default_factory=lambda: ["bm25", "dense"],
        description="Retrievers that build the candidate pool; two are fused.",
    )
    fusion: Literal["rrf", "minmax"] = Field(
        "rrf", description="rrf: reciprocal rank fusion; minmax: weighted min-max score fusion."
    )
    rrf_k: float = Field(60.0, ge=0, description="The k of reciprocal rank fusion.")
    dense_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of dense scores in minmax fusion (BM25 gets 1 - w)."
    )
    negatives_from: Literal["dense", "fused"] = Field(
        "dense",
        description="Ranking that negatives are sampled from: the dense ranking (negatives hard "
        "for the dense model being trained) or the fused pool.",
    )
    model: str = Field(
        DEFAULT_MODEL, description="sentence-transformers model name or path for dense search."
    )
    query_prompt: str | None = Field(None, description="Text prepended to every query.")
    document_prompt: str | None = Field(None, description="Text prepended to every document.")
    query_prompt_name: str | None = Field(
        None, description="Name of a prompt in the model's config for queries (if no query_prompt)."
    )
    document_prompt_name: str | None = Field(
        None, description="Name of a prompt in the model's config for documents."
    )
    batch_size: int = Field(
        32, ge=1, description="Texts per encoding batch (memory grows with it; raise it on a GPU)."
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Truncate texts to this many tokens (None: the model's own)."
    )
    device: str = Field("auto", description="torch device for encoding: auto, cpu, cuda, cuda:1...")
    index: IndexParams = Field(default_factory=IndexParams, description="Dense index settings.")
    bm25_k1: float = Field(0.9, ge=0, description="BM25 k1.")
    bm25_b: float = Field(0.4, ge=0, le=1, description="BM25 b.")
    bm25_stopwords: str | None = Field("en", description="bm25s stopword list (None: keep all).")
    pool_size: int = Field(
        100, ge=1, description="Candidates per query written to the candidates table."
    )
    mining_depth: int = Field(
        1000,
        ge=1,
        description="How deep the ranking that negatives come from goes. Deep, because the "
        "margin rule removes everything scoring near a weak positive and the negatives must "
        "come from below it.",
    )
    num_negatives: int = Field(8, ge=1, description="Hard negatives to choose per query.")
    filters: FilterParams = Field(
        default_factory=FilterParams, description="False-negative filters."
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="How negatives are chosen among survivors."
    )
    cross_encoder: str | None = Field(
        None, description="Cross-encoder to rescore candidates with (margins then use its scores)."
    )
    rescore_depth: int = Field(
        100,
        ge=1,
        description="Rescore only this many best-ranked candidates (deeper ones are "
        "not eligible as negatives when a cross-encoder is set).",
    )
    embedding_cache: bool = Field(
        True, description="Cache corpus embeddings on disk by model and text hash."
    )

    @model_validator(mode="after")
    def _check(self) -> MiningParams:
        if not self.retrievers:
            raise ValueError("retrievers: name at least one of bm25, dense")
        if self.negatives_from == "dense" and "dense" not in self.retrievers:
            raise ValueError("negatives_from: dense needs 'dense' in retrievers")
        return self

    def depth(self) -> int:
        """How many candidates the ranking negatives come from holds per query."""
        return self.sampling.depth(self.mining_depth)


@dataclass
class MineQuery:
    query_id: str
    text: str
    positive_ids: list[str] = field(default_factory=list)
    excluded_ids: list[str] = field(default_factory=list)


@dataclass
class MinedQuery:
    """One query's pool and negatives (ids are corpus doc_ids)."""

    query_id: str
    candidate_ids: list[str]
    candidate_scores: list[float]  # fused
    bm25_ranks: list[int | None]
    bm25_scores: list[float | None]
    dense_ranks: list[int | None]
    dense_scores: list[float]
    retrievers: list[str]
    positive_ids: list[str]
    positive_scores: list[float]
    negative_ids: list[str] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)
    negative_ranks: list[int] = field(default_factory=list)
    considered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    missing_positive_ids: list[str] = field(default_factory=list)
    full_ranking: bool = False  # nothing survived in mining_depth: the whole corpus was ranked
    reject: str | None = None
    detail: str | None = None


def doc_text(title: str | None, text: str) -> str:
    """The text that represents a document: its title, unless the text already starts with it."""
    if title and not text.startswith(title):
        return f"{title}\n{text}"
    return text


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    return np.random.default_rng(
        [seed, int(hashlib.sha256(query_id.encode()).hexdigest()[:15], 16)]
    )


class _Texts:
    """Lazy indexed access to corpus texts held in one Arrow array (no Python strings kept)."""

    def __init__(self, arr: pa.Array, idx: np.ndarray):
        self.arr, self.idx = arr, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> str:
        return self.arr[int(self.idx[i])].as_py()


class Miner:
    """Holds the corpus indexes and mines queries against them."""

    def __init__(self, params: MiningParams, cache_dir: str | None = None, seed: int = 13):
        self.params = params
        self.seed = seed
        p = params
        self.encoder = DenseEncoder(
            p.model,
            query_prompt=p.query_prompt,
            document_prompt=p.document_prompt,
            query_prompt_name=p.query_prompt_name,
            document_prompt_name=p.document_prompt_name,
            batch_size=p.batch_size,
            device=p.device,
            max_seq_length=p.max_seq_length,
        )
        self.cache = EmbeddingCache(cache_dir if p.embedding_cache else None)
        self.rescorer = None
        if p.cross_encoder:
            from rankmill.retrieval.rescore import CrossEncoderScorer

            self.rescorer = CrossEncoderScorer(p.cross_encoder, device=p.device)
        self.doc_ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.texts: pa.Array | None = None
        self.emb: np.ndarray | None = None
        self.dense: DenseIndex | None = None
        self.bm25: BM25Index | None = None
        self.timings: dict[str, float] = {}
        self.cache_hit = False

    # -- corpus ----------------------------------------------------------------------------------
    def index_corpus(
        self, doc_ids: Sequence[str], titles: Sequence[str | None] | None, texts: Sequence[str]
    ) -> None:
        t0 = time.perf_counter()
        titles = titles if titles is not None else [None] * len(texts)
        full = [doc_text(t, x) for t, x in zip(titles, texts, strict=True)]
        self.doc_ids = list(doc_ids)
        self.row_of = {d: i for i, d in enumerate(self.doc_ids)}
        if len(self.row_of) != len(self.doc_ids):
            raise ValueError("corpus doc_ids are not unique")
        self.texts = pa.array(full, type=pa.large_string())
        self.emb, self.cache_hit = self.cache.get_or_compute(
            full, self.encoder.cache_key("document"), self.encoder.encode_documents
        )
        t1 = time.perf_counter()
        self.dense = DenseIndex(self.params.index.model_copy(update={"seed": self.seed})).build(
            self.emb
        )
        t2 = time.perf_counter()
        if "bm25" in self.params.retrievers:
            self.bm25 = BM25Index(
                self.params.bm25_k1, self.params.bm25_b, stopwords=self.params.bm25_stopwords
            ).build(full)
        del full
        t3 = time.perf_counter()
        self.timings.update(embed_s=t1 - t0, dense_index_s=t2 - t1, bm25_index_s=t3 - t2)
        log.info(
            "indexed %d docs (embeddings %s, %.1fs; dense index %.1fs; bm25 %.1fs)",
            len(self.doc_ids),
            "cached" if self.cache_hit else "computed",
            t1 - t0,
            t2 - t1,
            t3 - t2,
        )

    def _score_all(self, qv: np.ndarray, block: int = 65536) -> np.ndarray:
        assert self.emb is not None
        n = len(self.doc_ids)
        out = np.empty(n, dtype=np.float32)
        for s in range(0, n, block):
            out[s : s + block] = np.asarray(self.emb[s : s + block], dtype=np.float32) @ qv
        return out

    def _filter(
        self,
        q: MineQuery,
        neg_pool: np.ndarray,
        filter_scores: np.ndarray,
        pos_ids: list[str],
        filter_pos: np.ndarray,
        pos_rows: list[int],
        pos_emb: np.ndarray | None,
    ) -> tuple[FilterOutcome, list[str], _Texts]:
        """Run the per-candidate filters over ``neg_pool`` (corpus rows in rank order)."""
        p = self.params
        assert self.emb is not None and self.texts is not None
        pos_sims = None
        if p.filters.max_positive_similarity is not None and pos_emb is not None and len(neg_pool):
            order = np.argsort(neg_pool)
            sims = (np.asarray(self.emb[neg_pool[order]], dtype=np.float32) @ pos_emb.T).max(axis=1)
            pos_sims = np.empty(len(neg_pool), dtype=np.float32)
            pos_sims[order] = sims
        neg_doc_ids = [self.doc_ids[j] for j in neg_pool]
        texts = _Texts(self.texts, neg_pool)
        dedup = p.filters.duplicate_ratio is not None
        outcome = filter_candidates(
            neg_doc_ids,
            filter_scores,
            p.filters,
            positive_ids=pos_ids,
            positive_scores=filter_pos,
            excluded_ids=q.excluded_ids,
            texts=texts if dedup else None,
            positive_texts=[self.texts[r].as_py() for r in pos_rows] if dedup else (),
            positive_sims=pos_sims,
        )
        return outcome, neg_doc_ids, texts

    # -- queries ---------------------------------------------------------------------------------
    def mine(self, queries: Sequence[MineQuery]) -> list[MinedQuery]:
        if self.emb is None or self.dense is None:
            raise RuntimeError("Miner.mine before index_corpus")
        p = self.params
        depth = min(p.depth(), len(self.doc_ids))
        # The fused pool only needs pool_size, unless negatives are sampled from it.
        fused_depth = depth if p.negatives_from == "fused" else min(p.pool_size, depth)
        q_emb = self.encoder.encode_queries([q.text for q in queries])
        runs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "dense" in p.retrievers:
            runs["dense"] = self.dense.search(q_emb, depth)
        if "bm25" in p.retrievers and self.bm25 is not None:
            runs["bm25"] = self.bm25.search([q.text for q in queries], fused_depth)
        return [self._mine_one(i, q, q_emb[i], runs, depth) for i, q in enumerate(queries)]

    def _mine_one(
        self,
        i: int,
        q: MineQuery,
        qv: np.ndarray,
        runs: dict[str, tuple[np.ndarray, np.ndarray]],
        depth: int,
    ) -> MinedQuery:
        p = self.params
        assert self.emb is not None and self.texts is not None
        ranked: dict[str, np.ndarray] = {}
        scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        fused_depth = depth if p.negatives_from == "fused" else min(p.pool_size, depth)
        dense_full: tuple[np.ndarray, np.ndarray] | None = None
        for name, (scores, ids) in runs.items():
            ok = ids[i] >= 0
            if name == "dense":
                dense_full = (ids[i][ok], scores[i][ok].astype(np.float64))
                ok[fused_depth:] = False
            ranked[name] = ids[i][ok]
            scored[name] = (ids[i][ok], scores[i][ok])
        if len(ranked) == 1:
            name = next(iter(ranked))
            fused_ids, fused_scores = list(ranked[name]), scored[name][1].astype(np.float64)
        elif p.fusion == "rrf":
            fused_ids, fused_scores = fusion.rrf({n: list(v) for n, v in ranked.items()}, k=p.rrf_k)
        else:
            w = {"dense": p.dense_weight, "bm25": 1.0 - p.dense_weight}
            fused_ids, fused_scores = fusion.minmax(
                {n: (list(a), b) for n, (a, b) in scored.items()}, w
            )
        pool = np.asarray(fused_ids[:fused_depth], dtype=np.int64)
        pool_scores = np.asarray(fused_scores[:fused_depth], dtype=np.float64)
        rank_in = {n: {int(d): r for r, d in enumerate(v, start=1)} for n, v in ranked.items()}
        bm25_score: dict[int, float] = {}
        if "bm25" in scored:
            bm25_score = {int(d): float(x) for d, x in zip(*scored["bm25"], strict=True)}
        cand_emb = np.asarray(self.emb[np.sort(pool)], dtype=np.float32) if len(pool) else None
        dense_scores = np.zeros(len(pool))
        if cand_emb is not None:
            order = np.argsort(pool)
            dense_scores[order] = cand_emb @ qv

        # Positives by id; a positive missing from the corpus is reported, never matched by text.
        pos_rows = [self.row_of[d] for d in q.positive_ids if d in self.row_of]
        pos_ids = [d for d in q.positive_ids if d in self.row_of]
        missing = [d for d in q.positive_ids if d not in self.row_of]
        pos_emb = np.asarray(self.emb[np.sort(pos_rows)], dtype=np.float32) if pos_rows else None
        pos_scores = (
            (np.asarray(self.emb[pos_rows], dtype=np.float32) @ qv).astype(np.float64)
            if pos_rows
            else np.zeros(0)
        )

        k = min(p.pool_size, len(pool))
        pool_doc_ids = [self.doc_ids[j] for j in pool]
        out = MinedQuery(
            query_id=q.query_id,
            candidate_ids=pool_doc_ids[:k],
            candidate_scores=[float(s) for s in pool_scores[:k]],
            bm25_ranks=[
                rank_in["bm25"].get(int(j)) if "bm25" in rank_in else None for j in pool[:k]
            ],
            bm25_scores=[bm25_score.get(int(j)) for j in pool[:k]],
            dense_ranks=[
                rank_in["dense"].get(int(j)) if "dense" in rank_in else None for j in pool[:k]
            ],
            dense_scores=[float(s) for s in dense_scores[:k]],
            retrievers=[
                "+".join(n for n in ("bm25", "dense") if n in rank_in and int(j) in rank_in[n])
                for j in pool[:k]
            ],
            positive_ids=pos_ids,
            positive_scores=[float(s) for s in pos_scores],
            missing_positive_ids=missing,
        )
        if not pos_ids:
            out.reject = "no_positive"
            out.detail = (
                f"positives {missing} are not in the corpus"
                if missing
                else "the query has no positive"
            )
            return out

        # Negatives come from the dense ranking (hard for the model being trained) or the pool.
        if p.negatives_from == "dense" and dense_full is not None:
            neg_pool, neg_scores = dense_full
        else:
            neg_pool, neg_scores = pool, dense_scores
        filter_scores, filter_pos = neg_scores, pos_scores
        if self.rescorer is not None:
            neg_pool = neg_pool[: p.rescore_depth]
            neg_scores = neg_scores[: p.rescore_depth]
            texts = [self.texts[int(j)].as_py() for j in neg_pool]
            filter_scores = self.rescorer.score(q.text, texts)
            filter_pos = self.rescorer.score(q.text, [self.texts[r].as_py() for r in pos_rows])
        outcome, neg_doc_ids, texts = self._filter(
            q, neg_pool, filter_scores, pos_ids, filter_pos, pos_rows, pos_emb
        )
        if not len(outcome.kept) and self.rescorer is None and len(neg_pool) < len(self.doc_ids):
            # Nothing in the mining depth scores below a weak positive: rank the whole corpus
            # for this query (a rare, linear-cost fallback) rather than lose it.
            full_scores = self._score_all(qv)
            neg_pool = np.argsort(-full_scores, kind="stable")
            neg_scores = filter_scores = full_scores[neg_pool].astype(np.float64)
            outcome, neg_doc_ids, texts = self._filter(
                q, neg_pool, filter_scores, pos_ids, filter_pos, pos_rows, pos_emb
            )
            out.full_ranking = True
        out.considered = len(neg_pool)
        out.skipped = outcome.counts()
        kept = outcome.kept
        dup_skips = 0
        guard = (
            DuplicateGuard(p.filters.duplicate_ratio, p.filters.duplicate_chars)
            if p.filters.duplicate_ratio is not None
            else None
        )

        def is_duplicate(pos: int) -> bool:
            # Mutual near-duplicates are checked only for picks, against earlier picks.
            nonlocal dup_skips
            assert guard is not None
            text = texts[int(kept[pos])]
            if guard.is_duplicate(text):
                dup_skips += 1
                return True
            guard.accept(text)
            return False

        ranks = kept + 1  # 1-based rank in the ranking negatives come from
        chosen = sample_negatives(
            ranks,
            p.num_negatives,
            p.sampling,
            query_rng(self.seed, q.query_id),
            is_duplicate if guard is not None else None,
        )
        if dup_skips:
            out.skipped["near_duplicate"] = dup_skips
        sel = kept[chosen]
        out.negative_ids = [neg_doc_ids[j] for j in sel]
        out.negative_scores = [float(filter_scores[j]) for j in sel]
        out.negative_ranks = [int(j) + 1 for j in sel]
        if not out.negative_ids:
            out.reject = "no_negative"
            out.detail = f"all {len(neg_pool)} candidates were filtered: {out.skipped}"
        return out
