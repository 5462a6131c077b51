"""The ``rank`` stage: listwise reasoning labels from a teacher LLM, self-consistency filtered.

For each query's candidate pool (``mine``'s ``candidates``), the teacher ranks sliding
windows of passages back to front (default window 20, step 10, over the top 100: RankGPT,
RankZephyr, ReasonRank) with ``prompts/rank_window.j2``, writing
``<think>...</think><answer>[3] > [1] > ...</answer>``. Each answer is parsed and repaired by
:func:`rankmill.listwise.parse_ranking` (every repair counted in the unit's counters as
``repair_<kind>``); an answer that ranked too few passages is a ``rejects`` row
(table ``windows``) and its window keeps its input order.

**Self-consistency filter.** The final ranking's NDCG@10 (ir-measures) against the query's
known relevant documents must reach ``min_ndcg`` (0.4, ReasonRank's): relevance comes from
``qrels`` and the query's ``source_doc_id`` (a synthetic query's source document), or, for a
query with neither, from the pointwise teacher's ``consensus`` verdicts (``label``). Below
it, the query's listwise example is a reject ``self_consistency`` with its score; a query
with no known relevant document is a reject ``no_relevance`` unless ``keep_unverified``.

Outputs: ``rankings`` (:data:`rankmill.schemas.RANKINGS`: the final order, the input order,
NDCG@10) and ``windows`` (:data:`rankmill.schemas.WINDOWS`: each window's input order,
output order, reasoning and answer) for the queries kept.

Documents travel by reference (:mod:`rankmill.docstore`): the driver plans from document ids
alone, the ``prepare`` step writes the documents the pools name once as an Arrow file that
each actor memory-maps, and a unit names its pools' documents rather than carrying them. A
candidate the corpus lacks (so the file lacks it) is a ``rejects`` row ``unknown_doc_id``
when its unit runs, and the pool is ranked without it::

    rank:
      endpoint: teacher
      window: 20
      step: 10
      depth: 100
      min_ndcg: 0.4
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from rankmill.config import StageParams
from rankmill.docstore import DOCS_FILE, DocStore, prepare_docs
from rankmill.listwise import SlidingWindows, Window, ndcg_at_k, parse_ranking
from rankmill.manifest import Counters
from rankmill.pointwise import split_reasoning
from rankmill.prompting import fence, render_messages
from rankmill.schemas import CANDIDATES, CONSENSUS, CORPUS, QRELS, QUERIES, RANKINGS, WINDOWS
from rankmill.stage import (
    Stage,
    StepContext,
    StepOutput,
    UnitOutput,
    WorkUnit,
    chunk_units,
    load_prompt,
    rejects_table,
)
from rankmill.stages.label import document_text

log = logging.getLogger(__name__)

# What a unit carries: the query, its pool's document ids (their texts come from the prepare
# step's file) and the relevance the self-consistency filter measures against.
POOLS = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("query_text", pa.string()),
        pa.field("doc_ids", pa.list_(pa.string())),
        pa.field("relevance", pa.string()),  # JSON {doc_id: grade}
        pa.field("relevance_from", pa.string()),
        pa.field("problem", pa.string()),
    ]
)


class RankParams(StageParams):
    """Params of the ``rank`` stage."""

    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {
        "queries_per_unit"
    }

    endpoint: str = Field(..., description="Name of the teacher endpoint (under endpoints:).")
    prompt: str = Field(
        "rank_window",
        description="Prompt template prompts/<prompt>.j2 (variables query, passages, n).",
    )
    window: int = Field(20, ge=2, description="Passages per window.")
    step: int = Field(10, ge=1, description="How far each window moves toward the front.")
    depth: int = Field(100, ge=2, description="Rank only the top this many of each pool.")
    passes: int = Field(
        1,
        ge=1,
        le=20,
        description="Back-to-front walks; more than one repeats until a walk changes nothing.",
    )
    min_ranked_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Reject a window's answer that ranks fewer than this share of its passages.",
    )
    min_ndcg: float = Field(
        0.4, ge=0, le=1, description="Self-consistency: the least NDCG@10 a kept ranking has."
    )
    relevance_from: list[str] = Field(
        default_factory=lambda: ["qrels", "source_doc", "labels"],
        description="Where a query's relevant documents come from, in order of preference: "
        "'qrels' and 'source_doc' together, else 'labels' (the pointwise consensus).",
    )
    min_relevance: int = Field(1, ge=1, description="A qrel score at least this is relevant.")
    keep_unverified: bool = Field(
        False,
        description="Keep rankings of queries with no known relevant document (NDCG null) "
        "instead of rejecting them as 'no_relevance'.",
    )
    max_queries: int | None = Field(
        None,
        ge=1,
        description="Budget: rank at most this many pools, a seeded sample; the others are "
        "'over_budget' rejects.",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(
        1024, ge=16, le=16384, description="Answer token limit (reasoning plus ranking)."
    )
    doc_max_chars: int = Field(
        600, ge=32, description="Cut each passage (title + text) to this many characters."
    )
    query_max_chars: int = Field(1000, ge=16, description="Cut queries to this many characters.")
    queries_per_unit: int = Field(
        16, ge=1, description="Queries per work unit (the unit of commit and resume)."
    )

    @model_validator(mode="after")
    def _windows_overlap(self) -> RankParams:
        if self.step >= self.window:
            raise ValueError("step must be smaller than window, or windows do not overlap")
        bad = set(self.relevance_from) - {"qrels", "source_doc", "labels"}
        if bad:
            raise ValueError(f"relevance_from: unknown sources {sorted(bad)}")
        return self


def rank_messages(
    template: str, query: str, passages: list[str], fenced: bool = True
) -> list[dict[str, str]]:
    """The chat messages of one window; the query and each passage are fenced
    (``fenced=False`` exists only to measure what fencing buys: never in a pipeline)."""
    return render_messages(
        template,
        query=fence(query, "QUERY") if fenced else query,
        passages=[fence(p, "DOCUMENT") if fenced else p for p in passages],
        n=len(passages),
    )


def build_pools(
    queries: pa.Table,
    candidates: pa.Table,
    qrels: pa.Table | None,
    consensus: pa.Table | None,
    depth: int,
    relevance_from: list[str],
    min_relevance: int = 1,
) -> pa.Table:
    """One row per candidate pool: the query, its top ``depth`` documents, and the relevance
    the self-consistency filter measures against (driver side). A document the corpus lacks
    stays in the pool: the unit that ranks it records it as a reject."""
    qtext: dict[str, str] = {}
    qsource: dict[str, str | None] = {}
    src_col = (
        queries.column("source_doc_id").to_pylist()
        if "source_doc_id" in queries.column_names
        else [None] * queries.num_rows
    )
    for q, t, s in zip(
        queries.column("query_id").to_pylist(),
        queries.column("text").to_pylist(),
        src_col,
        strict=True,
    ):
        qtext.setdefault(q, t)
        qsource.setdefault(q, s)
    judged: dict[str, dict[str, int]] = {}
    if qrels is not None and "qrels" in relevance_from:
        for q, d, s in zip(
            qrels.column("query_id").to_pylist(),
            qrels.column("doc_id").to_pylist(),
            qrels.column("score").to_pylist(),
            strict=True,
        ):
            if s is not None and s >= min_relevance:
                judged.setdefault(q, {})[d] = max(int(s), judged.get(q, {}).get(d, 0))
    verdicts: dict[str, dict[str, int]] = {}
    if consensus is not None and "labels" in relevance_from:
        for q, d, v in zip(
            consensus.column("query_id").to_pylist(),
            consensus.column("doc_id").to_pylist(),
            consensus.column("verdict").to_pylist(),
            strict=True,
        ):
            verdicts.setdefault(q, {})[d] = 1 if v else 0

    pools = sorted(
        zip(
            candidates.column("query_id").to_pylist(),
            candidates.column("doc_ids").to_pylist(),
            strict=True,
        ),
        key=lambda x: x[0],
    )
    rows = []
    seen: set[str] = set()
    for q, ds in pools:
        ids = list(dict.fromkeys(ds or []))[:depth]
        problem = None
        if q in seen:
            problem = "duplicate_pool"
        elif q not in qtext:
            problem = "unknown_query_id"
        seen.add(q)
        rel: dict[str, int] = {}
        source = "none"
        if q in judged:
            rel.update(judged[q])
            source = "qrels"
        src = qsource.get(q)
        if src and "source_doc" in relevance_from:
            rel[src] = max(rel.get(src, 0), 1)
            source = "qrels+source_doc" if source == "qrels" else "source_doc"
        if not rel and q in verdicts:
            rel = dict(verdicts[q])
            source = "labels"
        rows.append(
            {
                "query_id": q,
                "query_text": qtext.get(q),
                "doc_ids": ids,
                "relevance": json.dumps(rel, sort_keys=True),
                "relevance_from": source,
                "problem": problem,
            }
        )
    return pa.Table.from_pylist(rows, schema=POOLS)


class RankStage(Stage):
    """Listwise teacher rankings over sliding windows, self-consistency filtered."""

    name = "rank"
    version = "2"  # documents by reference (the prepare step's docs file)
    Params = RankParams
    inputs: ClassVar[dict[str, pa.Schema]] = {
        "corpus": CORPUS,
        "queries": QUERIES,
        "candidates": CANDIDATES,
    }
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {"qrels": QRELS, "consensus": CONSENSUS}
    outputs: ClassVar[dict[str, pa.Schema]] = {"rankings": RANKINGS, "windows": WINDOWS}
    prompts: ClassVar[tuple[str, ...]] = ("rank_window",)

    params: RankParams

    def prompt_texts(self) -> dict[str, str]:
        return {self.params.prompt: load_prompt(self.params.prompt)}

    # -- planning (driver) ---------------------------------------------------------------------
    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        # document ids only: the texts reach the workers through the prepare step's file
        return {
            "corpus": ["doc_id"],
            "queries": ["query_id", "text", "source_doc_id"],
            "candidates": ["query_id", "doc_ids"],
            "qrels": ["query_id", "doc_id", "score"],
            "consensus": ["query_id", "doc_id", "verdict"],
        }

    def _pools(self, inputs: dict[str, pa.Table]) -> pa.Table:
        p = self.params
        pools = build_pools(
            inputs["queries"],
            inputs["candidates"],
            inputs.get("qrels"),
            inputs.get("consensus"),
            p.depth,
            p.relevance_from,
            p.min_relevance,
        )
        if p.max_queries is not None and pools.num_rows > p.max_queries:
            import numpy as np

            rng = np.random.default_rng([self.ctx.seed, 2])
            chosen = set(rng.permutation(pools.num_rows)[: p.max_queries].tolist())
            problems = pools.column("problem").to_pylist()
            problems = [
                x if (i in chosen or x is not None) else "over_budget"
                for i, x in enumerate(problems)
            ]
            pools = pools.set_column(
                pools.schema.get_field_index("problem"), "problem", pa.array(problems, pa.string())
            )
        return pools

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        return chunk_units(self._pools(inputs), self.params.queries_per_unit, "pools")

    # -- stage-wide: the documents every actor maps -----------------------------------------------
    def prepare(self, step: StepContext) -> StepOutput:
        """The documents of the pools to rank (found as ``plan`` finds them), once, as the
        Arrow file every actor memory-maps (:mod:`rankmill.docstore`)."""

        def doc_ids(inputs: dict[str, pa.Table]) -> list[str]:
            pools = self._pools(inputs)
            ranked = pools.filter(pc.is_null(pools.column("problem")))
            return pc.list_flatten(ranked.column("doc_ids")).to_pylist()

        return prepare_docs(step, self.plan_inputs() or {}, doc_ids)

    # -- on a Ray actor --------------------------------------------------------------------------
    def setup(self) -> None:
        from rankmill.llm import Gateway

        self._docs = DocStore(lambda: self.step_file("prepare", DOCS_FILE))
        self._template = self.prompt_text(self.params.prompt)
        self._endpoint = self.ctx.endpoint(self.params.endpoint)
        self._gw = Gateway.from_context(self.ctx, self.params.endpoint)

    def teardown(self) -> None:
        gw = getattr(self, "_gw", None)
        if gw is not None:
            gw.close()

    def process(self, unit: WorkUnit) -> UnitOutput:
        from rankmill.llm import ChatRequest

        p = self.params
        rows = unit.tables["pools"].to_pylist()
        counters = Counters(rows_in=len(rows))
        extra = counters.extra
        rejects: list[dict[str, Any]] = []
        self._gw.take_counters()
        params = {"temperature": p.temperature, "max_tokens": p.max_tokens}

        todo = []
        for r in rows:
            if r["problem"] or r["query_text"] is None:
                reason = r["problem"] or "unknown_query_id"
                rejects.append(_reject(r["query_id"], "candidates", reason, None))
                continue
            todo.append(r)
        # Documents by reference: looked up in the prepare step's file, once per unit.
        wanted = [d for r in todo for d in r["doc_ids"]]
        found = iter(self._docs.lookup(wanted) if wanted else [])
        active: dict[str, tuple[dict[str, Any], SlidingWindows, dict[str, str]]] = {}
        for r in todo:
            passages = {}
            for d in r["doc_ids"]:
                doc = next(found)
                if doc is None:
                    row_id = f"{r['query_id']}|{d}"
                    rejects.append(
                        _reject(r["query_id"], "candidates", "unknown_doc_id", d, row_id)
                    )
                    continue
                passages[d], _ = document_text(doc[0], doc[1], p.doc_max_chars)
            r["doc_ids"] = list(passages)  # the pool without documents the file lacks
            sw = SlidingWindows(r["doc_ids"], p.window, p.step, p.depth, p.passes)
            active[r["query_id"]] = (r, sw, passages)

        window_rows: dict[str, list[dict[str, Any]]] = {q: [] for q in active}
        rejected_windows: dict[str, int] = dict.fromkeys(active, 0)
        # One round of LLM calls per window position: every query's next window at once.
        while True:
            batch: list[tuple[str, Window]] = []
            for q, (_, sw, _) in active.items():
                w = sw.next_window()
                if w is not None:
                    batch.append((q, w))
            if not batch:
                break
            reqs = []
            for q, w in batch:
                r, _, passages = active[q]
                msgs = rank_messages(
                    self._template,
                    r["query_text"][: p.query_max_chars],
                    [passages[d] for d in w.doc_ids],
                )
                reqs.append(ChatRequest(messages=msgs, params=params, resample_bad=0, tag=q))
            results = self._gw.chat_many_sync(reqs)
            for (q, w), res in zip(batch, results, strict=True):
                _, sw, _ = active[q]
                n = len(w.doc_ids)
                text = res.text if (res.ok or res.reject_reason == "truncated") else None
                parsed = parse_ranking(text, n, min_ranked=math.ceil(p.min_ranked_share * n))
                reason = parsed.reject
                if not res.ok and res.reject_reason != "truncated":
                    reason = res.reject_reason or "bad_answer"
                if parsed.reject is None and not res.ok:
                    reason = None  # a truncated answer whose ranking was complete enough
                for kind, k in parsed.repairs.items():
                    extra[f"repair_{kind}"] = extra.get(f"repair_{kind}", 0.0) + k
                if reason is None:
                    sw.apply(w, parsed.order)
                    output = [w.doc_ids[i] for i in parsed.order]
                    status = "ok"
                else:
                    sw.skip(w)
                    output = list(w.doc_ids)
                    status = reason
                    rejected_windows[q] += 1
                    rejects.append(
                        _reject(
                            q,
                            "windows",
                            reason,
                            None,
                            row_id=f"{q}|{w.pass_index}|{w.index}",
                            detail={
                                "answer": (res.text or "")[:300],
                                "request_key": res.key,
                                "finish_reason": res.finish_reason,
                            },
                        )
                    )
                reasoning, _ = split_reasoning(res.text or "")
                window_rows[q].append(
                    {
                        "query_id": q,
                        "pass_index": w.pass_index,
                        "window_index": w.index,
                        "start": w.start,
                        "input_doc_ids": list(w.doc_ids),
                        "output_doc_ids": output,
                        "reasoning": reasoning if "</think>" in (res.text or "") else None,
                        "answer": parsed.answer or None,
                        "repairs": json.dumps(parsed.repairs, sort_keys=True),
                        "status": status,
                        "request_key": res.key,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                    }
                )

        rankings: list[dict[str, Any]] = []
        windows: list[dict[str, Any]] = []
        for q, (r, sw, _) in active.items():
            relevance = json.loads(r["relevance"])
            ndcg = ndcg_at_k(sw.order, relevance, 10, q)
            n_windows = len(window_rows[q])
            extra["windows"] = extra.get("windows", 0.0) + n_windows
            if ndcg is not None:
                extra["ndcg10_sum"] = extra.get("ndcg10_sum", 0.0) + ndcg
                extra["ndcg10_count"] = extra.get("ndcg10_count", 0.0) + 1
            reason = None
            if ndcg is None and not p.keep_unverified:
                reason = "no_relevance"
            elif ndcg is not None and ndcg < p.min_ndcg:
                reason = "self_consistency"
            if reason is not None:
                rejects.append(
                    _reject(
                        q,
                        "candidates",
                        reason,
                        None,
                        detail={
                            "ndcg10": ndcg,
                            "min_ndcg": p.min_ndcg,
                            "relevance_from": r["relevance_from"],
                            "ranking": sw.order[:20],
                        },
                    )
                )
                continue
            rankings.append(
                {
                    "query_id": q,
                    "doc_ids": sw.order,
                    "input_doc_ids": r["doc_ids"],
                    "ndcg10": ndcg,
                    "relevance_from": r["relevance_from"],
                    "windows": n_windows,
                    "rejected_windows": rejected_windows[q],
                    "model": self._endpoint.model,
                }
            )
            windows.extend(window_rows[q])

        self._gw.fill_counters(counters)
        counters.rows_out = len(rankings)
        for rej in rejects:
            counters.reject(rej["reason"])
        return UnitOutput(
            {
                "rankings": pa.Table.from_pylist(rankings, schema=RANKINGS),
                "windows": pa.Table.from_pylist(windows, schema=WINDOWS),
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )


def _reject(
    query_id: str,
    table: str,
    reason: str,
    doc_id: str | None,
    row_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "table": table,
        "row_id": row_id or query_id,
        "query_id": query_id,
        "doc_id": doc_id,
        "reason": reason,
        "detail": detail,
    }
