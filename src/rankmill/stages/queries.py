"""The ``queries`` stage: a teacher LLM writes queries from sampled documents, rewrites a share
of the existing queries as keyword queries, and only queries that pass the filters go on.

Runs before ``mine``. From ``corpus`` it samples ``num_docs`` documents (seeded with the run
seed; stratified by a corpus column with ``stratify_by``) and asks the teacher, for each
document and each of ``templates``, for one query: ``question`` (``prompts/query_question.j2``,
a plain question the document answers) or ``reasoning`` (``prompts/query_reasoning.j2``, a
question that needs the document's knowledge but avoids its words, as ReasonIR and
ReasonRank write them). It rewrites ``reformulate_share`` of the existing queries as keyword
queries (``prompts/query_keywords.j2``), skipping those whose meaning rests on negation,
causality or comparison (a bag of keywords would lose it); their judgments are copied to the
new query in ``qrels``.

Every synthetic query then passes, in order: deduplication (normalised exact match, then
rapidfuzz ``token_sort_ratio`` >= ``dedup_threshold`` against earlier queries of its unit and
the existing queries, and across units in the ``finalize`` step), decontamination
(``token_sort_ratio`` >= ``decontam_threshold`` with a query of ``eval_queries``), and the
round-trip filter (its source document must be in the
top ``roundtrip_k`` of ``roundtrip_retriever`` for it). What fails is a reject with its
reason. With ``hard_negatives``, the teacher also writes one plausible-but-unhelpful passage
per kept document query (ReasonIR); those go to ``synthetic_negatives``, marked synthetic,
never into the corpus.

Outputs: ``queries`` (the existing queries, then the kept synthetic ones, whose
``source_doc_id`` ``mine`` makes their positive), ``qrels`` (the existing judgments plus
those of keyword queries), ``lineage`` (every query written, kept or not: source document,
template, prompt hash, teacher model, parent query, seed, round-trip rank, status) and
``synthetic_negatives``. Units write what they keep to ``drafts`` and ``draft_negatives``;
the ``finalize`` step deduplicates the drafts of all units against each other and writes the
kept queries, their judgments, lineage and negatives.

Documents travel by reference (:mod:`rankmill.docstore`): the driver plans from document ids
alone. Drawing the sample takes the texts (a document without text is never drawn), so the
``prepare`` step draws it and writes the sampled documents, in corpus order, as an Arrow file
that every actor memory-maps; a unit names a run of positions in that sample. The driver plans
``min(num_docs, documents)`` positions; where documents without text leave the sample smaller,
the units past its end are empty::

    queries:
      endpoint: teacher
      num_docs: 200
      templates: [question, reasoning]
      reformulate_share: 0.4
      roundtrip_k: 20
      eval_queries: /data/beir/scifact/queries.jsonl
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from rankmill.config import StageParams
from rankmill.docstore import DOCS_FILE, DocStore, prepare_docs
from rankmill.manifest import Counters
from rankmill.prompting import fence, render_messages
from rankmill.schemas import CORPUS, LINEAGE, QRELS, QUERIES, SYNTHETIC_NEGATIVES
from rankmill.stage import (
    Stage,
    StepContext,
    StepOutput,
    UnitOutput,
    WorkUnit,
    content_key,
    load_prompt,
    rejects_table,
    table_key,
)
from rankmill.stages.label import document_text
from rankmill.synthesis import (
    contaminated,
    dedup_queries,
    reformulable,
    round_trip_rank,
    sample_documents,
)

log = logging.getLogger(__name__)

TEMPLATES = {"question": "query_question", "reasoning": "query_reasoning"}
KEYWORDS_TEMPLATE = "query_keywords"
NEGATIVE_TEMPLATE = "hard_negative"

PARENTS = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source_doc_id", pa.string()),
        pa.field("skip", pa.string()),  # the cue that rules a keyword rewrite out, else null
    ]
)


class QueriesParams(StageParams):
    """Params of the ``queries`` stage."""

    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {
        "docs_per_unit",
        "cache_dir",
    }

    endpoint: str = Field(..., description="Name of the teacher endpoint (under endpoints:).")
    templates: list[Literal["question", "reasoning"]] = Field(
        default_factory=lambda: ["question", "reasoning"],
        description="Queries to write per sampled document: 'question' and/or 'reasoning'.",
    )
    num_docs: int = Field(
        50, ge=0, description="Budget: documents sampled to write queries from (seeded)."
    )
    stratify_by: str | None = Field(
        None, description="A corpus column; every value gets its proportional share of docs."
    )
    reformulate_share: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Share of the existing queries (those without negation, causality or "
        "comparison) rewritten as keyword queries.",
    )
    max_reformulations: int | None = Field(
        None, ge=0, description="Budget: at most this many keyword rewrites (None: no cap)."
    )
    keep_input_queries: bool = Field(
        True, description="Write the existing queries and judgments through to the outputs."
    )
    dedup_threshold: float = Field(
        92.0, ge=0, le=100, description="rapidfuzz token_sort_ratio at which two are duplicates."
    )
    eval_queries: str | None = Field(
        None,
        description="Evaluation queries to decontaminate against: a .jsonl (field 'text'), "
        ".tsv (id<TAB>text) or .txt (one per line) file.",
    )
    decontaminate_input_queries: bool = Field(
        False,
        description="Treat the existing queries as evaluation queries too (when they are the "
        "test set the synthetic queries must not leak into).",
    )
    decontam_threshold: float = Field(
        90.0, ge=0, le=100, description="token_sort_ratio at which a query counts as leaked."
    )
    roundtrip_k: int = Field(
        20, ge=1, description="Keep a document query only if its source is in this top K."
    )
    roundtrip_retriever: Literal["bm25", "dense", "hybrid"] = Field(
        "bm25",
        description="Retriever of the round-trip filter: bm25, dense (all-MiniLM-L6-v2 by "
        "default) or hybrid (reciprocal rank fusion of both).",
    )
    dense_model: str = Field(
        "all-MiniLM-L6-v2", description="sentence-transformers model of dense round trips."
    )
    hard_negatives: bool = Field(
        False, description="Also write one synthetic hard-negative passage per kept query."
    )
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(64, ge=4, le=1024, description="Answer token limit of a query.")
    negative_max_tokens: int = Field(
        192, ge=16, le=2048, description="Answer token limit of a synthetic negative."
    )
    doc_max_chars: int = Field(
        1500, ge=64, description="Cut source documents to this many characters."
    )
    min_query_words: int = Field(2, ge=1, description="A shorter query is a 'too_short' reject.")
    max_query_chars: int = Field(300, ge=16, description="A longer query is a 'too_long' reject.")
    docs_per_unit: int = Field(
        64,
        ge=1,
        description="Documents (or existing queries) per work unit (the unit of commit and "
        "resume).",
    )
    cache_dir: str | None = Field(
        None, description="Embedding cache folder of dense round trips (default: the run's)."
    )


_LABEL = re.compile(
    r"^(?:question|query|keywords?|keyword query|search query)\s*:\s*", re.IGNORECASE
)


def clean_query(text: str | None) -> str:
    """The query in a teacher's answer: its first non-empty line, without a label
    ("Question:"), numbering, quotes or emphasis."""
    if not text:
        return ""
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(?:\d+[.)]\s*|[-*•]\s*)", "", line)
        line = re.sub(
            r"^(?:question|query|keywords?|keyword query|search query)\s*:\s*",
            "",
            line,
            flags=re.IGNORECASE,
        )
        return line.strip().strip("\"'`*“”‘’").strip()
    return ""


def read_eval_queries(path: str) -> list[str]:
    """Evaluation query texts from a .jsonl ('text' field), .tsv (id, text) or .txt file."""
    from rankmill.errors import StageError

    p = Path(path)
    if not p.is_file():
        raise StageError(f"queries: eval_queries {path} does not exist")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise StageError(f"{path}:{i}: not JSON ({exc})") from exc
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(obj["text"])
        return out
    if p.suffix == ".tsv":
        return [x.split("\t", 1)[1] for x in lines if "\t" in x]
    return [x for x in lines if x.strip()]


def _query_id(kind: str, origin: str, text: str) -> str:
    return "syn-" + content_key(kind, origin, text)[:16]


class QueriesStage(Stage):
    """Synthetic and reformulated queries, deduplicated, decontaminated, round-trip filtered."""

    name = "queries"
    version = "2"  # documents by reference (the prepare step's sample and docs file)
    Params = QueriesParams
    inputs: ClassVar[dict[str, pa.Schema]] = {"corpus": CORPUS, "queries": QUERIES}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {"qrels": QRELS}
    outputs: ClassVar[dict[str, pa.Schema]] = {
        "queries": QUERIES,
        "qrels": QRELS,
        "lineage": LINEAGE,
        "synthetic_negatives": SYNTHETIC_NEGATIVES,
        # what units keep before the finalize step deduplicates across them
        "drafts": LINEAGE,
        "draft_negatives": SYNTHETIC_NEGATIVES,
    }
    prompts: ClassVar[tuple[str, ...]] = (
        "query_question",
        "query_reasoning",
        "query_keywords",
        "hard_negative",
    )

    params: QueriesParams

    def _template_names(self) -> list[str]:
        p = self.params
        names = [TEMPLATES[t] for t in p.templates]
        if p.reformulate_share > 0:
            names.append(KEYWORDS_TEMPLATE)
        if p.hard_negatives:
            names.append(NEGATIVE_TEMPLATE)
        return names

    def prompt_texts(self) -> dict[str, str]:
        return {n: load_prompt(n) for n in self._template_names()}

    def fingerprint_extra(self) -> dict[str, Any]:
        if not self.params.eval_queries:
            return {}
        path = self.ctx.resolve_path(self.params.eval_queries)
        data = Path(path).read_bytes() if Path(path).is_file() else b""
        return {"eval_queries_sha256": hashlib.sha256(data).hexdigest()}

    # -- planning (driver) ---------------------------------------------------------------------
    def _samples_docs(self) -> bool:
        return self.params.num_docs > 0 and bool(self.params.templates)

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        # Document ids only: the prepare step draws the sample. A stratum column that the
        # corpus schema does not declare is read too, so that a missing one fails here.
        corpus = ["doc_id"]
        if self._samples_docs() and self.params.stratify_by not in (None, *CORPUS.names):
            corpus.append(self.params.stratify_by)
        return {"corpus": corpus, "queries": None, "qrels": None}

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        p = self.params
        corpus, queries = inputs["corpus"], inputs["queries"]
        units: list[WorkUnit] = []
        if p.keep_input_queries:
            tables = {"passthrough": queries}
            if inputs.get("qrels") is not None:
                tables["qrels"] = inputs["qrels"]
            key = content_key(*(table_key(t) for t in tables.values()))
            units.append(WorkUnit("input", key, tables, meta={"kind": "passthrough"}))

        # Keyword rewrites of a seeded share of the existing queries that allow one.
        if p.reformulate_share > 0 and queries.num_rows:
            rows = queries.to_pylist()
            skips = [reformulable(r["text"])[1] for r in rows]
            eligible = [i for i, s in enumerate(skips) if s is None]
            n = round(p.reformulate_share * len(eligible))
            if p.max_reformulations is not None:
                n = min(n, p.max_reformulations)
            rng = np.random.default_rng([self.ctx.seed, 1])
            chosen = set(rng.permutation(eligible)[:n].tolist()) if eligible else set()
            # Skipped queries travel too, so their skips are counted by the unit.
            picked = [
                {
                    "query_id": r["query_id"],
                    "text": r["text"],
                    "source_doc_id": r.get("source_doc_id"),
                    "skip": skips[i],
                }
                for i, r in enumerate(rows)
                if i in chosen or skips[i] is not None
            ]
            table = pa.Table.from_pylist(picked, schema=PARENTS)
            for i, start in enumerate(range(0, table.num_rows, p.docs_per_unit)):
                part = table.slice(start, p.docs_per_unit)
                units.append(
                    WorkUnit(
                        f"reformulate-{i:05d}",
                        table_key(part),
                        {"parents": part},
                        meta={"kind": "reformulate"},
                    )
                )

        # Document queries from a seeded (optionally stratified) sample of the corpus, drawn
        # by the prepare step (it leaves out documents without text, which takes the texts):
        # a unit names positions in the sample, which holds at most this many documents.
        if self._samples_docs():
            n = min(p.num_docs, pc.count_distinct(corpus.column("doc_id")).as_py())
            for i, start in enumerate(range(0, n, p.docs_per_unit)):
                stop = min(start + p.docs_per_unit, n)
                units.append(
                    WorkUnit(
                        f"docs-{i:05d}",
                        content_key("docs", start, stop),
                        meta={"kind": "docs", "start": start, "stop": stop},
                    )
                )
        log.info("queries %s: %d units", self.ctx.stage_name, len(units))
        return units

    # -- stage-wide: the sampled documents every actor maps ------------------------------------
    def prepare(self, step: StepContext) -> StepOutput | None:
        """The seeded sample of documents to write queries from, once, as the Arrow file every
        actor memory-maps (:mod:`rankmill.docstore`), in corpus order."""
        if not self._samples_docs():
            return None
        columns = ["doc_id", "text"]
        if self.params.stratify_by not in (None, *columns):
            columns.append(self.params.stratify_by)
        return prepare_docs(step, {"corpus": columns}, lambda i: self._sample(i["corpus"]))

    def _sample(self, corpus: pa.Table) -> list[str]:
        """Up to ``num_docs`` documents with text, drawn with the run seed (stratified by
        ``stratify_by``)."""
        p = self.params
        ids = corpus.column("doc_id").to_pylist()
        strata = corpus.column(p.stratify_by).to_pylist() if p.stratify_by else None
        texts = corpus.column("text").to_pylist()
        empty = {d for d, t in zip(ids, texts, strict=True) if not (t or "").strip()}
        return sample_documents(ids, p.num_docs, self.ctx.seed, strata, empty)

    # -- on a Ray actor --------------------------------------------------------------------------
    def setup(self) -> None:
        from rankmill.llm import Gateway

        p = self.params
        self._docs = DocStore(lambda: self.step_file("prepare", DOCS_FILE))
        self._texts = {n: self.prompt_text(n) for n in self._template_names()}
        self._hashes = {
            n: hashlib.sha256(t.encode("utf-8")).hexdigest() for n, t in self._texts.items()
        }
        self._endpoint = self.ctx.endpoint(p.endpoint)
        self._gw = Gateway.from_context(self.ctx, p.endpoint)
        existing = self.ctx.read_input("queries")
        self._existing = existing.column("text").to_pylist()
        evals = read_eval_queries(self.ctx.resolve_path(p.eval_queries)) if p.eval_queries else []
        if p.decontaminate_input_queries:
            evals = evals + self._existing
        self._eval = evals
        self._retriever: RoundTrip | None = None

    def _round_trip(self) -> RoundTrip:
        if self._retriever is None:
            corpus = self.ctx.read_input("corpus")
            self._retriever = RoundTrip(self.params, corpus, self._cache_dir())
        return self._retriever

    def _cache_dir(self) -> str | None:
        import os

        if self.params.cache_dir:
            return self.ctx.resolve_path(self.params.cache_dir)
        if "://" not in self.ctx.run_dir:
            return os.path.join(self.ctx.run_dir, "cache", "embeddings")
        return None

    def teardown(self) -> None:
        gw = getattr(self, "_gw", None)
        if gw is not None:
            gw.close()

    def process(self, unit: WorkUnit) -> UnitOutput:
        self._gw.take_counters()
        kind = unit.meta.get("kind")
        if kind == "passthrough":
            q = unit.tables["passthrough"]
            qr = unit.tables.get("qrels")
            counters = Counters(rows_in=q.num_rows, rows_out=q.num_rows)
            counters.extra["input_queries"] = float(q.num_rows)
            return self._output(unit, q.cast(QUERIES), qr, [], [], [], counters)
        if kind == "reformulate":
            return self._reformulate(unit)
        return self._synthesize(unit)

    def _ask(self, items: list[tuple[str, list[dict[str, str]]]], max_tokens: int) -> list[Any]:
        from rankmill.llm import ChatRequest

        p = self.params
        params = {"temperature": p.temperature, "max_tokens": max_tokens}
        reqs = [ChatRequest(messages=m, params=params, resample_bad=0, tag=t) for t, m in items]
        return self._gw.chat_many_sync(reqs)

    def _reformulate(self, unit: WorkUnit) -> UnitOutput:
        p = self.params
        rows = unit.tables["parents"].to_pylist()
        counters = Counters(rows_in=len(rows))
        todo = []
        for r in rows:
            if r["skip"]:
                counters.extra[f"reformulation_skipped_{r['skip']}"] = (
                    counters.extra.get(f"reformulation_skipped_{r['skip']}", 0.0) + 1
                )
                continue
            msgs = render_messages(self._texts[KEYWORDS_TEMPLATE], query=fence(r["text"], "QUERY"))
            todo.append((r, msgs))
        results = self._ask([(r["query_id"], m) for r, m in todo], p.max_tokens)
        cands = []
        for (r, _), res in zip(todo, results, strict=True):
            cands.append(
                {
                    "kind": "keywords",
                    "template": KEYWORDS_TEMPLATE,
                    "source_doc_id": r["source_doc_id"],
                    "parent_query_id": r["query_id"],
                    "res": res,
                }
            )
        return self._filter_and_write(unit, cands, counters)

    def _synthesize(self, unit: WorkUnit) -> UnitOutput:
        p = self.params
        # the unit's positions in the prepare step's sample (none past its end)
        docs = self._docs.rows(unit.meta["start"], unit.meta["stop"])
        counters = Counters(rows_in=len(docs))
        items, meta = [], []
        for d in docs:
            text, _ = document_text(d["title"], d["text"], p.doc_max_chars)
            for t in p.templates:
                name = TEMPLATES[t]
                msgs = render_messages(self._texts[name], document=fence(text, "DOCUMENT"))
                items.append((d["doc_id"], msgs))
                meta.append((t, name, d))
        results = self._ask(items, p.max_tokens)
        cands = [
            {
                "kind": t,
                "template": name,
                "source_doc_id": d["doc_id"],
                "parent_query_id": None,
                "res": res,
                "doc": d,
            }
            for (t, name, d), res in zip(meta, results, strict=True)
        ]
        return self._filter_and_write(unit, cands, counters)

    def _filter_and_write(
        self, unit: WorkUnit, cands: list[dict[str, Any]], counters: Counters
    ) -> UnitOutput:
        p = self.params
        model = self._endpoint.model
        lineage: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []

        def record(c: dict[str, Any], status: str, detail: Any = None) -> None:
            res = c["res"]
            lineage.append(
                {
                    "query_id": c.get("query_id") or f"unparsed-{res.key[:16]}",
                    "text": c.get("text"),
                    "kind": c["kind"],
                    "template": c["template"],
                    "prompt_sha256": self._hashes[c["template"]],
                    "source_doc_id": c["source_doc_id"],
                    "parent_query_id": c["parent_query_id"],
                    "endpoint": p.endpoint,
                    "model": model,
                    "seed": res.seed,
                    "request_key": res.key,
                    "roundtrip_rank": c.get("roundtrip_rank"),
                    "status": status,
                }
            )
            if status != "draft":
                rejects.append(
                    {
                        "table": "lineage",
                        "row_id": c.get("query_id") or res.key,
                        "query_id": c.get("query_id"),
                        "doc_id": c["source_doc_id"],
                        "reason": status,
                        "detail": detail or {"answer": (res.text or "")[:300], "kind": c["kind"]},
                    }
                )

        # 1. answers that give a usable query
        parsed = []
        for c in cands:
            res = c["res"]
            if not res.ok:
                record(c, res.reject_reason or "bad_answer")
                continue
            text = clean_query(res.text)
            c["text"] = text or None
            if not text:
                record(c, "empty_query")
                continue
            c["query_id"] = _query_id(c["kind"], c["source_doc_id"] or c["parent_query_id"], text)
            if len(text.split()) < p.min_query_words:
                record(c, "too_short")
                continue
            if len(text) > p.max_query_chars:
                record(c, "too_long")
                continue
            parsed.append(c)

        # 2. deduplication, within the unit and against the existing queries
        kept_idx, dropped = dedup_queries(
            [c["text"] for c in parsed], p.dedup_threshold, self._existing
        )
        for i, (reason, ref, sim) in dropped.items():
            c = parsed[i]
            record(
                c,
                reason,
                {
                    "duplicate_of": parsed[ref]["query_id"]
                    if ref is not None
                    else "existing query",
                    "similarity": sim,
                    "text": c["text"],
                },
            )
        survivors = [parsed[i] for i in kept_idx]

        # 3. decontamination against the evaluation queries
        if self._eval:
            hits = contaminated([c["text"] for c in survivors], self._eval, p.decontam_threshold)
            clean = []
            for c, hit in zip(survivors, hits, strict=True):
                if hit is None:
                    clean.append(c)
                else:
                    record(
                        c,
                        "contaminated",
                        {
                            "eval_query": self._eval[hit[0]][:300],
                            "similarity": hit[1],
                            "text": c["text"],
                        },
                    )
            survivors = clean

        # 4. round trip: the source document must come back in the top K
        with_source = [c for c in survivors if c["source_doc_id"]]
        if with_source:
            retrieved = self._round_trip().search([c["text"] for c in with_source], p.roundtrip_k)
            for c, ids in zip(with_source, retrieved, strict=True):
                c["roundtrip_rank"] = round_trip_rank(c["source_doc_id"], ids)
        kept = []
        for c in survivors:
            if c["source_doc_id"] and c.get("roundtrip_rank") is None:
                record(
                    c,
                    "roundtrip_miss",
                    {"k": p.roundtrip_k, "text": c["text"], "retriever": p.roundtrip_retriever},
                )
                continue
            kept.append(c)
        counters.extra["written"] = float(len(cands))
        counters.extra["drafted"] = float(len(kept))
        counters.extra["roundtrip_checked"] = counters.extra.get("roundtrip_checked", 0.0) + len(
            with_source
        )
        counters.extra["roundtrip_passed"] = float(sum(1 for c in kept if c["source_doc_id"]))

        # 5. synthetic hard negatives for kept document queries
        negatives: list[dict[str, Any]] = []
        if p.hard_negatives:
            todo = [c for c in kept if c.get("doc")]
            items = []
            for c in todo:
                text, _ = document_text(c["doc"]["title"], c["doc"]["text"], p.doc_max_chars)
                items.append(
                    (
                        c["query_id"],
                        render_messages(
                            self._texts[NEGATIVE_TEMPLATE],
                            query=fence(c["text"], "QUERY"),
                            document=fence(text, "DOCUMENT"),
                        ),
                    )
                )
            for c, res in zip(todo, self._ask(items, p.negative_max_tokens), strict=True):
                body = (res.text or "").strip()
                if not res.ok or not body:
                    rejects.append(
                        {
                            "table": "synthetic_negatives",
                            "row_id": c["query_id"],
                            "query_id": c["query_id"],
                            "doc_id": None,
                            "reason": f"negative_{res.reject_reason or 'empty'}",
                            "detail": {"request_key": res.key},
                        }
                    )
                    continue
                negatives.append(
                    {
                        "query_id": c["query_id"],
                        "doc_id": "synthetic:" + hashlib.sha256(body.encode()).hexdigest()[:16],
                        "text": body,
                        "source_doc_id": c["source_doc_id"],
                        "synthetic": True,
                        "model": model,
                        "request_key": res.key,
                    }
                )

        # Kept so far: the finalize step deduplicates across units and writes them out.
        drafts = []
        for c in kept:
            record(c, "draft")
            drafts.append(lineage.pop())
        counters.rows_out = len(drafts)
        self._gw.fill_counters(counters)
        for rej in rejects:
            counters.reject(rej["reason"])
        return UnitOutput(
            {
                "lineage": pa.Table.from_pylist(lineage, schema=LINEAGE),
                "drafts": pa.Table.from_pylist(drafts, schema=LINEAGE),
                "draft_negatives": pa.Table.from_pylist(negatives, schema=SYNTHETIC_NEGATIVES),
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )

    # -- after every unit -------------------------------------------------------------------------
    def finalize(self, step: StepContext) -> StepOutput:
        """Deduplicate the drafts of all units against each other (each was already checked
        against its own unit and the existing queries), then write the kept ones out."""
        p = self.params
        drafts = step.read_output("drafts")
        rows = drafts.to_pylist() if drafts is not None else []
        kept_idx, dropped = dedup_queries([r["text"] for r in rows], p.dedup_threshold)
        counters = Counters(rows_in=len(rows))
        lineage, rejects = [], []
        for i, (reason, ref, sim) in sorted(dropped.items()):
            r = rows[i]
            lineage.append({**r, "status": reason})
            rejects.append(
                {
                    "table": "lineage",
                    "row_id": r["query_id"],
                    "query_id": r["query_id"],
                    "doc_id": r["source_doc_id"],
                    "reason": reason,
                    "detail": {
                        "duplicate_of": rows[ref]["query_id"] if ref is not None else None,
                        "similarity": sim,
                        "text": r["text"],
                    },
                }
            )
            counters.reject(reason)
        kept = [rows[i] for i in kept_idx]
        lineage.extend({**r, "status": "kept"} for r in kept)
        queries = pa.Table.from_pylist(
            [
                {
                    "query_id": r["query_id"],
                    "text": r["text"],
                    "source": f"synthetic:{r['kind']}",
                    "source_doc_id": r["source_doc_id"],
                }
                for r in kept
            ],
            schema=QUERIES,
        )
        # A keyword rewrite means what its parent means: the parent's judgments carry over.
        qrels_rows = []
        parents: dict[str, list[str]] = {}
        for r in kept:
            if r["parent_query_id"]:
                parents.setdefault(r["parent_query_id"], []).append(r["query_id"])
        if parents and step.has_input("qrels"):
            qr = step.read_input("qrels")
            for q, d, sc in zip(
                qr.column("query_id").to_pylist(),
                qr.column("doc_id").to_pylist(),
                qr.column("score").to_pylist(),
                strict=True,
            ):
                for child in parents.get(q, ()):
                    qrels_rows.append({"query_id": child, "doc_id": d, "score": sc})
        keep_ids = {r["query_id"] for r in kept}
        negs = step.read_output("draft_negatives")
        negatives = (
            negs.filter(pa.array([q in keep_ids for q in negs.column("query_id").to_pylist()]))
            if negs is not None and negs.num_rows
            else SYNTHETIC_NEGATIVES.empty_table()
        )
        counters.rows_out = len(kept)
        counters.extra["kept"] = float(len(kept))
        counters.extra["roundtrip_kept"] = float(sum(1 for r in kept if r["source_doc_id"]))
        return StepOutput(
            tables={
                "queries": queries,
                "qrels": pa.Table.from_pylist(qrels_rows, schema=QRELS),
                "lineage": pa.Table.from_pylist(lineage, schema=LINEAGE),
                "synthetic_negatives": negatives,
                "rejects": rejects_table(rejects, self.ctx.stage_name, "finalize"),
            },
            counters=counters,
        )

    def _output(
        self,
        unit: WorkUnit,
        queries: pa.Table,
        qrels: pa.Table | None,
        lineage: list[dict[str, Any]],
        negatives: list[dict[str, Any]],
        rejects: list[dict[str, Any]],
        counters: Counters,
    ) -> UnitOutput:
        self._gw.fill_counters(counters)
        for rej in rejects:
            counters.reject(rej["reason"])
        return UnitOutput(
            {
                "queries": queries,
                "qrels": qrels.cast(QRELS) if qrels is not None else QRELS.empty_table(),
                "lineage": pa.Table.from_pylist(lineage, schema=LINEAGE),
                "synthetic_negatives": pa.Table.from_pylist(negatives, schema=SYNTHETIC_NEGATIVES),
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )


class RoundTrip:
    """The round-trip filter's retriever over the corpus: BM25, dense or both fused (RRF)."""

    def __init__(self, params: QueriesParams, corpus: pa.Table, cache_dir: str | None):
        from rankmill.retrieval.miner import doc_text

        self.kind = params.roundtrip_retriever
        self.doc_ids = corpus.column("doc_id").to_pylist()
        titles = (
            corpus.column("title").to_pylist()
            if "title" in corpus.column_names
            else [None] * corpus.num_rows
        )
        texts = [
            doc_text(t, x) for t, x in zip(titles, corpus.column("text").to_pylist(), strict=True)
        ]
        self.bm25 = None
        self.dense = None
        if self.kind in ("bm25", "hybrid"):
            from rankmill.retrieval.bm25 import BM25Index

            self.bm25 = BM25Index().build(texts)
        if self.kind in ("dense", "hybrid"):
            from rankmill.retrieval.cache import EmbeddingCache
            from rankmill.retrieval.dense import DenseEncoder
            from rankmill.retrieval.index import DenseIndex

            self.encoder = DenseEncoder(params.dense_model)
            emb, _ = EmbeddingCache(cache_dir).get_or_compute(
                texts, self.encoder.cache_key("document"), self.encoder.encode_documents
            )
            self.dense = DenseIndex().build(emb)

    def search(self, queries: list[str], k: int) -> list[list[str]]:
        """The top ``k`` document ids per query."""
        runs: list[dict[str, list[str]]] = [{} for _ in queries]
        if self.bm25 is not None:
            _, ids = self.bm25.search(queries, k)
            for i, row in enumerate(ids):
                runs[i]["bm25"] = [self.doc_ids[j] for j in row if j >= 0]
        if self.dense is not None:
            _, ids = self.dense.search(self.encoder.encode_queries(queries), k)
            for i, row in enumerate(ids):
                runs[i]["dense"] = [self.doc_ids[j] for j in row if j >= 0]
        if self.kind != "hybrid":
            return [next(iter(r.values())) for r in runs]
        from rankmill.retrieval.fusion import rrf

        return [[str(d) for d in rrf(r)[0][:k]] for r in runs]
