"""The ``mine`` stage: a candidate pool and hard negatives for every query.

Reads ``corpus`` and ``queries`` (and, when an earlier stage writes them, ``qrels`` and
``exclusions``); writes ``candidates`` (:data:`rankmill.schemas.CANDIDATES`: the fused
BM25 + dense pool that teachers and judges label) and ``negatives``
(:data:`rankmill.schemas.NEGATIVES`: filtered hard negatives for retriever training)::

    stages:
      ingest: {source: ../data/sample}
      mine:
        num_negatives: 8
        filters: {max_relative_score: 0.95, duplicate_ratio: 95}
        sampling: {strategy: stratified}
        worker_gpus: 1          # embed on a GPU when the cluster has one

Positives are document ids, never texts: judged pairs with ``score >= min_relevance``, and a
synthetic query's ``source_doc_id``. Judged pairs with a negative score and the
``exclusions`` table are never negatives. A query without a positive still gets its
candidate pool (judges can label it) and a ``no_positive`` reject for the negatives; a query
whose candidates were all filtered gets a ``no_negative`` reject.

``retrievers: [bm25]`` mines without a dense model: the pool and the negatives come from the
BM25 ranking, and the margins compare BM25 scores (or a ``cross_encoder``'s).

Work units are chunks of queries. The corpus side (texts, embeddings, BM25 index) is built
once, by the stage's ``prepare`` step (:func:`rankmill.retrieval.miner.build_corpus_index`),
committed with the stage, and memory-mapped by every actor in ``setup()``. Corpus
embeddings go through the embedding cache (under the run directory unless ``cache_dir``
says otherwise) in small chunks, so a killed run resumes embedding where it stopped, and a
later stage or run over the same corpus and model reads them back instead.

Embedding uses as many torch threads as ``embed_threads`` says; by default the actor's
``worker_cpus`` when set, else this machine's CPUs shared among the stage's ``workers`` (the
stage runs alone, and embedding is its expensive step). A GPU embeds when the actor has one
(``worker_gpus``, taken by default where the driver's machine has one); the device kind is
part of the stage's fingerprint, since GPU embeddings differ from CPU ones in the last bits.
Dense search is exact float32 on the CPU either way.

A corpus with repeated doc_ids (ingest's ``duplicate_id: keep``) is mined with the first
row of each id; the others become ``duplicate_doc_id`` rejects of the ``prepare`` step.
Filter counts ("skipped N (x%) because ...") go to the log and to each unit's counters.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field, model_validator

from rankmill.config import StageParams
from rankmill.manifest import Counters
from rankmill.retrieval.cache import EmbeddingCache
from rankmill.retrieval.filters import describe_skips
from rankmill.retrieval.miner import (
    DOCS_FILE,
    DONE_FILE,
    MinedQuery,
    MineQuery,
    Miner,
    MiningParams,
    build_corpus_index,
    doc_text,
    make_encoder,
)
from rankmill.schemas import CANDIDATES, CORPUS, EXCLUSIONS, NEGATIVES, QRELS, QUERIES
from rankmill.stage import (
    Stage,
    StepContext,
    StepOutput,
    UnitOutput,
    WorkUnit,
    chunk_units,
    rejects_table,
)

log = logging.getLogger(__name__)

UNIT_QUERIES = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("positive_ids", pa.list_(pa.string())),
        pa.field("excluded_ids", pa.list_(pa.string())),
    ]
)


def _gpu_present() -> bool:
    # Cheap and import-free: config validation must not load torch.
    path = "/proc/driver/nvidia/gpus"
    return os.path.isdir(path) and bool(os.listdir(path))


class MineParams(StageParams, MiningParams):
    """Params of the ``mine`` stage: mining settings plus how queries become work units."""

    # Unit and batch sizes, caching and threads change no output. Placement does, through
    # the embedding device: that goes in by fingerprint_extra.
    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {
        "cache_dir",
        "queries_per_unit",
        "batch_size",
        "search_batch",
        "embedding_cache",
        "embed_threads",
    }

    queries_per_unit: int = Field(
        256, ge=1, description="Queries per work unit (the unit of commit and resume)."
    )
    min_relevance: int = Field(
        1, ge=1, description="A judged pair with at least this score makes a positive."
    )
    source_doc_positive: bool = Field(
        True, description="Use a synthetic query's source_doc_id as a positive."
    )
    cache_dir: str | None = Field(
        None,
        description="Embedding cache folder (default: <run dir>/cache/embeddings, or "
        "~/.cache/rankmill/embeddings when the run dir is not on local disk).",
    )

    embed_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per actor for embedding (default: worker_cpus when set, "
        "else this machine's CPUs shared among the stage's workers).",
    )

    def threads(self) -> int:
        """How many torch threads an actor embeds with."""
        return self.embed_threads or 1

    def device_kind(self) -> str:
        """Where embeddings are computed: 'cuda' or 'cpu' (fingerprinted)."""
        if self.device != "auto":
            return self.device.split(":")[0]
        return "cuda" if self.worker_gpus > 0 else "cpu"

    @model_validator(mode="after")
    def _threads_default(self) -> MineParams:
        # Resolved where the config is read, so the value travels to the actors as it is.
        if self.embed_threads is None:
            if "worker_cpus" in self.model_fields_set:
                n = max(1, int(self.worker_cpus))
            else:
                n = max(1, (os.cpu_count() or 1) // self.workers)
            object.__setattr__(self, "embed_threads", n)
        return self

    @model_validator(mode="after")
    def _gpu_default(self) -> MineParams:
        # Embedding is the expensive part: take a GPU by default where this machine has one.
        if "worker_gpus" not in self.model_fields_set and _gpu_present():
            object.__setattr__(self, "worker_gpus", 1.0)
        return self


def unit_queries(
    queries: pa.Table,
    qrels: pa.Table | None,
    exclusions: pa.Table | None,
    min_relevance: int = 1,
    source_doc_positive: bool = True,
) -> pa.Table:
    """One row per query: its text, positive ids and excluded ids (sorted, deduplicated)."""
    pos: dict[str, set[str]] = defaultdict(set)
    excl: dict[str, set[str]] = defaultdict(set)
    if qrels is not None and qrels.num_rows:
        for q, d, s in zip(
            qrels.column("query_id").to_pylist(),
            qrels.column("doc_id").to_pylist(),
            qrels.column("score").to_pylist(),
            strict=True,
        ):
            if s is None:
                continue
            if s >= min_relevance:
                pos[q].add(d)
            elif s < 0:  # e.g. a source document marked -1: not to be used either way
                excl[q].add(d)
    if exclusions is not None and exclusions.num_rows:
        for q, d in zip(
            exclusions.column("query_id").to_pylist(),
            exclusions.column("doc_id").to_pylist(),
            strict=True,
        ):
            excl[q].add(d)
    ids = queries.column("query_id").to_pylist()
    texts = queries.column("text").to_pylist()
    sources = (
        queries.column("source_doc_id").to_pylist()
        if "source_doc_id" in queries.column_names
        else [None] * len(ids)
    )
    rows: dict[str, list[Any]] = {
        "query_id": [],
        "text": [],
        "positive_ids": [],
        "excluded_ids": [],
    }
    for q, t, src in zip(ids, texts, sources, strict=True):
        p = set(pos.get(q, ()))
        if source_doc_positive and src:
            p.add(src)
        x = excl.get(q, set()) - p  # an explicit positive wins over an exclusion
        rows["query_id"].append(q)
        rows["text"].append(t)
        rows["positive_ids"].append(sorted(p))
        rows["excluded_ids"].append(sorted(x))
    return pa.table(rows, schema=UNIT_QUERIES)


def first_rows(ids: list[str]) -> list[int]:
    """Positions of the first row of each id, in order."""
    seen: set[str] = set()
    out = []
    for i, d in enumerate(ids):
        if d not in seen:
            seen.add(d)
            out.append(i)
    return out


class MineStage(Stage):
    """Candidate pools (BM25 + dense, fused) and filtered hard negatives per query."""

    name = "mine"
    version = "3"
    Params = MineParams
    inputs: ClassVar[dict[str, pa.Schema]] = {"corpus": CORPUS, "queries": QUERIES}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {"qrels": QRELS, "exclusions": EXCLUSIONS}
    outputs: ClassVar[dict[str, pa.Schema]] = {"candidates": CANDIDATES, "negatives": NEGATIVES}

    params: MineParams

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        # units are queries: the corpus is read by the prepare step, on a worker
        return {"queries": None, "qrels": None, "exclusions": None}

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        p = self.params
        table = unit_queries(
            inputs["queries"],
            inputs.get("qrels"),
            inputs.get("exclusions"),
            p.min_relevance,
            p.source_doc_positive,
        )
        return chunk_units(table, p.queries_per_unit, "queries")

    def cache_dir(self) -> str:
        if self.params.cache_dir:
            return self.ctx.resolve_path(self.params.cache_dir)
        if "://" not in self.ctx.run_dir:
            return os.path.join(self.ctx.run_dir, "cache", "embeddings")
        return os.path.join(os.path.expanduser("~"), ".cache", "rankmill", "embeddings")

    def fingerprint_extra(self) -> dict[str, Any]:
        p = self.params
        if not (p.uses_dense() or p.cross_encoder):
            return {}
        return {"embedding_device": p.device_kind()}

    def prepare(self, step: StepContext) -> StepOutput:
        """Build the corpus index once for every actor (see the module docstring)."""
        t0 = time.perf_counter()
        p = self.params
        if p.uses_dense():
            import torch

            torch.set_num_threads(p.threads())
        corpus = step.read_input("corpus", columns=["doc_id", "title", "text"])
        doc_ids = corpus.column("doc_id").to_pylist()
        titles = corpus.column("title").to_pylist()
        texts = corpus.column("text").to_pylist()
        rows_in = corpus.num_rows
        del corpus
        keep = first_rows(doc_ids)
        rejects: list[dict[str, Any]] = []
        if len(keep) < len(doc_ids):
            kept = set(keep)
            rejects = [
                {
                    "table": "corpus",
                    "row_id": doc_ids[i],
                    "doc_id": doc_ids[i],
                    "reason": "duplicate_doc_id",
                    "detail": "an earlier corpus row has this doc_id; mining uses the first",
                }
                for i in range(len(doc_ids))
                if i not in kept
            ]
            log.warning(
                "mine: the corpus repeats %d doc_ids; mining uses the first row of each",
                len(rejects),
            )
            doc_ids = [doc_ids[i] for i in keep]
            titles = [titles[i] for i in keep]
            texts = [texts[i] for i in keep]
        full = [doc_text(t, x) for t, x in zip(titles, texts, strict=True)]
        del titles, texts
        encoder = make_encoder(p) if p.uses_dense() else None
        cache = EmbeddingCache(self.cache_dir() if p.embedding_cache else None)
        files = build_corpus_index(p, doc_ids, full, step.work_dir, encoder, cache, self.ctx.seed)
        counters = Counters(rows_in=rows_in, rows_out=len(doc_ids))
        for r in rejects:
            counters.reject(r["reason"])
        counters.extra.update(
            embedded_docs=float(cache.computed_rows),
            embed_threads=float(p.threads()) if p.uses_dense() else 0.0,
            index_seconds=round(time.perf_counter() - t0, 3),
        )
        return StepOutput(
            tables={"rejects": rejects_table(rejects, self.ctx.stage_name, "prepare")},
            files=files,
            counters=counters,
        )

    def setup(self) -> None:
        t0 = time.perf_counter()
        p = self.params
        if p.uses_dense() or p.cross_encoder:
            import torch

            torch.set_num_threads(p.threads())
        with open(self.step_file("prepare", DONE_FILE)) as f:
            names = json.load(f)["files"]
        files = {name: self.step_file("prepare", name) for name in names}
        self.miner = Miner(p, seed=self.ctx.seed)
        self.miner.load_index(os.path.dirname(files[DOCS_FILE]), files)
        # Reported with the first unit this actor processes.
        self._setup_extra: dict[str, float] | None = {
            "setup_seconds": round(time.perf_counter() - t0, 3)
        }

    def process(self, unit: WorkUnit) -> UnitOutput:
        p = self.params
        rows = unit.tables["queries"].to_pylist()
        mined = self.miner.mine(
            [
                MineQuery(r["query_id"], r["text"], r["positive_ids"], r["excluded_ids"])
                for r in rows
            ]
        )
        counters = Counters(rows_in=len(rows))
        extra = counters.extra
        if getattr(self, "_setup_extra", None):
            extra.update(self._setup_extra or {})
            self._setup_extra = None
        rejects: list[dict[str, Any]] = []
        skipped: dict[str, int] = defaultdict(int)
        considered = 0
        neg_rows: list[MinedQuery] = []
        for m in mined:
            considered += m.considered
            for reason, n in m.skipped.items():
                skipped[reason] += n
            if m.full_ranking:
                extra["full_ranking_fallbacks"] = extra.get("full_ranking_fallbacks", 0) + 1
            if m.missing_positive_ids:
                extra["missing_positives"] = extra.get("missing_positives", 0) + len(
                    m.missing_positive_ids
                )
            if m.reject:
                rejects.append(
                    {
                        "table": "queries",
                        "row_id": m.query_id,
                        "query_id": m.query_id,
                        "reason": m.reject,
                        "detail": m.detail,
                    }
                )
                counters.reject(m.reject)
                continue
            neg_rows.append(m)
            if len(m.negative_ids) < p.num_negatives:
                extra["short_of_negatives"] = extra.get("short_of_negatives", 0) + 1
        extra["queries"] = float(len(mined))
        extra["queries_with_negatives"] = float(len(neg_rows))
        extra["negatives"] = float(sum(len(m.negative_ids) for m in neg_rows))
        extra["candidates_considered"] = float(considered)
        for reason, n in skipped.items():
            extra[f"skipped_{reason}"] = float(n)
        for line in describe_skips(dict(skipped), considered):
            log.info("mine unit %s: %s", unit.unit_id, line)
        score_kind = p.score_kind()
        candidates = pa.table(
            {
                "query_id": [m.query_id for m in mined],
                "doc_ids": [m.candidate_ids for m in mined],
                "scores": [m.candidate_scores for m in mined],
                "bm25_ranks": [m.bm25_ranks for m in mined],
                "bm25_scores": [m.bm25_scores for m in mined],
                "dense_ranks": [m.dense_ranks for m in mined],
                "dense_scores": [m.dense_scores for m in mined],
                "retrievers": [m.retrievers for m in mined],
                "positive_ids": [m.positive_ids for m in mined],
            },
            schema=CANDIDATES,
        )
        negatives = pa.table(
            {
                "query_id": [m.query_id for m in neg_rows],
                "positive_ids": [m.positive_ids for m in neg_rows],
                "positive_scores": [m.positive_scores for m in neg_rows],
                "negative_ids": [m.negative_ids for m in neg_rows],
                "negative_scores": [m.negative_scores for m in neg_rows],
                "negative_ranks": [m.negative_ranks for m in neg_rows],
                "score_kind": [score_kind] * len(neg_rows),
            },
            schema=NEGATIVES,
        )
        counters.rows_out = candidates.num_rows + negatives.num_rows
        return UnitOutput(
            {
                "candidates": candidates,
                "negatives": negatives,
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )
