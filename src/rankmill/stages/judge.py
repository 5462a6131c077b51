"""The ``judge`` stage: an ensemble of judges votes on (query, document) pairs, stops asking
once a pair is settled, aggregates the votes (Dawid–Skene by default) and relabels mined pairs.

Judges are listed cheapest first. An **LLM judge** is an endpoint, a prompt and a number of
self-consistency samples (temperature > 0, a seed per sample); it answers a yes/no verdict,
with P(yes) from logprobs when the server sends them. A **model judge** is the bi-encoder
(cosine of all-MiniLM-L6-v2 by default) or a cross-encoder, with a threshold: cheap votes that
go first. A pipeline snippet::

    stages:
      judge:
        judges:
          - {name: minilm, kind: bi_encoder, threshold: 0.5}
          - {name: small, endpoint: local, samples: 3, temperature: 0.8}
          - {name: small_strict, endpoint: local, prompt: judge_strict, samples: 3}
        calibration_pairs: 64       # every judge labels these fully; accuracies fitted on them
        confidence: 0.99            # later pairs stop once more votes would change nothing
                                    # with this probability

How it runs, with the stage contract's phases:

- ``prepare``: the documents the pairs name, once, as an Arrow file every actor memory-maps
  (the driver plans from document ids; a unit names its documents, :mod:`rankmill.docstore`);
- phase 0: a seeded calibration slice of pairs that every judge labels fully;
- ``aggregate(0)``: Dawid–Skene on the calibration votes gives each judge's sensitivity and
  specificity, and its samples' agreement gives its consistency (table ``calibration``);
- phase 1: the other pairs, asked adaptively (:func:`rankmill.ensemble.stop_reason`), round
  by round cheapest judge first: a judge stops sampling once its majority is fixed, a pair once
  its outcome cannot change with the votes left, or once the remaining votes would leave its
  label unchanged with probability ``confidence``, or at ``max_votes`` (never before
  ``min_votes`` calls);
- ``finalize``: every vote aggregated (``method``), then ``judgments`` (hard and soft label,
  votes, self-consistency, agreement per pair), ``relabels`` (every role change with its
  reason and posterior), ``judge_report`` (estimated accuracy and confusion per judge, and the
  warnings), ``agreement`` (Cohen's κ per judge pair), and — when the input had mined
  negatives — relabeled ``negatives`` that later stages read instead of ``mine``'s. Judges
  that agree less than ``min_kappa`` (Fleiss' κ) change no role and reject no pair: what they
  would have changed goes to ``relabels`` as ``held:<reason>``.

Every LLM call goes through the gateway (journaled: a re-run never pays twice). A bad answer
is a ``votes`` row with a null verdict and its reason, and counts as no vote.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rankmill.config import StageParams
from rankmill.docstore import DOCS_FILE, DocStore, prepare_docs
from rankmill.manifest import Counters
from rankmill.schemas import (
    AGREEMENT,
    CANDIDATES,
    CONSENSUS,
    CORPUS,
    JUDGE_REPORT,
    JUDGMENTS,
    NEGATIVES,
    QRELS,
    QUERIES,
    RELABELS,
    VOTES,
)
from rankmill.stage import (
    Stage,
    StepContext,
    StepOutput,
    UnitOutput,
    WorkUnit,
    load_prompt,
    rejects_table,
    table_key,
)
from rankmill.stages.label import (
    _response_format,
    document_text,
    label_messages,
    p_yes_from_logprobs,
    parse_verdict,
)

if TYPE_CHECKING:
    from rankmill.ensemble import JudgeModel, JudgeSpec

log = logging.getLogger(__name__)

PAIRS = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("role", pa.string()),  # positive, negative or candidate
        pa.field("query_text", pa.string()),
        pa.field("doc_title", pa.string()),
        pa.field("doc_text", pa.string()),
    ]
)


class JudgeConfig(BaseModel):
    """One judge of the ensemble."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="The judge's name in votes and reports (unique).")
    kind: Literal["llm", "bi_encoder", "cross_encoder"] = Field(
        "llm", description="An LLM endpoint, or a model scorer with a threshold."
    )
    endpoint: str | None = Field(None, description="LLM judges: the endpoint to ask.")
    prompt: str = Field(
        "label",
        description="LLM judges: prompt template prompts/<prompt>.j2 (variables query, "
        'document, answer_format); its answer is {"relevant": true|false}.',
    )
    samples: int = Field(1, ge=1, le=32, description="Self-consistency samples per pair.")
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, description="LLM judges: sampling temperature (> 0 to sample)."
    )
    seed: int | None = Field(
        None,
        description="LLM judges: a seed base of this judge's own (two judges on one endpoint "
        "and prompt then sample differently); None: derived from the run seed.",
    )
    max_tokens: int = Field(48, ge=1, le=512, description="LLM judges: answer token limit.")
    answer_format: Literal["json", "word"] = Field(
        "json",
        description="LLM judges: 'json' ({\"relevant\": true|false}, constrained) or 'word' "
        "(one word yes/no, for endpoints without JSON mode).",
    )
    logprobs: bool = Field(True, description="LLM judges: ask for logprobs (P(yes)).")
    top_logprobs: int = Field(10, ge=1, le=20, description="Alternatives P(yes) sums over.")
    response_format: Literal["json_object_schema", "json_schema", "json_object", "none"] = Field(
        "json_object_schema", description="How the JSON verdict is constrained (see label)."
    )
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Model judges: the bi-encoder or cross-encoder (name or path).",
    )
    threshold: float = Field(
        0.5, description="Model judges: a score at least this is a 'relevant' vote."
    )

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.kind == "llm" and not self.endpoint:
            raise ValueError(f"judge {self.name!r}: an LLM judge needs an endpoint")
        if self.kind != "llm" and self.samples != 1:
            raise ValueError(f"judge {self.name!r}: a model judge is deterministic (samples: 1)")
        return self


class JudgeParams(StageParams):
    """Params of the ``judge`` stage."""

    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {"rows_per_unit"}

    judges: list[JudgeConfig] = Field(
        ..., min_length=1, description="The judges, cheapest first (asking order)."
    )
    calibration_pairs: int = Field(
        64,
        ge=0,
        description="Pairs every judge labels fully (a seeded choice); judge accuracies are "
        "fitted on them. 0: no calibration, later pairs stop on the plain majority only.",
    )
    confidence: float = Field(
        0.99,
        gt=0.5,
        le=1.0,
        description="Stop a pair once, under the judge model fitted on the calibration slice, "
        "asking every remaining sample of every judge would leave its label unchanged with at "
        "least this probability.",
    )
    max_votes: int | None = Field(None, ge=1, description="Cap on calls per pair (None: none).")
    min_votes: int = Field(
        1,
        ge=1,
        description="Calls asked of every pair before it may stop (cheapest judges first): a "
        "pair is never labelled by the calibration prior alone.",
    )
    adaptive: bool = Field(
        True, description="Stop early after calibration; false asks every judge every sample."
    )
    method: Literal[
        "majority_vote", "wawa", "dawid_skene", "one_coin_dawid_skene", "glad", "mace"
    ] = Field("dawid_skene", description="How votes become labels (crowd-kit).")
    negatives_relevant: Literal["positive", "drop"] = Field(
        "positive",
        description="A mined negative the ensemble calls relevant becomes a positive (RLHN "
        "found this best) or is dropped.",
    )
    min_confidence: float | None = Field(
        None, ge=0.5, le=1.0, description="Reject pairs whose leading posterior is below this."
    )
    min_kappa: float | None = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="Change roles only when the judges agree beyond chance: Fleiss' kappa over "
        "every judge vote at least this (0.2: 'fair' agreement). Below it the ensemble is not "
        "trusted: every pair keeps its role and no pair is rejected, and each change it would "
        "have made is a relabels row with reason 'held:<reason>'. None: always relabel.",
    )
    min_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Reject pairs whose judges agree less than this."
    )
    pairs_from: Literal["auto", "negatives", "candidates", "qrels"] = Field(
        "auto",
        description="'auto': mined negatives and their positives when wired in, else "
        "candidates, else judged pairs.",
    )
    max_docs_per_query: int = Field(20, ge=1, description="Candidates: the top this many.")
    max_queries: int | None = Field(
        None,
        ge=1,
        description="Judge the pairs of only this many queries (the first by query_id); the "
        "others pass through unjudged. None: all.",
    )
    doc_max_chars: int = Field(2000, ge=64, description="Cut documents to this many characters.")
    query_max_chars: int = Field(1000, ge=16, description="Cut queries to this many characters.")
    rows_per_unit: int = Field(64, ge=1, description="Pairs per work unit.")

    @model_validator(mode="after")
    def _unique(self) -> JudgeParams:
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique (got {names})")
        return self


class JudgeStage(Stage):
    """An ensemble of judges with adaptive stopping; see the module docstring."""

    name = "judge"
    version = "2"  # documents by reference (the prepare step's docs file)
    Params = JudgeParams
    inputs: ClassVar[dict[str, pa.Schema]] = {"corpus": CORPUS, "queries": QUERIES}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {
        "negatives": NEGATIVES,
        "candidates": CANDIDATES,
        "qrels": QRELS,
        "consensus": CONSENSUS,
    }
    outputs: ClassVar[dict[str, pa.Schema]] = {
        "votes": VOTES,
        "judgments": JUDGMENTS,
        "relabels": RELABELS,
        "judge_report": JUDGE_REPORT,
        "agreement": AGREEMENT,
        "negatives": NEGATIVES,
    }
    aggregate_after: ClassVar[tuple[int, ...]] = (0,)

    params: JudgeParams

    def prompt_texts(self) -> dict[str, str]:
        names = sorted({j.prompt for j in self.params.judges if j.kind == "llm"})
        return {n: load_prompt(n) for n in names}

    def endpoints_used(self) -> list[str]:
        out: list[str] = []
        for j in self.params.judges:
            if j.kind == "llm" and j.endpoint and j.endpoint not in out:
                out.append(j.endpoint)
        return out

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        return {
            "corpus": ["doc_id"],  # the texts reach the workers through the prepare step
            "queries": ["query_id", "text"],
            "negatives": ["query_id", "positive_ids", "negative_ids"],
            "candidates": ["query_id", "doc_ids", "positive_ids"],
            "qrels": None,
        }

    def specs(self) -> list[JudgeSpec]:
        from rankmill.ensemble import JudgeSpec

        return [JudgeSpec(j.name, j.samples, j.kind == "llm") for j in self.params.judges]

    # -- planning (driver) ----------------------------------------------------------------------
    def _pairs(self, inputs: dict[str, pa.Table]) -> list[dict[str, Any]]:
        p = self.params
        return build_judge_pairs(
            inputs["corpus"],
            inputs["queries"],
            negatives=inputs.get("negatives"),
            candidates=inputs.get("candidates"),
            qrels=inputs.get("qrels"),
            pairs_from=p.pairs_from,
            max_docs_per_query=p.max_docs_per_query,
            max_queries=p.max_queries,
        )

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        p = self.params
        rows = self._pairs(inputs)

        # The calibration slice: a seeded choice spread over the pairs (not the first queries).
        def rank(r: dict[str, Any]) -> str:
            key = f"{self.ctx.seed}:{r['query_id']}:{r['doc_id']}"
            return hashlib.sha256(key.encode()).hexdigest()

        order = sorted(range(len(rows)), key=lambda i: rank(rows[i]))
        cal = set(order[: p.calibration_pairs])
        units: list[WorkUnit] = []
        for phase, idx in ((0, sorted(cal)), (1, [i for i in range(len(rows)) if i not in cal])):
            for k, start in enumerate(range(0, len(idx), p.rows_per_unit)):
                part = pa.Table.from_pylist(
                    [rows[i] for i in idx[start : start + p.rows_per_unit]], schema=PAIRS
                )
                units.append(
                    WorkUnit(
                        unit_id=f"p{phase}-{k:05d}",
                        key=table_key(part),
                        tables={"pairs": part},
                        phase=phase,
                    )
                )
        log.info(
            "judge %s: %d pairs, %d in the calibration slice",
            self.ctx.stage_name,
            len(rows),
            len(cal),
        )
        return units

    def prepare(self, step: StepContext) -> StepOutput:
        """The documents the stage's pairs name (found as ``plan`` finds them), once, as the
        Arrow file every actor memory-maps (:mod:`rankmill.docstore`)."""
        wanted = self.plan_inputs() or {}
        return prepare_docs(step, wanted, lambda i: [r["doc_id"] for r in self._pairs(i)])

    # -- on a Ray actor --------------------------------------------------------------------------
    def setup(self) -> None:
        from rankmill.llm import Gateway

        self._docs = DocStore(lambda: self.step_file("prepare", DOCS_FILE))
        self._loop = asyncio.new_event_loop()
        self._gws: dict[str, Any] = {}
        self._scorers: dict[str, Any] = {}
        self._templates: dict[str, str] = {}
        self._model: JudgeModel | None = None
        self._model_loaded = False
        for j in self.params.judges:
            if j.kind == "llm":
                assert j.endpoint is not None
                if j.endpoint not in self._gws:
                    self._gws[j.endpoint] = Gateway.from_context(self.ctx, j.endpoint)
                self._templates[j.name] = self.prompt_text(j.prompt)
            elif j.kind == "bi_encoder":
                from rankmill.retrieval.dense import DenseEncoder

                self._scorers[j.name] = DenseEncoder(j.model)
            else:
                from rankmill.retrieval.rescore import CrossEncoderScorer

                self._scorers[j.name] = CrossEncoderScorer(j.model)

    def teardown(self) -> None:
        loop = getattr(self, "_loop", None)
        for gw in getattr(self, "_gws", {}).values():
            if loop is not None and not loop.is_closed():
                loop.run_until_complete(gw.aclose())
            else:
                gw.close()
        if loop is not None and not loop.is_closed():
            loop.close()

    def _judge_model(self) -> JudgeModel | None:
        from rankmill.ensemble import JudgeModel
        from rankmill.errors import StageError

        if not self._model_loaded:
            self._model_loaded = True
            try:
                rows = self.step_table("aggregate-0", "calibration").to_pylist()
            except StageError:
                rows = []
            self._model = JudgeModel.from_rows(rows) if rows else None
        return self._model

    def process(self, unit: WorkUnit) -> UnitOutput:
        from rankmill.ensemble import StopRule, ask_adaptively, full_calls, task_id

        p = self.params
        for gw in self._gws.values():
            gw.take_counters()  # usage of a unit that raised belongs to no committed unit
        rows = unit.tables["pairs"].to_pylist()
        self._docs.fill(rows)  # documents by reference: from the prepare step's file
        counters = Counters(rows_in=len(rows))
        rejects: list[dict[str, Any]] = []
        pairs: dict[str, dict[str, Any]] = {}
        for r in rows:
            reason = None
            if r["query_text"] is None:
                reason = "unknown_query_id"
            elif r["doc_text"] is None:
                reason = "unknown_doc_id"
            if reason is not None:
                rejects.append(
                    {
                        "table": "pairs",
                        "row_id": f"{r['query_id']}|{r['doc_id']}",
                        "query_id": r["query_id"],
                        "doc_id": r["doc_id"],
                        "reason": reason,
                    }
                )
                continue
            doc, _ = document_text(r["doc_title"], r["doc_text"], p.doc_max_chars)
            pairs[task_id(r["query_id"], r["doc_id"])] = {
                **r,
                "query": r["query_text"][: p.query_max_chars],
                "doc": doc,
            }

        calibrating = unit.phase == 0 or not p.adaptive
        model = None if calibrating else self._judge_model()
        rule = StopRule(
            confidence=p.confidence, max_votes=p.max_votes, full=calibrating, min_votes=p.min_votes
        )
        vote_rows: list[dict[str, Any]] = []

        def answer(calls: list[tuple[str, str, int]]) -> list[bool | None]:
            out = self._ask(calls, pairs, unit.phase)
            vote_rows.extend(out)
            return [v["verdict"] for v in out]

        states, reasons = ask_adaptively(sorted(pairs), self.specs(), answer, rule, model)
        for v in vote_rows:
            t = task_id(v["query_id"], v["doc_id"])
            v["stop_reason"] = reasons.get(t)
            v["role"] = pairs[t]["role"]
        specs = self.specs()
        full_llm = full_calls(specs, llm_only=True) * len(pairs)
        asked_llm = sum(s.llm_calls() for s in states.values())
        counters.extra["votes"] = float(len(vote_rows))
        counters.extra["llm_calls_full"] = float(full_llm)
        counters.extra["calls_saved"] = float(full_llm - asked_llm)
        for why in reasons.values():
            counters.extra[f"stop:{why}"] = counters.extra.get(f"stop:{why}", 0.0) + 1
        bad = sum(1 for v in vote_rows if v["verdict"] is None)
        if bad:
            counters.extra["bad_answers"] = float(bad)
        for gw in self._gws.values():
            gw.fill_counters(counters)
        counters.rows_out = len(vote_rows)
        return UnitOutput(
            {
                "votes": pa.Table.from_pylist(vote_rows, schema=VOTES),
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )

    def _ask(
        self, calls: list[tuple[str, str, int]], pairs: dict[str, dict[str, Any]], phase: int
    ) -> list[dict[str, Any]]:
        """One round of calls: model judges scored in a batch, LLM judges' requests sent
        together per endpoint."""
        from rankmill.llm import ChatRequest, derive_seed

        cfg = {j.name: j for j in self.params.judges}
        out: list[dict[str, Any] | None] = [None] * len(calls)
        by_endpoint: dict[str, list[tuple[int, Any]]] = {}
        by_scorer: dict[str, list[int]] = {}
        for i, (t, jname, s) in enumerate(calls):
            j = cfg[jname]
            if j.kind != "llm":
                by_scorer.setdefault(jname, []).append(i)
                continue
            pr = pairs[t]
            params: dict[str, Any] = {
                "temperature": j.temperature,
                "max_tokens": j.max_tokens,
            }
            if j.logprobs:
                params["logprobs"] = True
                params["top_logprobs"] = j.top_logprobs
            if j.answer_format == "json" and j.response_format != "none":
                params["response_format"] = _response_format(j.response_format)
            if j.seed is not None:
                params["seed"] = derive_seed(j.seed, j.name, s)
            msgs = label_messages(self._templates[jname], pr["query"], pr["doc"], j.answer_format)
            assert j.endpoint is not None
            by_endpoint.setdefault(j.endpoint, []).append(
                (i, ChatRequest(messages=msgs, sample_index=s, params=params, resample_bad=0))
            )
        for jname, idx in by_scorer.items():
            j = cfg[jname]
            scores = self._score(jname, [pairs[calls[i][0]] for i in idx])
            for i, sc in zip(idx, scores, strict=True):
                t, _, s = calls[i]
                out[i] = self._vote_row(pairs[t], j, s, phase, verdict=bool(sc >= j.threshold))
                out[i]["score"] = float(sc)
        if by_endpoint:

            async def send() -> list[list[Any]]:
                return await asyncio.gather(
                    *[self._gws[ep].chat_many([r for _, r in items]) for ep, items in
                      by_endpoint.items()]
                )  # fmt: skip

            results = self._loop.run_until_complete(send())
            for (_, items), res_list in zip(by_endpoint.items(), results, strict=True):
                for (i, _), res in zip(items, res_list, strict=True):
                    t, jname, s = calls[i]
                    j = cfg[jname]
                    if res.ok:
                        verdict, why = parse_verdict(res.text, j.answer_format)
                    else:
                        verdict, why = None, res.reject_reason or "bad_answer"
                    row = self._vote_row(pairs[t], j, s, phase, verdict=verdict)
                    row.update(
                        p_yes=p_yes_from_logprobs(res.logprobs) if j.logprobs else None,
                        reason=why or None,
                        seed=res.seed,
                        request_key=res.key,
                        cached=bool(res.cached),
                        prompt_tokens=res.prompt_tokens,
                        completion_tokens=res.completion_tokens,
                        cost_usd=res.cost_usd,
                        answer=(res.text or "")[:300],
                        model=res.model or self.ctx.endpoint(j.endpoint or "").model,
                    )
                    out[i] = row
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]

    def _score(self, jname: str, prs: list[dict[str, Any]]) -> list[float]:
        import numpy as np

        scorer = self._scorers[jname]
        if hasattr(scorer, "encode_queries"):
            q = scorer.encode_queries([pr["query"] for pr in prs])
            d = scorer.encode_documents([pr["doc"] for pr in prs])
            return [float(x) for x in np.sum(q * d, axis=1)]
        return [float(scorer.score(pr["query"], [pr["doc"]])[0]) for pr in prs]

    def _vote_row(
        self, pr: dict[str, Any], j: JudgeConfig, s: int, phase: int, verdict: bool | None
    ) -> dict[str, Any]:
        return {
            "query_id": pr["query_id"],
            "doc_id": pr["doc_id"],
            "judge": j.name,
            "kind": j.kind,
            "sample_index": s,
            "verdict": verdict,
            "p_yes": None,
            "score": None,
            "reason": None,
            "phase": phase,
            "endpoint": j.endpoint,
            "model": j.model if j.kind != "llm" else None,
            "prompt": j.prompt if j.kind == "llm" else None,
            "seed": None,
            "request_key": None,
            "cached": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
            "answer": None,
        }

    # -- stage-wide steps ------------------------------------------------------------------------
    def aggregate(self, phase: int, step: StepContext) -> StepOutput:
        """Fit each judge's sensitivity and specificity on the calibration slice."""
        from rankmill.ensemble import JudgeModel, aggregate, task_id

        votes = step.read_output("votes", phases=[0])
        counters = Counters()
        rows: list[dict[str, Any]] = []
        if votes is not None and votes.num_rows:
            v = votes.to_pylist()
            data = [
                {"task": task_id(r["query_id"], r["doc_id"]), "judge": r["judge"],
                 "verdict": r["verdict"]}
                for r in v
            ]  # fmt: skip
            agg = aggregate(data, "dawid_skene")
            model = JudgeModel.from_aggregate(agg, votes=data)
            rows = model.rows()
            for r in rows:
                acc = (
                    agg.judges.loc[r["judge"], "accuracy"]
                    if r["judge"] in agg.judges.index
                    else None
                )
                r["accuracy"] = None if acc is None else float(acc)
            counters.extra["calibration_pairs"] = float(len({d["task"] for d in data}))
        schema = pa.schema(
            [
                pa.field("judge", pa.string()),
                pa.field("sensitivity", pa.float64()),
                pa.field("specificity", pa.float64()),
                pa.field("prior", pa.float64()),
                pa.field("consistency", pa.float64()),
                pa.field("accuracy", pa.float64()),
            ]
        )
        return StepOutput(tables={"calibration": pa.Table.from_pylist(rows, schema=schema)},
                          counters=counters)  # fmt: skip

    def finalize(self, step: StepContext) -> StepOutput:
        """Aggregate every vote; write judgments, relabels, the report and the negatives."""
        import pandas as pd

        from rankmill.ensemble import (
            aggregate,
            cohen_kappas,
            fleiss_kappa,
            judge_warnings,
            krippendorff_alpha,
            relabel,
            task_id,
        )

        p = self.params
        counters = Counters()
        votes = step.read_output("votes")
        vrows = votes.to_pylist() if votes is not None else []
        data = pd.DataFrame(
            [
                {"task": task_id(r["query_id"], r["doc_id"]), "judge": r["judge"],
                 "sample": r["sample_index"], "verdict": r["verdict"]}
                for r in vrows
            ]
        )  # fmt: skip
        info: dict[str, dict[str, Any]] = {}
        for r in vrows:
            t = task_id(r["query_id"], r["doc_id"])
            d = info.setdefault(
                t,
                {"query_id": r["query_id"], "doc_id": r["doc_id"], "role": r["role"],
                 "stop_reason": r["stop_reason"], "llm_calls": 0, "phase": r["phase"]},
            )  # fmt: skip
            if r["kind"] == "llm":
                d["llm_calls"] += 1
        teacher: dict[str, tuple[bool, float | None]] = {}
        if step.has_input("consensus"):
            for r in step.read_input("consensus").to_pylist():
                sc = r.get("score")
                if sc is None:
                    sc = r.get("p_yes")
                teacher[task_id(r["query_id"], r["doc_id"])] = (bool(r["verdict"]), sc)
        agg = aggregate(data, p.method) if len(data) else None
        pairs_in = []
        for t, d in sorted(info.items()):
            row = dict(d)
            if agg is not None and t in agg.pairs.index:
                a = agg.pairs.loc[t]
                row.update(
                    label=None if pd.isna(a["label"]) else int(a["label"]),
                    posterior=_f(a["posterior"]),
                    confidence=_f(a["confidence"]),
                    agreement=_f(a["agreement"]),
                    votes=int(a["votes"]),
                    judges=int(a["judges"]),
                    self_consistency=_f(a["self_consistency"]),
                    difficulty=_f(a["difficulty"]),
                )
            if t in teacher:
                row["teacher_verdict"], row["teacher_score"] = teacher[t]
            pairs_in.append(row)
        fk = fleiss_kappa(data) if len(data) else float("nan")
        held = p.min_kappa is not None and math.isfinite(fk) and fk < p.min_kappa
        if held:
            # The judges agree no better than chance: their labels are kept as judgments, but
            # nothing changes because of them; each change they would have made is recorded.
            log.warning(
                "judge %s: the judges agree no better than chance (Fleiss' kappa %.2f < "
                "min_kappa %.2f): every pair keeps its role; see relabels for what the "
                "ensemble would have changed",
                self.ctx.stage_name,
                fk,
                p.min_kappa,
            )
            counters.extra["relabeling_held"] = 1.0
        decisions = {
            task_id(x.query_id, x.doc_id): x
            for x in relabel(
                pairs_in, p.negatives_relevant, p.min_confidence, p.min_agreement, hold=held
            )
        }
        judgments, relabels, rejects = [], [], []
        for row in pairs_in:
            t = task_id(row["query_id"], row["doc_id"])
            dec = decisions[t]
            label = row.get("label")
            judgments.append(
                {
                    "query_id": row["query_id"],
                    "doc_id": row["doc_id"],
                    "role": row["role"],
                    "new_role": dec.new_role,
                    "label": None if label is None else bool(label),
                    "posterior": row.get("posterior"),
                    "soft_label": row.get("posterior"),
                    "confidence": row.get("confidence"),
                    "method": p.method,
                    "votes": row.get("votes", 0),
                    "judges": row.get("judges", 0),
                    "llm_calls": row["llm_calls"],
                    "self_consistency": row.get("self_consistency"),
                    "agreement": row.get("agreement"),
                    "difficulty": row.get("difficulty"),
                    "stop_reason": row["stop_reason"],
                    "calibration": row["phase"] == 0,
                    "teacher_score": dec.teacher_score,
                    "status": "rejected" if dec.rejected else "kept",
                    "reason": dec.reason,
                }
            )
            if dec.rejected:
                rejects.append(
                    {
                        "table": "pairs",
                        "row_id": f"{row['query_id']}|{row['doc_id']}",
                        "query_id": row["query_id"],
                        "doc_id": row["doc_id"],
                        "reason": dec.reason,
                        "detail": {
                            "posterior": row.get("posterior"),
                            "agreement": row.get("agreement"),
                        },
                    }
                )
            changes = []
            if dec.new_role != dec.role and not dec.rejected:
                changes.append((dec.role, dec.new_role, dec.reason))
            if dec.teacher_dropped:
                changes.append((dec.role, dec.role, "teacher_disagrees"))
            if dec.held:
                changes.append((dec.role, dec.role, f"held:{dec.held}"))
            for from_role, to_role, why in changes:
                relabels.append(
                    {
                        "query_id": row["query_id"],
                        "doc_id": row["doc_id"],
                        "from_role": from_role,
                        "to_role": to_role,
                        "relevant": None if row.get("label") is None else bool(row["label"]),
                        "reason": why,
                        "posterior": row.get("posterior"),
                        "teacher_score": row.get("teacher_score"),
                    }
                )
                counters.extra[f"relabel:{why}"] = counters.extra.get(f"relabel:{why}", 0.0) + 1

        # Judges: estimated accuracy and confusion, self-consistency, warnings; agreement.
        kappas = cohen_kappas(data) if len(data) else pd.DataFrame()
        report = []
        warns = judge_warnings(kappas, agg.judges) if agg is not None and len(kappas) else []
        if agg is not None:
            from rankmill.ensemble import judge_votes

            jv = judge_votes(data)
            multi = jv[jv["samples"] > 1].groupby("worker")["consistency"].mean()
            for j in p.judges:
                r = agg.judges.loc[j.name] if j.name in agg.judges.index else None
                mine = [w["message"] for w in warns if j.name in w["judges"]]
                report.append(
                    {
                        "judge": j.name,
                        "kind": j.kind,
                        "method": p.method,
                        "n": 0 if r is None else int(r["n"]),
                        "accuracy": None if r is None else _f(r["accuracy"]),
                        "sensitivity": None if r is None else _f(r["sensitivity"]),
                        "specificity": None if r is None else _f(r["specificity"]),
                        "tp": None if r is None else _f(r["tp"]),
                        "fp": None if r is None else _f(r["fp"]),
                        "fn": None if r is None else _f(r["fn"]),
                        "tn": None if r is None else _f(r["tn"]),
                        "calls": int(sum(1 for v in vrows if v["judge"] == j.name)),
                        "self_consistency": _f(multi.get(j.name)),
                        "warnings": mine,
                    }
                )
        for w in warns:
            log.warning("judge %s: %s", self.ctx.stage_name, w["message"])
        counters.extra["warnings"] = float(len(warns))
        ka = krippendorff_alpha(data) if len(data) else float("nan")
        if math.isfinite(fk):
            counters.extra["fleiss_kappa"] = round(fk, 4)
        if math.isfinite(ka):
            counters.extra["krippendorff_alpha"] = round(ka, 4)
        agreement = [
            {"judge_a": r.judge_a, "judge_b": r.judge_b, "n": int(r.n),
             "agreement": _f(r.agreement), "kappa": _f(r.kappa)}
            for r in kappas.itertuples()
        ]  # fmt: skip
        agreement.append(
            {"judge_a": "*", "judge_b": "fleiss_kappa", "n": len(info), "agreement": None,
             "kappa": _f(fk)}
        )  # fmt: skip
        agreement.append(
            {"judge_a": "*", "judge_b": "krippendorff_alpha", "n": len(info), "agreement": None,
             "kappa": _f(ka)}
        )  # fmt: skip
        asked = sum(d["llm_calls"] for d in info.values())
        full = len(info) * sum(j.samples for j in p.judges if j.kind == "llm")
        if full:
            counters.extra["calls_saved_share"] = round(1.0 - asked / full, 4)
        mean_agree = [j["agreement"] for j in judgments if j["agreement"] is not None]
        if mean_agree:
            counters.extra["mean_agreement"] = round(sum(mean_agree) / len(mean_agree), 4)
        tables = {
            "judgments": pa.Table.from_pylist(judgments, schema=JUDGMENTS),
            "relabels": pa.Table.from_pylist(relabels, schema=RELABELS),
            "judge_report": pa.Table.from_pylist(report, schema=JUDGE_REPORT),
            "agreement": pa.Table.from_pylist(agreement, schema=AGREEMENT),
            "rejects": rejects_table(rejects, self.ctx.stage_name, "finalize"),
        }
        if step.has_input("negatives"):
            tables["negatives"] = relabeled_negatives(
                step.read_input("negatives"), {t: d for t, d in decisions.items()}
            )
        return StepOutput(tables=tables, counters=counters)


def _f(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def relabeled_negatives(negatives: pa.Table, decisions: dict[str, Any]) -> pa.Table:
    """The mined negatives after relabeling: negatives turned positive join the positives,
    dropped ones leave; pairs no judge saw stay as they were. Scores follow their ids."""
    from rankmill.ensemble import task_id

    out = []
    for r in negatives.to_pylist():
        q = r["query_id"]
        pos = list(r["positive_ids"] or [])
        pos_sc = list(r.get("positive_scores") or [None] * len(pos))
        new_pos, new_pos_sc, new_neg, new_neg_sc, new_rank = [], [], [], [], []
        for d, sc in zip(pos, pos_sc, strict=False):
            dec = decisions.get(task_id(q, d))
            if dec is None or dec.new_role == "positive":
                new_pos.append(d)
                new_pos_sc.append(sc)
        negs = list(r["negative_ids"] or [])
        n_sc = list(r.get("negative_scores") or [None] * len(negs))
        n_rk = list(r.get("negative_ranks") or [None] * len(negs))
        for d, sc, rk in zip(negs, n_sc, n_rk, strict=False):
            dec = decisions.get(task_id(q, d))
            role = "negative" if dec is None else dec.new_role
            if role == "negative":
                new_neg.append(d)
                new_neg_sc.append(sc)
                new_rank.append(rk)
            elif role == "positive":
                new_pos.append(d)
                new_pos_sc.append(sc)
        if not new_pos:
            continue  # no positive left: the query cannot train anything
        out.append(
            {
                **r,
                "positive_ids": new_pos,
                "positive_scores": new_pos_sc,
                "negative_ids": new_neg,
                "negative_scores": new_neg_sc,
                "negative_ranks": new_rank,
            }
        )
    return pa.Table.from_pylist(out, schema=negatives.schema)


def build_judge_pairs(
    corpus: pa.Table,
    queries: pa.Table,
    negatives: pa.Table | None = None,
    candidates: pa.Table | None = None,
    qrels: pa.Table | None = None,
    pairs_from: str = "auto",
    max_docs_per_query: int = 20,
    max_queries: int | None = None,
) -> list[dict[str, Any]]:
    """The pairs to judge with their role, deterministic order, no duplicates; with the
    documents' titles and texts when ``corpus`` has a ``text`` column, else by reference."""
    from rankmill.errors import StageError

    src = pairs_from
    if src == "auto":
        src = (
            "negatives"
            if negatives is not None
            else "candidates"
            if candidates is not None
            else "qrels"
        )
    table = {"negatives": negatives, "candidates": candidates, "qrels": qrels}[src]
    if table is None:
        raise StageError(
            f"judge: pairs_from={pairs_from!r} needs a {src} table; wire one in (run mine, or "
            "ingest judgments) or choose another pairs_from"
        )
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def add(q: str, d: str, role: str) -> None:
        if (q, d) in seen:
            return
        seen.add((q, d))
        out.append({"query_id": q, "doc_id": d, "role": role})

    if src == "negatives":
        for r in sorted(table.to_pylist(), key=lambda x: x["query_id"]):
            for d in r["positive_ids"] or []:
                add(r["query_id"], d, "positive")
            for d in r["negative_ids"] or []:
                add(r["query_id"], d, "negative")
    elif src == "candidates":
        for r in sorted(table.to_pylist(), key=lambda x: x["query_id"]):
            pos = set(r.get("positive_ids") or [])
            for d in (r["doc_ids"] or [])[:max_docs_per_query]:
                add(r["query_id"], d, "positive" if d in pos else "candidate")
    else:
        for r in sorted(table.to_pylist(), key=lambda x: (x["query_id"], x["doc_id"])):
            add(r["query_id"], r["doc_id"], "positive" if r["score"] > 0 else "negative")
    if max_queries is not None:
        keep = set(sorted({r["query_id"] for r in out})[:max_queries])
        out = [r for r in out if r["query_id"] in keep]
    qtext = dict(
        zip(queries.column("query_id").to_pylist(), queries.column("text").to_pylist(), strict=True)
    )
    needed = {r["doc_id"] for r in out}
    docs: dict[str, tuple[str | None, str]] = {}
    if "text" in corpus.column_names:  # else by reference: texts looked up on the workers
        titles = (
            corpus.column("title").to_pylist()
            if "title" in corpus.column_names
            else [None] * corpus.num_rows
        )
        for d, ti, x in zip(corpus.column("doc_id").to_pylist(), titles,
                            corpus.column("text").to_pylist(), strict=True):  # fmt: skip
            if d in needed and d not in docs:
                docs[d] = (ti, x)
    for r in out:
        r["query_text"] = qtext.get(r["query_id"])
        t = docs.get(r["doc_id"])
        r["doc_title"], r["doc_text"] = t if t else (None, None)
    return out
