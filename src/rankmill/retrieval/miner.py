"""The mining engine: retrieve a candidate pool per query, filter false negatives, sample
hard negatives. The ``mine`` stage runs one :class:`Miner` per Ray actor; benchmarks call it
directly.

>>> miner = Miner(MiningParams(), cache_dir="runs/x/cache/embeddings", seed=13)
>>> miner.index_corpus(doc_ids, titles, texts)          # embeds once (cached), builds indexes
>>> results = miner.mine([MineQuery("q1", "what is ...", positive_ids=["d7"])])

The corpus side is built once and read by every worker: :func:`build_corpus_index` writes a
folder (the corpus texts as an Arrow file, the embeddings as a ``.npy`` array, the BM25 index
as a few arrays) and :meth:`Miner.load_index` memory-maps it, so the actors of one machine
share one copy of each in the page cache. :meth:`Miner.index_corpus` does both.

Scores used by the filters are dense cosines (or cross-encoder scores when ``cross_encoder``
is set) for every candidate, whichever retriever found it, so a BM25 find is judged on the
same scale as the positive. With ``retrievers: [bm25]`` no dense model is loaded at all: the
negatives come from the BM25 ranking and the margins compare BM25 scores (or cross-encoder
scores). Each query's random choices come from a generator seeded by (run seed, query id), so
results do not depend on how queries are split into work units.

A batch of queries is searched, fused and scored together (numpy over the whole batch); only
the filters, the sampler and the near-duplicate checks run query by query. Dense scores are
exact (:func:`rankmill.retrieval.index.exact_scores`), so a query's results are the same
whatever it is batched with.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from rankmill.config import Model
from rankmill.retrieval import fusion
from rankmill.retrieval.bm25 import FORMAT as BM25_FORMAT
from rankmill.retrieval.bm25 import BM25Index
from rankmill.retrieval.cache import EmbeddingCache, text_digest
from rankmill.retrieval.dense import DEFAULT_MODEL, DenseEncoder
from rankmill.retrieval.filters import (
    DuplicateGuard,
    FilterOutcome,
    FilterParams,
    filter_candidates,
)
from rankmill.retrieval.index import DenseIndex, IndexParams, exact_scores, row_dots, top_k
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
        "for the dense model being trained) or the fused pool. With retrievers: [bm25] it is "
        "the BM25 ranking (fused, the default there).",
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
    search_batch: int = Field(
        4096, ge=1, description="Queries per dense search call (bounds memory)."
    )

    @model_validator(mode="after")
    def _check(self) -> MiningParams:
        if not self.retrievers:
            raise ValueError("retrievers: name at least one of bm25, dense")
        if "dense" not in self.retrievers:
            if "negatives_from" not in self.model_fields_set:
                # BM25 only: the pool is the BM25 ranking, and negatives come from it.
                object.__setattr__(self, "negatives_from", "fused")
            elif self.negatives_from == "dense":
                raise ValueError(
                    "negatives_from: dense needs 'dense' in retrievers; with retrievers: [bm25] "
                    "negatives come from the BM25 ranking (negatives_from: fused)"
                )
            if self.filters.max_positive_similarity is not None:
                raise ValueError(
                    "filters.max_positive_similarity compares document embeddings: add 'dense' "
                    "to retrievers, or set it to null for BM25-only mining"
                )
        return self

    def uses_dense(self) -> bool:
        """Whether mining loads the dense model (embeds the corpus and the queries)."""
        return "dense" in self.retrievers

    def score_kind(self) -> str:
        """The scale of the scores the margins compare (and negatives carry)."""
        if self.cross_encoder:
            return "cross_encoder"
        return "dense" if self.uses_dense() else "bm25"

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
    dense_scores: list[float | None]
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


# -- the corpus side, built once -------------------------------------------------------------------
DOCS_FILE = "docs.arrow"
EMB_FILE = "embeddings.npy"
FAISS_FILE = "dense.faiss"
DONE_FILE = "index.json"


def make_encoder(params: MiningParams) -> DenseEncoder:
    p = params
    return DenseEncoder(
        p.model,
        query_prompt=p.query_prompt,
        document_prompt=p.document_prompt,
        query_prompt_name=p.query_prompt_name,
        document_prompt_name=p.document_prompt_name,
        batch_size=p.batch_size,
        device=p.device,
        max_seq_length=p.max_seq_length,
    )


def index_key(
    params: MiningParams,
    doc_ids: Sequence[str],
    texts: Sequence[str],
    encoder: DenseEncoder | None,
    seed: int,
) -> str:
    """What the corpus index folder depends on: the documents and the settings that shape it."""
    p = params
    parts: dict[str, object] = {
        "docs": text_digest(doc_ids),
        "texts": text_digest(texts),
        "bm25": [p.bm25_k1, p.bm25_b, p.bm25_stopwords, BM25_FORMAT]
        if "bm25" in p.retrievers
        else None,
        "dense": encoder.cache_key("document") if encoder is not None else None,
        "device": encoder.device.split(":")[0] if encoder is not None else None,
    }
    if encoder is not None and p.index.kind != "flat":
        parts["index"] = [p.index.model_dump(), seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build_corpus_index(
    params: MiningParams,
    doc_ids: Sequence[str],
    texts: Sequence[str],
    folder: str,
    encoder: DenseEncoder | None = None,
    cache: EmbeddingCache | None = None,
    seed: int = 13,
) -> dict[str, str]:
    """Write everything mining needs about a corpus into ``folder``; returns name -> path.

    ``texts`` are the documents as they are embedded and indexed (see :func:`doc_text`);
    ``encoder`` is needed when ``params`` use dense retrieval. Embeddings go through ``cache``
    when given (so an interrupted build resumes chunk by chunk). Every worker then maps the
    folder with :meth:`Miner.load_index`.
    """
    import pyarrow.ipc as ipc

    p = params
    os.makedirs(folder, exist_ok=True)
    files: dict[str, str] = {}
    t0 = time.perf_counter()
    docs = pa.table(
        {
            "doc_id": pa.array(list(doc_ids), pa.string()),
            "text": pa.array(list(texts), pa.large_string()),
        }
    )
    path = os.path.join(folder, DOCS_FILE)
    with ipc.new_file(path, docs.schema) as w:
        w.write_table(docs, max_chunksize=max(1, docs.num_rows))
    files[DOCS_FILE] = path
    del docs
    timings: dict[str, float] = {}
    if p.uses_dense():
        if encoder is None:
            raise ValueError("build_corpus_index: dense retrieval needs an encoder")
        emb, _ = (cache or EmbeddingCache(None)).get_or_compute(
            texts, encoder.cache_key("document"), encoder.encode_documents
        )
        path = os.path.join(folder, EMB_FILE)
        src = getattr(emb, "filename", None)
        if src:  # the cache's file: a hard link where it can be, else a copy
            try:
                os.link(src, path)
            except OSError:
                shutil.copyfile(src, path)
        else:
            np.save(path, np.asarray(emb, dtype=np.float32))
        files[EMB_FILE] = path
        timings["embed_s"] = time.perf_counter() - t0
        if p.index.kind != "flat":
            import faiss

            index = DenseIndex(p.index).build(np.load(path, mmap_mode="r"), seed=seed)
            path = os.path.join(folder, FAISS_FILE)
            faiss.write_index(index._faiss, path)
            files[FAISS_FILE] = path
    t1 = time.perf_counter()
    if "bm25" in p.retrievers:
        bm25 = BM25Index(p.bm25_k1, p.bm25_b, stopwords=p.bm25_stopwords).build(texts)
        for f in bm25.save(folder):
            files[os.path.basename(f)] = f
    timings["bm25_index_s"] = time.perf_counter() - t1
    # Written last: a folder with this file is complete.
    path = os.path.join(folder, DONE_FILE)
    with open(path, "w") as f:
        json.dump({"files": sorted(files), "docs": len(doc_ids), "timings": timings}, f)
    files[DONE_FILE] = path
    log.info(
        "indexed %d docs: %s",
        len(doc_ids),
        ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
    )
    return files


@contextlib.contextmanager
def _locked(path: str):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_corpus_index(
    params: MiningParams,
    doc_ids: Sequence[str],
    texts: Sequence[str],
    root: str,
    encoder: DenseEncoder | None = None,
    cache: EmbeddingCache | None = None,
    seed: int = 13,
) -> tuple[str, bool]:
    """The index folder of this corpus under ``root`` (keyed by content and settings), built
    by whichever process gets there first while the others wait; returns (folder, built)."""
    folder = os.path.join(root, index_key(params, doc_ids, texts, encoder, seed))
    if os.path.exists(os.path.join(folder, DONE_FILE)):
        return folder, False
    os.makedirs(root, exist_ok=True)
    with _locked(folder + ".lock"):
        if os.path.exists(os.path.join(folder, DONE_FILE)):
            return folder, False
        tmp = f"{folder}.tmp-{uuid.uuid4().hex}"
        try:
            build_corpus_index(params, doc_ids, texts, tmp, encoder, cache, seed)
            if os.path.exists(folder):  # a build killed before its marker: start clean
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


class Miner:
    """Holds the corpus indexes and mines queries against them.

    The dense model is loaded only when ``params`` use dense retrieval; pass ``encoder`` to
    share one already loaded.
    """

    def __init__(
        self,
        params: MiningParams,
        cache_dir: str | None = None,
        seed: int = 13,
        encoder: DenseEncoder | None = None,
    ):
        self.params = params
        self.seed = seed
        p = params
        self.encoder: DenseEncoder | None = None
        if p.uses_dense():
            self.encoder = encoder or make_encoder(p)
        self.cache = EmbeddingCache(cache_dir if p.embedding_cache else None)
        self.rescorer = None
        if p.cross_encoder:
            from rankmill.retrieval.rescore import CrossEncoderScorer

            self.rescorer = CrossEncoderScorer(p.cross_encoder, device=p.device)
        self.doc_ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self._id_array: np.ndarray = np.zeros(0, dtype=object)
        self.texts: pa.Array | None = None
        self.emb: np.ndarray | None = None
        self.dense: DenseIndex | None = None
        self.bm25: BM25Index | None = None
        self.timings: dict[str, float] = {}
        self.cache_hit = False
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- corpus ----------------------------------------------------------------------------------
    def index_corpus(
        self,
        doc_ids: Sequence[str],
        titles: Sequence[str | None] | None,
        texts: Sequence[str],
        root: str | None = None,
    ) -> None:
        """Build the corpus index (under ``root``, or a folder of this miner's own) and load it."""
        titles = titles if titles is not None else [None] * len(texts)
        full = [doc_text(t, x) for t, x in zip(titles, texts, strict=True)]
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("corpus doc_ids are not unique")
        t0 = time.perf_counter()
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rankmill-index-")
            root = self._tmp.name
        before = self.cache.computed_rows
        folder, _ = ensure_corpus_index(
            self.params, doc_ids, full, root, self.encoder, self.cache, self.seed
        )
        self.cache_hit = self.cache.computed_rows == before
        self.timings["build_s"] = time.perf_counter() - t0
        self.load_index(folder)

    def load_index(self, folder: str, files: dict[str, str] | None = None) -> None:
        """Map a folder written by :func:`build_corpus_index` (``files``: name -> path, where
        the files are not all in ``folder``)."""
        import pyarrow.ipc as ipc

        def at(name: str) -> str:
            return (files or {}).get(name) or os.path.join(folder, name)

        t0 = time.perf_counter()
        docs = ipc.open_file(pa.memory_map(at(DOCS_FILE))).read_all()
        self.doc_ids = docs.column("doc_id").to_pylist()
        self.row_of = {d: i for i, d in enumerate(self.doc_ids)}
        self._id_array = np.array(self.doc_ids, dtype=object)
        text = docs.column("text")
        self.texts = text.chunk(0) if text.num_chunks == 1 else text.combine_chunks()
        p = self.params
        if p.uses_dense():
            self.emb = np.load(at(EMB_FILE), mmap_mode="r")
            self.dense = DenseIndex(p.index, search_batch=p.search_batch)
            if p.index.kind == "flat":
                self.dense.build(self.emb, seed=self.seed)
            else:
                import faiss

                self.dense._faiss = faiss.read_index(at(FAISS_FILE), faiss.IO_FLAG_MMAP)
                self.dense.ntotal = len(self.doc_ids)
        if "bm25" in p.retrievers:
            self.bm25 = BM25Index.load(folder, mmap=True, files=files)
        self.timings["load_s"] = time.perf_counter() - t0

    def _score_all(self, qv: np.ndarray, block: int = 65536) -> np.ndarray:
        assert self.emb is not None
        n = len(self.doc_ids)
        out = np.empty(n, dtype=np.float32)
        for s in range(0, n, block):
            out[s : s + block] = exact_scores(self.emb[s : s + block], qv[None])[0]
        return out

    def _filter(
        self,
        q: MineQuery,
        neg_pool: np.ndarray,
        filter_scores: np.ndarray,
        pos_rows: list[int],
        filter_pos: np.ndarray,
        pos_emb: np.ndarray | None,
    ) -> FilterOutcome:
        """Run the per-candidate filters over ``neg_pool`` (corpus rows in rank order). Text
        comparisons wait for the sampler: only picks are compared (see :meth:`_mine_one`)."""
        p = self.params
        pos_sims = None
        if p.filters.max_positive_similarity is not None and pos_emb is not None and len(neg_pool):
            assert self.emb is not None
            order = np.argsort(neg_pool)
            sims = (np.asarray(self.emb[neg_pool[order]], dtype=np.float32) @ pos_emb.T).max(axis=1)
            pos_sims = np.empty(len(neg_pool), dtype=np.float32)
            pos_sims[order] = sims
        excluded = [self.row_of[d] for d in q.excluded_ids if d in self.row_of]
        return filter_candidates(
            np.asarray(neg_pool, dtype=np.int64),
            filter_scores,
            p.filters,
            positive_ids=pos_rows,
            positive_scores=filter_pos,
            excluded_ids=excluded,
            positive_sims=pos_sims,
        )

    # -- queries ---------------------------------------------------------------------------------
    def mine(self, queries: Sequence[MineQuery]) -> list[MinedQuery]:
        p = self.params
        if self.texts is None or (p.uses_dense() and self.dense is None):
            raise RuntimeError("Miner.mine before index_corpus")
        depth = min(p.depth(), len(self.doc_ids))
        # The fused pool only needs pool_size, unless negatives are sampled from it.
        fused_depth = depth if p.negatives_from == "fused" else min(p.pool_size, depth)
        texts = [q.text for q in queries]
        q_emb: np.ndarray | None = None
        runs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        bm25_all: list[np.ndarray] | None = None
        if p.uses_dense():
            assert self.encoder is not None and self.dense is not None
            q_emb = self.encoder.encode_queries(texts)
            runs["dense"] = self.dense.search(q_emb, depth)
        if "bm25" in p.retrievers and self.bm25 is not None:
            if p.uses_dense():
                runs["bm25"] = self.bm25.search(texts, fused_depth)
            else:
                # BM25 is the filter scale: every document's score (positives, the fallback).
                bm25_all = self.bm25.all_scores(texts)
                runs["bm25"] = _top_positive(bm25_all, fused_depth)
        pools = self._pools(runs, q_emb, depth)
        return [
            self._mine_one(
                i,
                q,
                q_emb[i] if q_emb is not None else None,
                bm25_all[i] if bm25_all is not None else None,
                runs,
                pools,
            )
            for i, q in enumerate(queries)
        ]

    def _pools(
        self, runs: dict[str, tuple[np.ndarray, np.ndarray]], q_emb: np.ndarray | None, depth: int
    ) -> _Pools:
        """Every query's fused pool, its members' ranks in each retriever's ranking and their
        dense scores, computed for the whole batch at once."""
        p = self.params
        fused_depth = depth if p.negatives_from == "fused" else min(p.pool_size, depth)
        ranked = {n: ids[:, :fused_depth] for n, (_, ids) in runs.items()}
        if len(ranked) == 1:
            name = next(iter(runs))
            ids = ranked[name]
            scores = np.where(ids >= 0, runs[name][0][:, : ids.shape[1]], 0.0).astype(np.float64)
        elif p.fusion == "rrf":
            ids, scores = fusion.rrf_rows(list(ranked.values()), k=p.rrf_k)
        else:
            w = {"dense": p.dense_weight, "bm25": 1.0 - p.dense_weight}
            rows = []
            for i in range(len(next(iter(ranked.values())))):
                keys, sc = fusion.minmax(
                    {
                        n: (list(a[i][a[i] >= 0]), runs[n][0][i][: a.shape[1]][a[i] >= 0])
                        for n, a in ranked.items()
                    },
                    w,
                )
                rows.append((np.asarray(keys, dtype=np.int64), sc))
            width = max((len(k) for k, _ in rows), default=0)
            ids = np.full((len(rows), width), -1, dtype=np.int64)
            scores = np.zeros((len(rows), width))
            for i, (k, sc) in enumerate(rows):
                ids[i, : len(k)], scores[i, : len(k)] = k, sc
        ids, scores = ids[:, :fused_depth], scores[:, :fused_depth]
        k = min(p.pool_size, ids.shape[1])
        out = _Pools(ids=ids, scores=scores, size=(ids >= 0).sum(axis=1))
        out.rank_in = {n: _Ranking(a).find(ids[:, :k]) for n, a in ranked.items()}
        if q_emb is not None and "dense" in runs:
            # Exact dense cosines of the pool: the ranking's where it has them, else computed.
            dense_s, dense_ids = runs["dense"]
            want = ids if p.negatives_from == "fused" else ids[:, :k]
            at = _Ranking(dense_ids).find(want)
            qi = np.broadcast_to(np.arange(len(want))[:, None], want.shape)
            dense = np.zeros(want.shape)
            hit = at >= 0
            dense[hit] = dense_s[qi[hit], at[hit]]
            miss = (want >= 0) & ~hit
            if miss.any():
                assert self.emb is not None
                rows, qs = want[miss], qi[miss]
                order = np.argsort(rows, kind="stable")
                vals = np.empty(len(rows), dtype=np.float32)
                vals[order] = row_dots_pairs(self.emb[rows[order]], q_emb[qs[order]])
                dense[miss] = vals
            out.dense = dense
        return out

    def _mine_one(
        self,
        i: int,
        q: MineQuery,
        qv: np.ndarray | None,
        bm25_full: np.ndarray | None,
        runs: dict[str, tuple[np.ndarray, np.ndarray]],
        pools: _Pools,
    ) -> MinedQuery:
        p = self.params
        assert self.texts is not None
        dense_full: tuple[np.ndarray, np.ndarray] | None = None
        if "dense" in runs:
            scores, ids = runs["dense"]
            ok = ids[i] >= 0
            dense_full = (ids[i][ok], scores[i][ok].astype(np.float64))
        size = int(pools.size[i])
        pool, pool_scores = pools.ids[i, :size], pools.scores[i, :size]
        k = min(p.pool_size, size)
        top = pool[:k]
        rank_in = {n: r[i, :k] for n, r in pools.rank_in.items()}  # 0-based, -1: absent

        # Positives by id; a positive missing from the corpus is reported, never matched by text.
        pos_rows = [self.row_of[d] for d in q.positive_ids if d in self.row_of]
        pos_ids = [d for d in q.positive_ids if d in self.row_of]
        missing = [d for d in q.positive_ids if d not in self.row_of]
        pos_emb: np.ndarray | None = None
        if qv is not None:
            # Dense cosines are the filter scale, for the pool and the positives.
            assert self.emb is not None and dense_full is not None
            assert pools.dense is not None
            dense_scores = pools.dense[i, : size if p.negatives_from == "fused" else k]
            pos_emb = np.asarray(self.emb[np.sort(pos_rows)], np.float32) if pos_rows else None
            pos_scores = (
                row_dots(self.emb[pos_rows], qv).astype(np.float64) if pos_rows else np.zeros(0)
            )
            dense_col: list[float | None] = dense_scores[:k].tolist()
        else:
            assert bm25_full is not None
            dense_scores = pool_scores
            pos_scores = bm25_full[pos_rows].astype(np.float64) if pos_rows else np.zeros(0)
            dense_col = [None] * k

        names = [n for n in ("bm25", "dense") if n in rank_in]
        found = {n: rank_in[n] >= 0 for n in names}
        retrievers = np.full(k, "", dtype=object)
        for n in names:
            retrievers = np.where(
                found[n], np.where(retrievers == "", n, retrievers + "+" + n), retrievers
            )

        def ranks_of(n: str) -> list[int | None]:
            if n not in rank_in:
                return [None] * k
            return _or_none(rank_in[n] + 1, rank_in[n] < 0)

        bm25_col: list[float | None] = [None] * k
        if "bm25" in rank_in:
            at = rank_in["bm25"]
            bm25_col = _or_none(runs["bm25"][0][i][np.maximum(at, 0)].astype(np.float64), at < 0)
        out = MinedQuery(
            query_id=q.query_id,
            candidate_ids=self._ids(top),
            candidate_scores=pool_scores[:k].tolist(),
            bm25_ranks=ranks_of("bm25"),
            bm25_scores=bm25_col,
            dense_ranks=ranks_of("dense"),
            dense_scores=dense_col,
            retrievers=retrievers.tolist(),
            positive_ids=pos_ids,
            positive_scores=pos_scores.tolist(),
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
            filter_scores = self.rescorer.score(
                q.text, [self.texts[int(j)].as_py() for j in neg_pool]
            )
            filter_pos = self.rescorer.score(q.text, [self.texts[r].as_py() for r in pos_rows])
        outcome = self._filter(q, neg_pool, filter_scores, pos_rows, filter_pos, pos_emb)
        if not len(outcome.kept) and self.rescorer is None and len(neg_pool) < len(self.doc_ids):
            # Nothing in the mining depth scores below a weak positive: rank the whole corpus
            # for this query (a rare, linear-cost fallback) rather than lose it.
            if qv is not None:
                full_scores = self._score_all(qv)
                neg_pool = np.argsort(-full_scores, kind="stable")
            else:
                assert bm25_full is not None
                full_scores = bm25_full
                neg_pool = np.argsort(-full_scores, kind="stable")
                neg_pool = neg_pool[full_scores[neg_pool] > 0]  # a zero BM25 score is no evidence
            neg_scores = filter_scores = full_scores[neg_pool].astype(np.float64)
            outcome = self._filter(q, neg_pool, filter_scores, pos_rows, filter_pos, pos_emb)
            out.full_ranking = True
        out.considered = len(neg_pool)
        out.skipped = outcome.counts()
        kept = outcome.kept
        guard = (
            DuplicateGuard(
                p.filters.duplicate_ratio,
                p.filters.duplicate_chars,
                references=[self.texts[r].as_py() for r in pos_rows],
            )
            if p.filters.duplicate_ratio is not None
            else None
        )
        text_skips: dict[str, int] = {}

        def is_duplicate(pos: int) -> bool:
            # Text comparisons only for picks: against the positives, then earlier picks.
            assert guard is not None and self.texts is not None
            text = self.texts[int(neg_pool[int(kept[pos])])].as_py()
            reason = guard.reason(text)
            if reason is not None:
                text_skips[reason] = text_skips.get(reason, 0) + 1
                return True
            guard.accept(text)
            return False

        ranks = kept + 1  # 1-based rank in the ranking negatives come from
        chosen = sample_negatives(
            ranks,
            p.num_negatives,
            p.sampling,
            query_rng(self.seed, q.query_id) if p.sampling.random() else None,
            is_duplicate if guard is not None else None,
        )
        out.skipped.update(text_skips)
        sel = kept[chosen]
        out.negative_ids = self._ids(neg_pool[sel])
        out.negative_scores = np.asarray(filter_scores, dtype=np.float64)[sel].tolist()
        out.negative_ranks = (sel + 1).tolist()
        if not out.negative_ids:
            out.reject = "no_negative"
            out.detail = f"all {len(neg_pool)} candidates were filtered: {out.skipped}"
        return out

    def _ids(self, rows: np.ndarray) -> list[str]:
        return self._id_array[rows].tolist()


def _or_none(values: np.ndarray, missing: np.ndarray) -> list:  # type: ignore[type-arg]
    """``values`` as a list of Python numbers, None where ``missing``."""
    out = values.astype(object)
    out[missing] = None
    return out.tolist()


@dataclass
class _Pools:
    """A batch's fused pools: ids (-1 pads) and fused scores per query, best first."""

    ids: np.ndarray
    scores: np.ndarray
    size: np.ndarray
    rank_in: dict[str, np.ndarray] = field(default_factory=dict)  # top pool_size, -1 absent
    dense: np.ndarray | None = None  # exact dense scores of the pool (or its top pool_size)


class _Ranking:
    """Where (query, row) pairs sit in a batch of rankings (n_queries, depth; -1 pads)."""

    def __init__(self, ids: np.ndarray):
        nq, depth = ids.shape
        self.span = int(ids.max(initial=-1)) + 1
        valid = ids >= 0
        qi, pos = np.nonzero(valid)
        self.table: np.ndarray | None = None
        if nq * self.span <= 1 << 24:  # small: a position table, no sorting
            self.table = np.full((nq, self.span), -1, dtype=np.int64)
            self.table[qi, ids[valid]] = pos
            return
        keys = qi * self.span + ids[valid]
        order = np.argsort(keys, kind="stable")
        self.keys, self.pos = keys[order], pos[order]

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The position of each of ``rows`` (n_queries, m) in its query's ranking, -1 if absent."""
        inside = (rows >= 0) & (rows < self.span)
        if self.table is not None:
            qi = np.broadcast_to(np.arange(rows.shape[0])[:, None], rows.shape)
            return np.where(inside, self.table[qi, np.where(inside, rows, 0)], -1)
        if not len(self.keys):
            return np.full(rows.shape, -1, dtype=np.int64)
        keys = np.arange(rows.shape[0])[:, None] * self.span + rows
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = (self.keys[at] == keys) & inside
        return np.where(hit, self.pos[at], -1)


def row_dots_pairs(rows: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """:func:`row_dots` of each row with its own query (``rows`` and ``qs`` aligned)."""
    a = np.asarray(rows, dtype=np.float64)
    return (a * np.asarray(qs, dtype=np.float64)).sum(axis=-1).astype(np.float32)


def _top_positive(all_scores: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's ``k`` best documents with a positive score, best first,
    ties by corpus position; -1 pads."""
    n = len(all_scores)
    if not n:
        return np.zeros((0, k), dtype=np.float32), np.full((0, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    out = np.full((n, k), -1, dtype=np.int64)
    step = max(1, (1 << 24) // max(1, len(all_scores[0])))  # a few rows at a time, not a copy
    for i in range(0, n, step):
        s, ids = top_k(np.stack(all_scores[i : i + step]), k, floor=0.0)
        hit = s > 0
        scores[i : i + len(s), : s.shape[1]] = np.where(hit, s, 0.0)
        out[i : i + len(s), : s.shape[1]] = np.where(hit, ids, -1)
    return scores, out
