"""The ``label`` stage: pointwise yes/no relevance verdicts from an LLM, with P(yes) from logprobs.

For every (query, document) pair it asks one endpoint ``samples`` times (distinct sample
indexes, hence distinct seeds) whether the document is relevant, parses the answer strictly,
and writes one ``labels`` row per answer that parsed (:data:`rankmill.schemas.LABELS`). Every
answer that did not parse (truncated, refused, empty, not exactly yes/no) is a ``rejects`` row
with its reason; so is every pair whose query or document is unknown.

Pairs come from ``candidates`` (the top ``max_docs_per_query`` of each pool that ``mine``
wrote) when there are candidates, else from the judged pairs of ``qrels``; ``pairs_from``
chooses explicitly. A pipeline snippet::

    endpoints:
      local: {local: true, model: smollm2-135m}
    stages:
      label:
        endpoint: local
        samples: 2
        max_docs_per_query: 5

The driver plans from document ids alone; the stage's ``prepare`` step writes the documents
the pairs name once (the first row of each doc_id) as an Arrow file that each actor
memory-maps, and a unit names its documents rather than carrying them.

Teacher and judge stages grow from this one: the prompt is a parameter (a ``prompts/<name>.j2``
with ``system``/``user`` blocks that sees ``query``, ``document`` and ``answer_format``), and
``judge`` in each row names the stage, so several label stages form an ensemble.

As a pointwise **teacher**, ``mode`` picks what the model writes:

- ``verdict`` (the default): an immediate yes/no (or JSON) verdict, P(yes) from logprobs;
- ``reasoning`` (Rank1): ``<think>reasoning</think>`` then ``true``/``false``;
- ``score`` (ERank): ``<think>reasoning</think>`` then ``Score: N`` (0-10); the label's score
  is ``N * P(N)`` with ``P(N)`` read from the logprobs of the score's tokens.

A reasoning answer that ends without its conclusion (cut at ``max_tokens`` or wandering) is
repaired as Rank1 does: the reasoning is cut back to its last full sentence and sent back as
the assistant's turn, with a user turn (``prompts/label_conclude.j2``) asking for the
conclusion, which a JSON schema forces (``verdict_repairs`` counts them; the row's
``repaired`` says which). Reasoning goes to the ``reasoning`` table and the verdict or score
to ``labels``, so data with and without reasoning can be exported. ``consensus`` holds one
row per pair over its ``samples`` answers: ``majority`` for verdicts, ``closest_to_mean`` for
scores (ERank: the sample whose score is nearest the mean is the one kept)::

    label:
      endpoint: teacher
      mode: score
      samples: 4
      temperature: 0.7
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from rankmill.config import StageParams
from rankmill.docstore import DOCS_FILE, DocStore, prepare_docs
from rankmill.manifest import Counters
from rankmill.pointwise import (
    closest_to_mean,
    cut_to_last_sentence,
    forced_verdict_schema,
    majority,
    parse_conclusion,
    score_probability,
)
from rankmill.prompting import fence, render_messages
from rankmill.schemas import CANDIDATES, CONSENSUS, CORPUS, LABELS, QRELS, QUERIES, REASONING
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

if TYPE_CHECKING:
    from rankmill.llm import ChatResult

log = logging.getLogger(__name__)

# What a unit carries: the pair, where it came from and the query's text. Documents travel by
# reference: the stage's ``prepare`` step writes the documents the pairs name once as an Arrow
# file that every actor memory-maps, so the driver never holds document texts and units stay
# small (a change of a text still re-runs the stage: its fingerprint holds the corpus's
# committed content).
# ``doc_title``/``doc_text`` are filled only by callers of :func:`build_pairs` that pass texts.
PAIRS = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("pair_source", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("qrel_score", pa.int32()),
        pa.field("query_text", pa.string()),
        pa.field("doc_title", pa.string()),
        pa.field("doc_text", pa.string()),
        pa.field("problem", pa.string()),  # a reject reason found while planning, else null
    ]
)

YES_WORDS = frozenset({"yes", "true"})
NO_WORDS = frozenset({"no", "false"})

_WORD_ANSWER = re.compile(r"\s*[\"'*`]*\s*(yes|no)\s*[\"'*`]*\s*[.!]?\s*", re.IGNORECASE)


# -- pure parsing ---------------------------------------------------------------------------------
def parse_verdict(text: str | None, answer_format: str = "word") -> tuple[bool | None, str]:
    """Parse an answer strictly: ``(verdict, "")``, or ``(None, reason)`` when it does not parse.

    ``word``: exactly one word yes/no (case, surrounding whitespace, quotes or emphasis and one
    final period are tolerated; "Yes, because..." is not). ``json``: one JSON object whose
    ``relevant`` is a boolean.
    """
    if text is None or not text.strip():
        return None, "empty_answer"
    if answer_format == "json":
        body = text.strip()
        # Some servers wrap JSON in a Markdown fence even in JSON mode; the object is the answer.
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
        if fenced:
            body = fenced.group(1)
        try:
            obj = json.loads(body)
        except ValueError:
            return None, "unparseable_verdict"
        if not isinstance(obj, dict) or not isinstance(obj.get("relevant"), bool):
            return None, "unparseable_verdict"
        return bool(obj["relevant"]), ""
    m = _WORD_ANSWER.fullmatch(text)
    if not m:
        return None, "unparseable_verdict"
    return m.group(1).lower() == "yes", ""


_NON_LETTERS = re.compile(r"[^a-z]")


@functools.lru_cache(maxsize=65536)
def _norm_token(token: str | None) -> str:
    # Tokens arrive as " Yes", "yes", "YES", "Ġyes" or '"true'; only the letters decide.
    # A vocabulary's few thousand token strings come back again and again: cached.
    return _NON_LETTERS.sub("", (token or "").lower())


def p_yes_from_logprobs(
    logprobs: Sequence[dict[str, Any]] | None,
    yes_words: frozenset[str] = YES_WORDS,
    no_words: frozenset[str] = NO_WORDS,
) -> float | None:
    """P(yes) = P(yes) / (P(yes) + P(no)) at the first answer token that is a yes/no word.

    Tokens of the top-logprob alternatives at that position that normalise (letters only,
    lower case) to a yes word add to P(yes), no words to P(no), each token string once. When the
    server sent no alternatives, the chosen token's own probability stands in (p or 1 - p).
    None when there are no logprobs or no yes/no token among them.
    """
    if not logprobs:
        return None
    for pos in logprobs:
        if not isinstance(pos, dict):
            continue
        word = _norm_token(pos.get("token"))
        if word not in yes_words and word not in no_words:
            continue
        alts = [a for a in (pos.get("top_logprobs") or []) if isinstance(a, dict)]
        seen: dict[str, float] = {}
        for alt in [*alts, pos]:
            tok = alt.get("token")
            lp = alt.get("logprob")
            if tok is None or lp is None or tok in seen:
                continue
            try:
                seen[tok] = float(lp)
            except (TypeError, ValueError):
                continue
        yes = sum(math.exp(lp) for t, lp in seen.items() if _norm_token(t) in yes_words)
        no = sum(math.exp(lp) for t, lp in seen.items() if _norm_token(t) in no_words)
        if not alts:
            own = pos.get("logprob")
            if own is None:
                return None
            p = math.exp(float(own))
            return p if word in yes_words else 1.0 - p
        if yes + no <= 0.0 or not math.isfinite(yes + no):
            return None
        return yes / (yes + no)
    return None


def document_text(title: str | None, text: str, max_chars: int) -> tuple[str, bool]:
    """Title and text as the model sees them, cut to ``max_chars``; (text, was_cut)."""
    full = f"{title.strip()}\n{text}" if title and title.strip() else text
    if len(full) <= max_chars:
        return full, False
    cut = full[:max_chars]
    # Cut at a word boundary when one is near, so the model does not see a broken word.
    space = cut.rfind(" ", int(max_chars * 0.8))
    return (cut[:space] if space > 0 else cut) + " ...", True


def label_messages(
    template: str, query: str, document: str, answer_format: str, fenced: bool = True
) -> list[dict[str, str]]:
    """The chat messages for one pair; query and document are fenced as untrusted text
    (``fenced=False`` exists only to measure what fencing buys: never in a pipeline)."""
    return render_messages(
        template,
        query=fence(query, "QUERY") if fenced else query,
        document=fence(document, "DOCUMENT") if fenced else document,
        answer_format=answer_format,
    )


# -- params ----------------------------------------------------------------------------------
class LabelParams(StageParams):
    """Params of the ``label`` stage."""

    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {"rows_per_unit"}

    endpoint: str = Field(..., description="Name of the LLM endpoint (under endpoints:) to ask.")
    mode: Literal["verdict", "reasoning", "score"] = Field(
        "verdict",
        description="'verdict': an immediate yes/no; 'reasoning' (Rank1): reasoning, then "
        "true/false; 'score' (ERank): reasoning, then an integer 0-10 weighted by its "
        "probability.",
    )
    prompt: str | None = Field(
        None,
        description="Prompt template prompts/<prompt>.j2 (blocks system/user; variables query, "
        "document, answer_format). Default: label, label_reasoning or label_score by mode.",
    )
    consensus: Literal["auto", "majority", "closest_to_mean"] = Field(
        "auto",
        description="How the samples of a pair agree on one label: 'majority' of verdicts, or "
        "ERank's 'closest_to_mean' score; 'auto' = closest_to_mean for scores, else majority.",
    )
    repair_verdicts: bool = Field(
        True,
        description="Repair a reasoning answer without a conclusion: cut it to its last full "
        "sentence and force the verdict or score with a JSON schema (Rank1).",
    )
    score_threshold: int = Field(
        5, ge=0, le=10, description="In score mode, a raw score at least this is verdict true."
    )
    answer_format: Literal["json", "word"] = Field(
        "json",
        description="'json': the answer is {\"relevant\": true|false}, constrained by "
        "response_format (parses reliably even with a 135M model); 'word': one word yes/no "
        "(for strong models, or endpoints without JSON mode).",
    )
    response_format: Literal["json_object_schema", "json_schema", "json_object", "none"] = Field(
        "json_object_schema",
        description="How a json answer is constrained: 'json_object_schema' = {type: "
        "json_object, schema} (llama.cpp server, Anyscale-style); 'json_schema' = OpenAI "
        "structured outputs (OpenAI, vLLM, SGLang, recent Ollama); 'json_object' = any JSON; "
        "'none' = not sent (the prompt alone asks for JSON). Ignored for word answers.",
    )
    samples: int = Field(
        1, ge=1, le=64, description="Answers per pair, each with its own sample index and seed."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling (None: unset).")
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Answer token limit; a longer answer is a 'truncated' reject (repaired "
        "in reasoning and score modes). None: 8 for word answers, 48 for json, 384 with "
        "reasoning.",
    )
    logprobs: bool = Field(
        True, description="Ask for logprobs to compute p_yes (off for endpoints without them)."
    )
    top_logprobs: int = Field(
        10, ge=0, le=20, description="Alternatives per token that P(yes) is normalised over."
    )
    resample_bad_answers: int = Field(
        0,
        ge=0,
        le=8,
        description="After a bad answer (truncated, unparseable...), ask again up to this many "
        "times with a new sample index and seed; only the last failure is a reject.",
    )
    pairs_from: Literal["auto", "candidates", "qrels", "both"] = Field(
        "auto",
        description="Which pairs to label: 'auto' = candidates when a candidates table is wired "
        "in, else qrels; 'both' = candidates plus judged pairs missing from them.",
    )
    max_docs_per_query: int = Field(
        20, ge=1, description="Label only the top this many candidates of each query's pool."
    )
    doc_max_chars: int = Field(
        2000, ge=64, description="Cut documents (title + text) to this many characters."
    )
    query_max_chars: int = Field(1000, ge=16, description="Cut queries to this many characters.")
    rows_per_unit: int = Field(
        64, ge=1, description="Pairs per work unit (the unit of commit and resume)."
    )

    @model_validator(mode="after")
    def _logprob_alternatives(self) -> LabelParams:
        if self.logprobs and self.top_logprobs == 0:
            raise ValueError("top_logprobs must be >= 1 when logprobs is on (P(yes) needs them)")
        return self

    @property
    def template(self) -> str:
        return self.prompt or {"verdict": "label", "reasoning": "label_reasoning"}.get(
            self.mode, "label_score"
        )

    @property
    def consensus_rule(self) -> str:
        if self.consensus != "auto":
            return self.consensus
        return "closest_to_mean" if self.mode == "score" else "majority"


# -- the stage -------------------------------------------------------------------------------
class LabelStage(Stage):
    """Pointwise yes/no relevance verdicts; see the module docstring."""

    name = "label"
    version = "2"  # documents by reference (the prepare step's docs file)
    Params = LabelParams
    # process() only reads what setup() built; units in flight share the actor's gateway, so
    # the endpoint stays busy while a unit waits for its slowest answer.
    max_units_in_flight: ClassVar[int] = 4
    replay_in_driver: ClassVar[bool] = True
    inputs: ClassVar[dict[str, pa.Schema]] = {"corpus": CORPUS, "queries": QUERIES}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {"candidates": CANDIDATES, "qrels": QRELS}
    outputs: ClassVar[dict[str, pa.Schema]] = {
        "labels": LABELS,
        "reasoning": REASONING,
        "consensus": CONSENSUS,
    }
    prompts: ClassVar[tuple[str, ...]] = ("label",)

    params: LabelParams

    def prompt_texts(self) -> dict[str, str]:
        names = [self.params.template]
        if self.params.mode != "verdict" and self.params.repair_verdicts:
            names.append("label_conclude")
        return {name: load_prompt(name) for name in names}

    # -- planning (driver) ----------------------------------------------------------------------
    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        # document ids only: the texts reach the workers through the prepare step's file
        return {
            "corpus": ["doc_id"],
            "queries": ["query_id", "text"],
            "candidates": ["query_id", "doc_ids"],
            "qrels": ["query_id", "doc_id", "score"],
        }

    def _pairs(self, inputs: dict[str, pa.Table]) -> pa.Table:
        return build_pairs(
            corpus=inputs["corpus"],
            queries=inputs["queries"],
            candidates=inputs.get("candidates"),
            qrels=inputs.get("qrels"),
            pairs_from=self.params.pairs_from,
            max_docs_per_query=self.params.max_docs_per_query,
        )

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        pairs = self._pairs(inputs)
        log.info("label %s: %d pairs to label", self.ctx.stage_name, pairs.num_rows)
        return chunk_units(pairs, self.params.rows_per_unit, "pairs")

    # -- stage-wide: the documents every actor maps -----------------------------------------------
    def prepare(self, step: StepContext) -> StepOutput:
        """The documents the stage's pairs name (found as ``plan`` finds them), once, as the
        Arrow file every actor memory-maps (:mod:`rankmill.docstore`)."""
        wanted = self.plan_inputs() or {}
        return prepare_docs(step, wanted, lambda i: self._pairs(i).column("doc_id").to_pylist())

    # -- on a Ray actor --------------------------------------------------------------------------
    def setup(self) -> None:
        from rankmill.llm import Gateway

        self._docs = DocStore(lambda: self.step_file("prepare", DOCS_FILE))
        self._template = self.prompt_text(self.params.template)
        self._conclude = (
            self.prompt_text("label_conclude")
            if self.params.mode != "verdict" and self.params.repair_verdicts
            else None
        )
        self._endpoint = self.ctx.endpoint(self.params.endpoint)
        self._gw = Gateway.from_context(self.ctx, self.params.endpoint)

    def teardown(self) -> None:
        gw = getattr(self, "_gw", None)
        if gw is not None:
            gw.close()

    def request_params(self) -> dict[str, Any]:
        p = self.params
        if p.mode != "verdict":
            max_tokens = p.max_tokens or 384
        else:
            max_tokens = p.max_tokens or (48 if p.answer_format == "json" else 8)
        params: dict[str, Any] = {"temperature": p.temperature, "max_tokens": max_tokens}
        if p.top_p is not None:
            params["top_p"] = p.top_p
        if p.logprobs:
            params["logprobs"] = True
            params["top_logprobs"] = p.top_logprobs
        if p.mode == "verdict" and p.answer_format == "json" and p.response_format != "none":
            params["response_format"] = _response_format(p.response_format)
        return params

    def process(self, unit: WorkUnit) -> UnitOutput:
        from rankmill.llm import ChatRequest

        p = self.params
        rows = unit.tables["pairs"].to_pylist()
        counters = Counters(rows_in=len(rows))
        rejects: list[dict[str, Any]] = []
        # Usage left over from a unit that raised belongs to no committed unit.
        self._gw.take_counters()
        params = self.request_params()

        # Documents by reference: looked up in the prepare step's file (rows that carry their
        # text, from callers of build_pairs that passed texts, keep it).
        self._docs.fill(rows)

        # Pairs that can be asked about, with their messages; the others are rejects now.
        todo: list[tuple[dict[str, Any], list[dict[str, str]]]] = []
        for r in rows:
            reason = r["problem"]
            if reason is None and r["query_text"] is None:
                reason = "unknown_query_id"
            if reason is None and r["doc_text"] is None:
                reason = "unknown_doc_id"
            if reason is not None:
                rejects.append(_reject(r, reason, None, {"samples": p.samples}))
                continue
            doc, cut = document_text(r["doc_title"], r["doc_text"], p.doc_max_chars)
            query = r["query_text"][: p.query_max_chars]
            if cut:
                counters.extra["docs_cut"] = counters.extra.get("docs_cut", 0.0) + 1
            todo.append((r, label_messages(self._template, query, doc, p.answer_format)))

        if p.mode != "verdict":
            return self._process_reasoning(unit, rows, todo, rejects, counters, params)

        # (pair index, sample index) -> the answer that parsed, or the last bad one.
        pending = [(i, s) for i in range(len(todo)) for s in range(p.samples)]
        done: dict[tuple[int, int], tuple[int, ChatResult, bool | None, str]] = {}
        for attempt in range(p.resample_bad_answers + 1):
            if not pending:
                break
            # A resample needs a new seed; the gateway derives it from the sample index, so
            # attempts use indexes past the ones the first round used.
            reqs = [
                ChatRequest(
                    messages=todo[i][1],
                    sample_index=s + attempt * p.samples,
                    params=params,
                    resample_bad=0,  # resampling is decided here, after parsing
                )
                for i, s in pending
            ]
            results = self._gw.chat_many_sync(reqs)
            bad: list[tuple[int, int]] = []
            for (i, s), res in zip(pending, results, strict=True):
                verdict, why = self._judge(res)
                done[(i, s)] = (attempt, res, verdict, why)
                if verdict is None:
                    bad.append((i, s))
            if bad and attempt < p.resample_bad_answers:
                counters.extra["resampled"] = counters.extra.get("resampled", 0.0) + len(bad)
            pending = bad

        labels: list[dict[str, Any]] = []
        for (i, s), (attempt, res, verdict, why) in sorted(done.items()):
            r = todo[i][0]
            if verdict is None:
                detail = {
                    "sample_index": s,
                    "attempt": attempt,
                    "finish_reason": res.finish_reason,
                    "answer": (res.text or "")[:300],
                    "request_key": res.key,
                }
                rejects.append(_reject(r, why, s, detail))
                continue
            p_yes = p_yes_from_logprobs(res.logprobs) if p.logprobs else None
            labels.append(
                {
                    "query_id": r["query_id"],
                    "doc_id": r["doc_id"],
                    "sample_index": s,
                    "verdict": verdict,
                    "p_yes": p_yes,
                    "judge": self.ctx.stage_name,
                    "endpoint": p.endpoint,
                    "model": self._endpoint.model,
                    "prompt": p.template,
                    "seed": res.seed,
                    "attempt": attempt,
                    "request_key": res.key,
                    "cached": bool(res.cached),
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "answer": res.text,
                    "pair_source": r["pair_source"],
                    "rank": r["rank"],
                    "qrel_score": r["qrel_score"],
                }
            )
            if p.logprobs and p_yes is None:
                counters.extra["no_logprobs"] = counters.extra.get("no_logprobs", 0.0) + 1

        return self._finish(unit, labels, [], rejects, counters)

    def _finish(
        self,
        unit: WorkUnit,
        labels: list[dict[str, Any]],
        reasoning: list[dict[str, Any]],
        rejects: list[dict[str, Any]],
        counters: Counters,
    ) -> UnitOutput:
        consensus = consensus_rows(labels, reasoning, self.params.consensus_rule)
        self._gw.fill_counters(counters)
        counters.rows_out = len(labels)
        for rej in rejects:
            counters.reject(rej["reason"])
        return UnitOutput(
            {
                "labels": pa.Table.from_pylist(labels, schema=LABELS),
                "reasoning": pa.Table.from_pylist(reasoning, schema=REASONING),
                "consensus": pa.Table.from_pylist(consensus, schema=CONSENSUS),
                "rejects": rejects_table(rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )

    def _process_reasoning(
        self,
        unit: WorkUnit,
        rows: list[dict[str, Any]],
        todo: list[tuple[dict[str, Any], list[dict[str, str]]]],
        rejects: list[dict[str, Any]],
        counters: Counters,
        params: dict[str, Any],
    ) -> UnitOutput:
        """Reasoning answers (Rank1 verdicts or ERank scores), repaired when they did not
        conclude, then one labels row and one reasoning row per sample."""
        from rankmill.llm import ChatRequest

        p = self.params
        kind = "score" if p.mode == "score" else "verdict"
        pending = [(i, s) for i in range(len(todo)) for s in range(p.samples)]
        reqs = [
            ChatRequest(messages=todo[i][1], sample_index=s, params=params, resample_bad=0)
            for i, s in pending
        ]
        first = self._gw.chat_many_sync(reqs)
        answers: dict[tuple[int, int], dict[str, Any]] = {}
        repairs: list[tuple[tuple[int, int], list[dict[str, str]]]] = []
        for (i, s), res in zip(pending, first, strict=True):
            concl = parse_conclusion(res.text, kind) if res.text else None
            done = concl is not None and (concl.verdict is not None or concl.score is not None)
            answers[(i, s)] = {"res": res, "concl": concl, "repair": None}
            if done and (res.ok or res.reject_reason == "truncated"):
                continue
            repairable = res.ok or (res.reject_reason == "truncated" and res.text)
            if p.repair_verdicts and self._conclude is not None and repairable:
                cut = cut_to_last_sentence(concl.reasoning if concl else (res.text or ""))
                msgs = [
                    *todo[i][1],
                    {"role": "assistant", "content": f"<think>{cut}</think>"},
                    *render_messages(self._conclude, kind=kind),
                ]
                repairs.append(((i, s), msgs))
                answers[(i, s)]["cut"] = cut
        if repairs:
            forced = {
                "temperature": 0.0,
                "max_tokens": 16,
                "response_format": _schema_format(p.response_format, forced_verdict_schema(kind)),
            }
            if p.logprobs:
                forced.update(logprobs=True, top_logprobs=p.top_logprobs)
            results = self._gw.chat_many_sync(
                [
                    ChatRequest(messages=m, sample_index=s, params=forced, resample_bad=0)
                    for (_, s), m in repairs
                ]
            )
            for ((i, s), _), res in zip(repairs, results, strict=True):
                answers[(i, s)]["repair"] = res
            counters.extra["verdict_repairs"] = counters.extra.get("verdict_repairs", 0.0) + len(
                repairs
            )

        labels: list[dict[str, Any]] = []
        reasoning: list[dict[str, Any]] = []
        for (i, s), a in sorted(answers.items()):
            r = todo[i][0]
            res, concl, rep = a["res"], a["concl"], a["repair"]
            verdict, score, logprobs, final = None, None, res.logprobs, res
            text_reasoning = concl.reasoning if concl else ""
            if rep is None and concl is not None and (res.ok or res.reject_reason == "truncated"):
                verdict, score = concl.verdict, concl.score
            elif rep is not None and rep.ok:
                verdict, score = _forced_value(rep.text, kind)
                logprobs, final = rep.logprobs, rep
                text_reasoning = a.get("cut", text_reasoning)
            if verdict is None and score is None:
                why = "no_verdict"
                if rep is not None and not rep.ok:
                    why = rep.reject_reason or why
                elif rep is None and not res.ok:
                    why = res.reject_reason or why
                detail = {
                    "sample_index": s,
                    "finish_reason": res.finish_reason,
                    "answer": (res.text or "")[:300],
                    "request_key": res.key,
                    "repair_request_key": rep.key if rep is not None else None,
                }
                rejects.append(_reject(r, why, s, detail))
                continue
            expected = None
            if kind == "score":
                assert score is not None
                p_s = score_probability(logprobs, score) if p.logprobs else None
                if p.logprobs and p_s is None:
                    counters.extra["no_logprobs"] = counters.extra.get("no_logprobs", 0.0) + 1
                expected = score * p_s if p_s is not None else float(score)
                verdict = score >= p.score_threshold
                p_yes = None
            else:
                p_yes = p_yes_from_logprobs(list(reversed(logprobs or []))) if p.logprobs else None
                p_s = None
            labels.append(
                {
                    "query_id": r["query_id"],
                    "doc_id": r["doc_id"],
                    "sample_index": s,
                    "verdict": bool(verdict),
                    "p_yes": p_yes,
                    "judge": self.ctx.stage_name,
                    "endpoint": p.endpoint,
                    "model": self._endpoint.model,
                    "prompt": p.template,
                    "seed": res.seed,
                    "attempt": 0,
                    "request_key": res.key,
                    "cached": bool(res.cached and (rep is None or rep.cached)),
                    "prompt_tokens": res.prompt_tokens + (rep.prompt_tokens if rep else 0),
                    "completion_tokens": res.completion_tokens
                    + (rep.completion_tokens if rep else 0),
                    "answer": (final.text or "").strip()[-200:]
                    if rep is not None
                    else (concl.conclusion_text if concl else ""),
                    "pair_source": r["pair_source"],
                    "rank": r["rank"],
                    "qrel_score": r["qrel_score"],
                }
            )
            reasoning.append(
                {
                    "query_id": r["query_id"],
                    "doc_id": r["doc_id"],
                    "sample_index": s,
                    "reasoning": text_reasoning,
                    "verdict": bool(verdict),
                    "raw_score": score,
                    "score_probability": p_s,
                    "score": expected,
                    "repaired": rep is not None,
                    "request_key": res.key,
                    "repair_request_key": rep.key if rep is not None else None,
                }
            )
        return self._finish(unit, labels, reasoning, rejects, counters)

    def _judge(self, res: ChatResult) -> tuple[bool | None, str]:
        if not res.ok:
            return None, res.reject_reason or "bad_answer"
        return parse_verdict(res.text, self.params.answer_format)


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"relevant": {"type": "boolean"}},
    "required": ["relevant"],
    "additionalProperties": False,
}


def _response_format(kind: str) -> dict[str, Any]:
    return _schema_format(kind, VERDICT_SCHEMA)


def _schema_format(kind: str, schema: dict[str, Any]) -> dict[str, Any]:
    if kind == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema, "strict": True},
        }
    if kind == "json_object":
        return {"type": "json_object"}
    # "none" still needs a grammar here: a forced conclusion is the point of the repair.
    return {"type": "json_object", "schema": schema}


def _forced_value(text: str | None, kind: str) -> tuple[bool | None, int | None]:
    """The verdict or score of a forced JSON conclusion; (None, None) when it does not parse."""
    if not text:
        return None, None
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    if kind == "score":
        v = obj.get("score")
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10:
            return None, v
        return None, None
    v = obj.get("relevant")
    return (v, None) if isinstance(v, bool) else (None, None)


def consensus_rows(
    labels: list[dict[str, Any]], reasoning: list[dict[str, Any]], rule: str
) -> list[dict[str, Any]]:
    """One row per (query, doc) over its samples: the agreed label and the sample kept."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in labels:
        by_pair.setdefault((row["query_id"], row["doc_id"]), []).append(row)
    why = {(r["query_id"], r["doc_id"], r["sample_index"]): r for r in reasoning}
    out = []
    for (q, d), rows in by_pair.items():
        rows = sorted(rows, key=lambda r: r["sample_index"])
        reasons = [why.get((q, d, r["sample_index"])) for r in rows]
        scores = [x["score"] if x is not None else None for x in reasons]
        if rule == "closest_to_mean" and all(v is not None for v in scores):
            idx, mean = closest_to_mean([float(v) for v in scores])  # type: ignore[arg-type]
            verdict = bool(rows[idx]["verdict"])
            score: float | None = mean
        else:
            verdict = majority([r["verdict"] for r in rows], [r["p_yes"] for r in rows])
            idx = (
                next(i for i, r in enumerate(rows) if r["verdict"] == verdict)
                if any(r["verdict"] == verdict for r in rows)
                else 0
            )
            score = None
        agree = sum(1 for r in rows if r["verdict"] == verdict) / len(rows)
        probs = [r["p_yes"] for r in rows if r["p_yes"] is not None]
        kept = reasons[idx]
        out.append(
            {
                "query_id": q,
                "doc_id": d,
                "rule": rule,
                "verdict": verdict,
                "score": score,
                "p_yes": sum(probs) / len(probs) if probs else None,
                "samples": len(rows),
                "agreement": agree,
                "kept_sample": rows[idx]["sample_index"],
                "reasoning": kept["reasoning"] if kept is not None else None,
                "kept_score": kept["score"] if kept is not None else None,
            }
        )
    return sorted(out, key=lambda r: (r["query_id"], r["doc_id"]))


def _reject(
    row: dict[str, Any], reason: str, sample_index: int | None, detail: dict[str, Any]
) -> dict[str, Any]:
    row_id = f"{row['query_id']}|{row['doc_id']}"
    if sample_index is not None:
        row_id += f"|{sample_index}"
    return {
        "table": row["pair_source"],
        "row_id": row_id,
        "query_id": row["query_id"],
        "doc_id": row["doc_id"],
        "reason": reason,
        "detail": detail,
    }


# -- pair building (driver, pure Arrow/Python) ------------------------------------------------
def build_pairs(
    corpus: pa.Table,
    queries: pa.Table,
    candidates: pa.Table | None,
    qrels: pa.Table | None,
    pairs_from: str = "auto",
    max_docs_per_query: int = 20,
) -> pa.Table:
    """The (query, doc) pairs to label, in a deterministic order: with the documents' titles
    and texts when ``corpus`` has a ``text`` column, else by reference (ids only).

    Candidate pairs keep their pool rank; judged pairs carry their qrel score. A pair that
    appears twice, or names an unknown query or document, stays in the table (with ``problem``
    set, or a null text) so that ``process`` writes it out as a reject rather than dropping it.
    """
    from rankmill.errors import StageError

    use_cands = pairs_from in ("candidates", "both") or (
        pairs_from == "auto" and candidates is not None
    )
    use_qrels = pairs_from in ("qrels", "both") or (pairs_from == "auto" and candidates is None)
    if use_cands and candidates is None:
        raise StageError(
            f"label: pairs_from={pairs_from!r} needs a candidates table; run mine before label, "
            "or set pairs_from: qrels"
        )
    if use_qrels and qrels is None:
        raise StageError(
            "label: no pairs to label: wire in candidates (run mine first) or qrels "
            "(ingest judged pairs), or set inputs.candidates / inputs.qrels"
        )

    qrel_scores: dict[tuple[str, str], int] = {}
    if qrels is not None:
        for q, d, sc in zip(
            qrels.column("query_id").to_pylist(),
            qrels.column("doc_id").to_pylist(),
            qrels.column("score").to_pylist(),
            strict=True,
        ):
            qrel_scores.setdefault((q, d), sc)

    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def add(q: str, d: str, source: str, rank: int | None) -> None:
        key = (q, d)
        problem = "duplicate_pair" if key in seen else None
        seen.add(key)
        out.append(
            {
                "query_id": q,
                "doc_id": d,
                "pair_source": source,
                "rank": rank,
                "qrel_score": qrel_scores.get(key),
                "problem": problem,
            }
        )

    if use_cands:
        assert candidates is not None
        pools = sorted(
            zip(
                candidates.column("query_id").to_pylist(),
                candidates.column("doc_ids").to_pylist(),
                strict=True,
            ),
            key=lambda x: x[0],
        )
        for q, docs in pools:
            for rank, d in enumerate((docs or [])[:max_docs_per_query], start=1):
                add(q, d, "candidates", rank)
    if use_qrels:
        assert qrels is not None
        for q, d in sorted(
            set(
                zip(
                    qrels.column("query_id").to_pylist(),
                    qrels.column("doc_id").to_pylist(),
                    strict=True,
                )
            )
        ):
            if (q, d) in seen and use_cands:
                continue  # 'both': already labelled as a candidate
            add(q, d, "qrels", None)
    # Judged pairs listed twice in qrels collapse above (set); candidates listed twice in one
    # pool, or a query with two pools, are flagged duplicate_pair.

    query_text = dict(
        zip(
            queries.column("query_id").to_pylist(),
            queries.column("text").to_pylist(),
            strict=True,
        )
    )
    needed = {r["doc_id"] for r in out}
    doc_title: dict[str, str | None] = {}
    doc_text: dict[str, str] = {}
    # Only the documents the pairs name become Python objects (not the whole corpus).
    wanted = corpus.filter(
        pc.is_in(corpus.column("doc_id"), value_set=pa.array(sorted(needed), pa.string()))
    )
    if "text" not in wanted.column_names:
        # by reference (the stage's plan): ids only; an unknown document is flagged now
        known = set(wanted.column("doc_id").to_pylist())
        for r in out:
            r["query_text"] = query_text.get(r["query_id"])
            # (an unknown query is still named first, as when texts are joined here)
            if r["problem"] is None and r["query_text"] is not None and r["doc_id"] not in known:
                r["problem"] = "unknown_doc_id"
        return pa.Table.from_pylist(out, schema=PAIRS)
    titles = (
        wanted.column("title").to_pylist()
        if "title" in wanted.column_names
        else [None] * wanted.num_rows
    )
    for d, t, x in zip(
        wanted.column("doc_id").to_pylist(),
        titles,
        wanted.column("text").to_pylist(),
        strict=True,
    ):
        if d not in doc_text:  # the first row of a repeated doc_id
            doc_title[d], doc_text[d] = t, x
    for r in out:
        r["query_text"] = query_text.get(r["query_id"])
        r["doc_title"] = doc_title.get(r["doc_id"])
        r["doc_text"] = doc_text.get(r["doc_id"])
    return pa.Table.from_pylist(out, schema=PAIRS)
