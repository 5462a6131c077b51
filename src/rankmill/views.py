"""Training views: the pipeline's tables turned into the formats trainers read.

Pure functions, Arrow tables in, Arrow tables out (no Ray, no file system), so every view is
tested on small hand-made tables. :func:`build_views` builds every view the inputs allow and
says, for each one it cannot build, why::

    inputs = ViewInputs(corpus=..., queries=..., qrels=..., negatives=..., labels=...)
    views, skipped = build_views(inputs, ViewOptions(seed=13))
    views["n-tuple"]["train"]      # a pyarrow.Table
    skipped                        # {"listwise-sft": "no listwise teacher tables ...", ...}

Every view keeps the stable ids (``query_id``, document ids) beside the texts, so a row can be
traced back to the run; trainers read only the columns a recipe selects (README: training).

Retriever views (sentence-transformers, FlagEmbedding, Tevatron):

- ``triplet``: (anchor, positive, negative), one row per (query, positive, negative);
  ``triplet-scores`` adds ``label`` = score(positive) - score(negative) for MarginMSELoss.
- ``n-tuple``: (anchor, positive, negative_1..n), ONE row per query (its best positive), so
  no batch of any sampler holds two rows of one query; ``n-tuple-scores`` adds ``label`` =
  [score(positive), score(negative_1), ...] for DistillKLDivLoss / MarginMSELoss.
- ``pairs``: (anchor, positive), one row per (query, positive), for MultipleNegativesRankingLoss
  over every positive; needs a batch sampler that keeps rows of one query apart
  (:mod:`rankmill.training`).
- ``flagembedding``: ``query``, ``pos``, ``neg``, ``pos_scores``, ``neg_scores``, ``prompt``.
- ``tevatron``: ``query_id``, ``query_text``, ``positive_document_ids``,
  ``negative_document_ids``, with ``tevatron-corpus`` (``docid``, ``title``, ``text``);
  ``tevatron-inline``: ``query_id``, ``query``, ``positive_passages``, ``negative_passages``.

Reranker views:

- ``pointwise``: (query, document, label, soft_label) for a CrossEncoder with
  BinaryCrossEntropyLoss; ``pointwise-reasoning`` adds the teacher's ``reasoning``.
- ``labeled-list``: (query, docs, scores) for listwise losses (LambdaLoss, ListNetLoss).
- ``listwise-sft`` / ``listwise-sft-reasoning``: chat ``messages`` (system; user with the
  numbered passages; assistant with the ``[i] > [j]`` ranking, after ``<think>`` reasoning in
  the reasoning variant), as ReasonRank-style listwise rerankers are fine-tuned.

Scores: a pair's soft label is the judge ensemble's (``judgments``) when that table is there,
else the mean P(yes) of the ``labels`` answers, else its verdict rate. Retriever score views
use soft labels for a query when every pair of it has one, else the mining scores
(``score_source`` says which).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SPLITS = ("train", "validation")

# Columns the optional teacher and judge tables must have for the views that use them.
JUDGMENT_COLUMNS = ("query_id", "doc_id")  # and a soft label: SOFT_LABEL_COLUMNS
SOFT_LABEL_COLUMNS = ("posterior", "soft_label")
# the listwise teacher's windows as shown ([1]..[n]), its order of them and its reasoning
WINDOW_COLUMNS = ("query_id", "input_doc_ids", "output_doc_ids", "reasoning")
# the listwise teacher's final ranking of a pool (no reasoning)
RANKING_COLUMNS = ("query_id", "doc_ids", "input_doc_ids")
# the judges' relabels: to_role "positive" (a false negative), "dropped", ...
RELABEL_COLUMNS = ("query_id", "doc_id", "to_role")

LISTWISE_SYSTEM = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their "
    "relevance to the query."
)


@dataclass
class ViewInputs:
    """The tables views are built from; the optional ones may be None."""

    corpus: pa.Table
    queries: pa.Table
    qrels: pa.Table | None = None
    negatives: pa.Table | None = None
    labels: pa.Table | None = None
    judgments: pa.Table | None = None  # judge ensemble: query_id, doc_id, posterior
    consensus: pa.Table | None = None  # pointwise teacher: query_id, doc_id, p_yes, reasoning
    reasoning: pa.Table | None = None  # pointwise teacher: query_id, doc_id, sample_index, ...
    windows: pa.Table | None = None  # listwise teacher windows: WINDOW_COLUMNS (+ status)
    rankings: pa.Table | None = None  # listwise teacher rankings: RANKING_COLUMNS
    relabels: pa.Table | None = None  # judge relabels: query_id, doc_id, to_role


@dataclass
class ViewOptions:
    """How views are cut."""

    seed: int = 13
    validation_fraction: float = 0.1
    num_negatives: int | None = None  # n of n-tuple views (default: the most every query has)
    query_prompt: str = ""  # FlagEmbedding's `prompt` (an instruction for the query side)
    listwise_max_passages: int = 20
    listwise_doc_chars: int = 300
    views: tuple[str, ...] | None = None  # None: every view


@dataclass
class QueryGroup:
    """Everything the views need about one query."""

    query_id: str
    text: str
    positives: list[str] = field(default_factory=list)  # best first
    negatives: list[str] = field(default_factory=list)  # mined order
    mining_scores: dict[str, float] = field(default_factory=dict)
    relevant: set[str] = field(default_factory=set)  # every doc known relevant


# -- helpers --------------------------------------------------------------------------------------
def split_of(query_id: str, seed: int, validation_fraction: float) -> str:
    """The split of a query: a seeded hash of its id, so a query lands in one split only and
    adding queries never moves the others."""
    if validation_fraction <= 0:
        return "train"
    h = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"


def split_table(table: pa.Table, seed: int, validation_fraction: float) -> dict[str, pa.Table]:
    """Rows by split of their ``query_id``; every split appears (maybe empty)."""
    ids = table.column("query_id").to_pylist()
    out = {}
    for split in SPLITS:
        mask = pa.array([split_of(q, seed, validation_fraction) == split for q in ids])
        out[split] = table.filter(mask)
    return out


def _has_columns(table: pa.Table | None, cols: Iterable[str]) -> bool:
    return table is not None and all(c in table.column_names for c in cols)


def _doc_text(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


def soft_labels(inputs: ViewInputs) -> tuple[dict[tuple[str, str], float], str]:
    """(query_id, doc_id) -> soft label in [0, 1], and where they came from."""
    soft_col = next((c for c in SOFT_LABEL_COLUMNS if _has_columns(inputs.judgments, (c,))), None)
    if soft_col and _has_columns(inputs.judgments, JUDGMENT_COLUMNS):
        j = inputs.judgments
        out = {}
        for q, d, s in zip(
            j.column("query_id").to_pylist(),
            j.column("doc_id").to_pylist(),
            j.column(soft_col).to_pylist(),
            strict=True,
        ):
            if s is not None:
                out[(q, d)] = float(s)
        return out, "judgments"
    if _has_columns(inputs.consensus, ("query_id", "doc_id", "p_yes")):
        c = inputs.consensus
        out = {
            (q, d): float(p)
            for q, d, p in zip(
                c.column("query_id").to_pylist(),
                c.column("doc_id").to_pylist(),
                c.column("p_yes").to_pylist(),
                strict=True,
            )
            if p is not None
        }
        if out:
            return out, "consensus"
    if inputs.labels is not None and inputs.labels.num_rows:
        sums: dict[tuple[str, str], list[float]] = defaultdict(list)
        lab = inputs.labels
        p = lab.column("p_yes").to_pylist() if "p_yes" in lab.column_names else None
        for i, (q, d, v) in enumerate(
            zip(
                lab.column("query_id").to_pylist(),
                lab.column("doc_id").to_pylist(),
                lab.column("verdict").to_pylist(),
                strict=True,
            )
        ):
            val = p[i] if p is not None and p[i] is not None else float(bool(v))
            sums[(q, d)].append(float(val))
        return {k: sum(v) / len(v) for k, v in sums.items()}, "labels"
    return {}, "none"


def pair_reasoning(inputs: ViewInputs) -> dict[tuple[str, str], str]:
    """The pointwise teacher's reasoning per pair: the consensus' kept sample, else the first
    sample (by index) of the ``reasoning`` table that has one, else ``labels.reasoning``."""
    out: dict[tuple[str, str], str] = {}
    sources = []
    if _has_columns(inputs.consensus, ("query_id", "doc_id", "reasoning")):
        sources.append(inputs.consensus)
    if _has_columns(inputs.reasoning, ("query_id", "doc_id", "reasoning")):
        t = inputs.reasoning
        if "sample_index" in t.column_names:
            t = t.sort_by("sample_index")
        sources.append(t)
    if _has_columns(inputs.labels, ("query_id", "doc_id", "reasoning")):
        sources.append(inputs.labels)
    for t in sources:
        for q, d, r in zip(
            t.column("query_id").to_pylist(),
            t.column("doc_id").to_pylist(),
            t.column("reasoning").to_pylist(),
            strict=True,
        ):
            if r and (q, d) not in out:
                out[(q, d)] = r
    return out


def query_groups(inputs: ViewInputs) -> list[QueryGroup]:
    """One group per query that has a positive, in query table order.

    Positives: the mined ``positive_ids`` (else qrels with score > 0); negatives: the mined
    negatives less every pair the judges relabelled relevant (those are false negatives: they
    join ``relevant`` so no batch uses them as negatives either)."""
    texts = dict(
        zip(
            inputs.queries.column("query_id").to_pylist(),
            inputs.queries.column("text").to_pylist(),
            strict=True,
        )
    )
    groups: dict[str, QueryGroup] = {}
    relevant: dict[str, set[str]] = defaultdict(set)
    if inputs.qrels is not None:
        for q, d, s in zip(
            inputs.qrels.column("query_id").to_pylist(),
            inputs.qrels.column("doc_id").to_pylist(),
            inputs.qrels.column("score").to_pylist(),
            strict=True,
        ):
            if s is not None and s > 0:
                relevant[q].add(d)
    relabelled: set[tuple[str, str]] = set()  # pairs that are no longer negatives
    if _has_columns(inputs.relabels, RELABEL_COLUMNS):
        r = inputs.relabels
        for q, d, role in zip(
            r.column("query_id").to_pylist(),
            r.column("doc_id").to_pylist(),
            r.column("to_role").to_pylist(),
            strict=True,
        ):
            if role != "negative":
                relabelled.add((q, d))
            if role == "positive":
                relevant[q].add(d)
    if inputs.negatives is not None:
        neg = inputs.negatives.to_pylist()
        for row in neg:
            q = row["query_id"]
            if q not in texts:
                continue
            g = groups.setdefault(q, QueryGroup(q, texts[q]))
            pos_scores = row.get("positive_scores") or []
            for i, d in enumerate(row["positive_ids"] or []):
                if d not in g.positives:
                    g.positives.append(d)
                if i < len(pos_scores) and pos_scores[i] is not None:
                    g.mining_scores[d] = float(pos_scores[i])
            neg_scores = row.get("negative_scores") or []
            for i, d in enumerate(row["negative_ids"] or []):
                if (q, d) in relabelled or d in relevant[q] or d in g.negatives:
                    continue
                g.negatives.append(d)
                if i < len(neg_scores) and neg_scores[i] is not None:
                    g.mining_scores[d] = float(neg_scores[i])
    for q, docs in relevant.items():
        if q in texts and q not in groups and inputs.negatives is None:
            groups[q] = QueryGroup(q, texts[q], positives=sorted(docs))
    order = {q: i for i, q in enumerate(texts)}
    out = []
    for q in sorted(groups, key=lambda x: order[x]):
        g = groups[q]
        g.relevant = set(g.positives) | relevant.get(q, set())
        if g.positives:
            out.append(g)
    return out


class _Corpus:
    def __init__(self, corpus: pa.Table):
        titles = (
            corpus.column("title").to_pylist()
            if "title" in corpus.column_names
            else [None] * corpus.num_rows
        )
        self.title = dict(zip(corpus.column("doc_id").to_pylist(), titles, strict=True))
        self.body = dict(
            zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist(), strict=True)
        )

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.body

    def text(self, doc_id: str) -> str:
        return _doc_text(self.title.get(doc_id), self.body[doc_id])


# -- retriever views ------------------------------------------------------------------------------
def _known(docs: list[str], corpus: _Corpus) -> list[str]:
    return [d for d in docs if d in corpus]


def _query_scores(
    g: QueryGroup, docs: list[str], soft: dict[tuple[str, str], float]
) -> tuple[list[float | None], str]:
    if soft and all((g.query_id, d) in soft for d in docs):
        return [soft[(g.query_id, d)] for d in docs], "soft_label"
    return [g.mining_scores.get(d) for d in docs], "mining"


def triplet_view(groups: list[QueryGroup], corpus: _Corpus, soft, scores: bool) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        pos, neg = _known(g.positives, corpus), _known(g.negatives, corpus)
        if not pos or not neg:
            continue
        values, source = _query_scores(g, pos + neg, soft)
        score = dict(zip(pos + neg, values, strict=True))
        for p in pos:
            for n in neg:
                rows["anchor"].append(g.text)
                rows["positive"].append(corpus.text(p))
                rows["negative"].append(corpus.text(n))
                if scores:
                    sp, sn = score[p], score[n]
                    rows["label"].append(None if sp is None or sn is None else sp - sn)
                    rows["score_source"].append(source)
                rows["query_id"].append(g.query_id)
                rows["positive_id"].append(p)
                rows["negative_id"].append(n)
                rows["relevant_ids"].append(sorted(g.relevant))
    fields = [
        pa.field("anchor", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negative", pa.string()),
    ]
    if scores:
        fields += [pa.field("label", pa.float64()), pa.field("score_source", pa.string())]
    fields += _id_fields("positive_id", "negative_id")
    return _table(rows, fields)


def _id_fields(*names: str) -> list[pa.Field]:
    out = [pa.field("query_id", pa.string())]
    for n in names:
        out.append(pa.field(n, pa.list_(pa.string()) if n.endswith("_ids") else pa.string()))
    out.append(pa.field("relevant_ids", pa.list_(pa.string())))
    return out


def _table(rows: dict[str, list[Any]], fields: list[pa.Field]) -> pa.Table:
    schema = pa.schema(fields)
    return pa.table({f.name: rows.get(f.name, []) for f in schema}, schema=schema)


def pairs_view(groups: list[QueryGroup], corpus: _Corpus) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        for p in _known(g.positives, corpus):
            rows["anchor"].append(g.text)
            rows["positive"].append(corpus.text(p))
            rows["query_id"].append(g.query_id)
            rows["positive_id"].append(p)
            rows["negative_ids"].append([])
            rows["relevant_ids"].append(sorted(g.relevant))
    fields = [pa.field("anchor", pa.string()), pa.field("positive", pa.string())]
    return _table(rows, fields + _id_fields("positive_id", "negative_ids"))


def n_tuple_view(groups: list[QueryGroup], corpus: _Corpus, soft, n: int, scores: bool) -> pa.Table:
    """One row per query with at least ``n`` known negatives: its best positive and its first
    ``n`` negatives."""
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        pos, neg = _known(g.positives, corpus), _known(g.negatives, corpus)
        if not pos or len(neg) < n:
            continue
        p, negs = pos[0], neg[:n]
        rows["anchor"].append(g.text)
        rows["positive"].append(corpus.text(p))
        for i, d in enumerate(negs, 1):
            rows[f"negative_{i}"].append(corpus.text(d))
        if scores:
            values, source = _query_scores(g, [p, *negs], soft)
            rows["label"].append(values)
            rows["score_source"].append(source)
        rows["query_id"].append(g.query_id)
        rows["positive_id"].append(p)
        rows["negative_ids"].append(negs)
        rows["relevant_ids"].append(sorted(g.relevant))
    fields = [pa.field("anchor", pa.string()), pa.field("positive", pa.string())]
    fields += [pa.field(f"negative_{i}", pa.string()) for i in range(1, n + 1)]
    if scores:
        fields += [pa.field("label", pa.list_(pa.float64())), pa.field("score_source", pa.string())]
    return _table(rows, fields + _id_fields("positive_id", "negative_ids"))


def flagembedding_view(groups: list[QueryGroup], corpus: _Corpus, soft, prompt: str) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        pos, neg = _known(g.positives, corpus), _known(g.negatives, corpus)
        if not pos or not neg:
            continue
        values, source = _query_scores(g, pos + neg, soft)
        rows["query"].append(g.text)
        rows["pos"].append([corpus.text(d) for d in pos])
        rows["neg"].append([corpus.text(d) for d in neg])
        rows["pos_scores"].append(values[: len(pos)])
        rows["neg_scores"].append(values[len(pos) :])
        rows["prompt"].append(prompt)
        rows["score_source"].append(source)
        rows["query_id"].append(g.query_id)
        rows["pos_ids"].append(pos)
        rows["neg_ids"].append(neg)
        rows["relevant_ids"].append(sorted(g.relevant))
    fields = [
        pa.field("query", pa.string()),
        pa.field("pos", pa.list_(pa.string())),
        pa.field("neg", pa.list_(pa.string())),
        pa.field("pos_scores", pa.list_(pa.float64())),
        pa.field("neg_scores", pa.list_(pa.float64())),
        pa.field("prompt", pa.string()),
        pa.field("score_source", pa.string()),
    ]
    return _table(rows, fields + _id_fields("pos_ids", "neg_ids"))


def tevatron_view(groups: list[QueryGroup], corpus: _Corpus) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        pos, neg = _known(g.positives, corpus), _known(g.negatives, corpus)
        if not pos:
            continue
        rows["query_id"].append(g.query_id)
        rows["query_text"].append(g.text)
        rows["positive_document_ids"].append(pos)
        rows["negative_document_ids"].append(neg)
    schema = pa.schema(
        [
            pa.field("query_id", pa.string()),
            pa.field("query_text", pa.string()),
            pa.field("positive_document_ids", pa.list_(pa.string())),
            pa.field("negative_document_ids", pa.list_(pa.string())),
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


PASSAGE = pa.struct(
    [pa.field("docid", pa.string()), pa.field("title", pa.string()), pa.field("text", pa.string())]
)


def tevatron_inline_view(groups: list[QueryGroup], corpus: _Corpus) -> pa.Table:
    def passages(ids: list[str]) -> list[dict[str, Any]]:
        return [
            {"docid": d, "title": corpus.title.get(d) or "", "text": corpus.body[d]} for d in ids
        ]

    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        pos, neg = _known(g.positives, corpus), _known(g.negatives, corpus)
        if not pos:
            continue
        rows["query_id"].append(g.query_id)
        rows["query"].append(g.text)
        rows["positive_passages"].append(passages(pos))
        rows["negative_passages"].append(passages(neg))
    schema = pa.schema(
        [
            pa.field("query_id", pa.string()),
            pa.field("query", pa.string()),
            pa.field("positive_passages", pa.list_(PASSAGE)),
            pa.field("negative_passages", pa.list_(PASSAGE)),
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def tevatron_corpus_view(corpus: pa.Table) -> pa.Table:
    titles = corpus.column("title") if "title" in corpus.column_names else None
    return pa.table(
        {
            "docid": corpus.column("doc_id"),
            "title": titles.fill_null("") if titles is not None else [""] * corpus.num_rows,
            "text": corpus.column("text"),
        }
    )


# -- reranker views -------------------------------------------------------------------------------
def pointwise_view(
    groups: list[QueryGroup],
    corpus: _Corpus,
    soft: dict[tuple[str, str], float],
    texts: dict[str, str],
    reasoning: dict[tuple[str, str], str] | None,
) -> pa.Table:
    """Every mined positive (label 1) and negative (label 0), and every LLM-labelled pair;
    ``soft_label`` is the pair's soft label where it has one, else its hard label. With
    ``reasoning``, only pairs the teacher reasoned about, with that reasoning."""
    pairs: dict[tuple[str, str], float] = {}
    for g in groups:
        for d in g.positives:
            pairs[(g.query_id, d)] = 1.0
        for d in g.negatives:
            pairs.setdefault((g.query_id, d), 0.0)
    for key, s in soft.items():
        pairs.setdefault(key, 1.0 if s >= 0.5 else 0.0)
    rows: dict[str, list[Any]] = defaultdict(list)
    for (q, d), hard in pairs.items():
        if q not in texts or d not in corpus:
            continue
        if reasoning is not None and (q, d) not in reasoning:
            continue
        rows["query"].append(texts[q])
        rows["document"].append(corpus.text(d))
        rows["label"].append(hard)
        rows["soft_label"].append(soft.get((q, d), hard))
        if reasoning is not None:
            rows["reasoning"].append(reasoning[(q, d)])
        rows["query_id"].append(q)
        rows["doc_id"].append(d)
    fields = [
        pa.field("query", pa.string()),
        pa.field("document", pa.string()),
        pa.field("label", pa.float64()),
        pa.field("soft_label", pa.float64()),
    ]
    if reasoning is not None:
        fields.append(pa.field("reasoning", pa.string()))
    fields += [pa.field("query_id", pa.string()), pa.field("doc_id", pa.string())]
    return _table(rows, fields)


def labeled_list_view(groups: list[QueryGroup], corpus: _Corpus, soft) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    for g in groups:
        docs = _known(g.positives, corpus) + _known(g.negatives, corpus)
        if len(docs) < 2:
            continue
        pos = set(g.positives)
        scores = [soft.get((g.query_id, d), 1.0 if d in pos else 0.0) for d in docs]
        rows["query"].append(g.text)
        rows["docs"].append([corpus.text(d) for d in docs])
        rows["scores"].append(scores)
        rows["query_id"].append(g.query_id)
        rows["doc_ids"].append(docs)
    schema = pa.schema(
        [
            pa.field("query", pa.string()),
            pa.field("docs", pa.list_(pa.string())),
            pa.field("scores", pa.list_(pa.float64())),
            pa.field("query_id", pa.string()),
            pa.field("doc_ids", pa.list_(pa.string())),
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def listwise_messages(
    query: str, passages: list[str], ranking: list[int], reasoning: str | None
) -> list[dict[str, str]]:
    """One listwise SFT example: ``ranking`` holds 1-based passage numbers, best first."""
    numbered = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    user = (
        f"I will provide you with {len(passages)} passages, each indicated by a numerical "
        f"identifier []. Rank the passages based on their relevance to the search query: "
        f"{query}.\n\n{numbered}\n\nSearch Query: {query}.\n\nRank the {len(passages)} passages "
        "above based on their relevance to the search query. All the passages should be "
        "included and listed using identifiers, in descending order of relevance. The format "
        "of the answer should be [] > [], e.g., [2] > [1]."
    )
    order = " > ".join(f"[{i}]" for i in ranking)
    answer = f"<think>\n{reasoning.strip()}\n</think>\n{order}" if reasoning else order
    return [
        {"role": "system", "content": LISTWISE_SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]


MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))


def listwise_examples(
    inputs: ViewInputs,
) -> tuple[list[tuple[str, list[str], list[str], str | None]], str | None]:
    """(query_id, doc ids as shown, the teacher's order of them, reasoning) per example, from
    the teacher's windows (with reasoning) or else its final rankings (without); and why there
    are none."""
    if _has_columns(inputs.windows, WINDOW_COLUMNS):
        w = inputs.windows
        status = w.column("status").to_pylist() if "status" in w.column_names else None
        out = []
        for i, row in enumerate(w.select(list(WINDOW_COLUMNS)).to_pylist()):
            if status is not None and status[i] not in (None, "ok"):
                continue
            out.append(
                (
                    row["query_id"],
                    row["input_doc_ids"] or [],
                    row["output_doc_ids"] or [],
                    row["reasoning"],
                )
            )
        return out, None
    if _has_columns(inputs.rankings, RANKING_COLUMNS):
        r = inputs.rankings.select(list(RANKING_COLUMNS)).to_pylist()
        return [
            (x["query_id"], x["input_doc_ids"] or [], x["doc_ids"] or [], None) for x in r
        ], None
    if inputs.windows is not None or inputs.rankings is not None:
        return [], (
            f"the listwise teacher's tables lack columns (windows: {list(WINDOW_COLUMNS)}, "
            f"rankings: {list(RANKING_COLUMNS)})"
        )
    return [], "no listwise teacher tables (rank.windows, rank.rankings)"


def listwise_view(
    examples: list[tuple[str, list[str], list[str], str | None]],
    corpus: _Corpus,
    texts: dict[str, str],
    with_reasoning: bool,
    max_passages: int,
    doc_chars: int,
) -> pa.Table:
    """Chat examples: the passages as the teacher saw them, numbered, and its order."""
    rows: dict[str, list[Any]] = defaultdict(list)
    for q, shown, ranking, reasoning in examples:
        if q not in texts or with_reasoning and not reasoning:
            continue
        window = [d for d in shown if d in corpus][:max_passages]
        pos = {d: i for i, d in enumerate(window, 1)}
        order = [pos[d] for d in ranking if d in pos]
        order += [i for i in range(1, len(window) + 1) if i not in order]
        if len(window) < 2:
            continue
        passages = [corpus.text(d)[:doc_chars] for d in window]
        rows["messages"].append(
            listwise_messages(texts[q], passages, order, reasoning if with_reasoning else None)
        )
        rows["query_id"].append(q)
        rows["doc_ids"].append(window)
    schema = pa.schema(
        [
            pa.field("messages", MESSAGES),
            pa.field("query_id", pa.string()),
            pa.field("doc_ids", pa.list_(pa.string())),
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


# -- all views ------------------------------------------------------------------------------------
VIEW_NAMES = (
    "triplet",
    "triplet-scores",
    "pairs",
    "n-tuple",
    "n-tuple-scores",
    "flagembedding",
    "tevatron",
    "tevatron-inline",
    "tevatron-corpus",
    "pointwise",
    "pointwise-reasoning",
    "labeled-list",
    "listwise-sft",
    "listwise-sft-reasoning",
)

# Views whose rows are not per query: one split ("train") holds them all.
UNSPLIT = frozenset({"tevatron-corpus"})


def build_views(
    inputs: ViewInputs, options: ViewOptions | None = None
) -> tuple[dict[str, dict[str, pa.Table]], dict[str, str]]:
    """Every view the inputs allow, split by query: ``({view: {split: table}}, {view: why
    it was skipped})``."""
    opt = options or ViewOptions()
    wanted = list(opt.views or VIEW_NAMES)
    unknown = [v for v in wanted if v not in VIEW_NAMES]
    if unknown:
        raise ValueError(f"unknown views {unknown}; known: {', '.join(VIEW_NAMES)}")
    corpus = _Corpus(inputs.corpus)
    texts = dict(
        zip(
            inputs.queries.column("query_id").to_pylist(),
            inputs.queries.column("text").to_pylist(),
            strict=True,
        )
    )
    groups = query_groups(inputs)
    soft, _ = soft_labels(inputs)
    reasoning = pair_reasoning(inputs)
    with_negs = [g for g in groups if _known(g.negatives, corpus)]
    n = opt.num_negatives
    if n is None:
        n = min((len(_known(g.negatives, corpus)) for g in with_negs), default=0)

    skipped: dict[str, str] = {}
    builders: dict[str, Callable[[], pa.Table]] = {
        "triplet": lambda: triplet_view(groups, corpus, soft, scores=False),
        "triplet-scores": lambda: triplet_view(groups, corpus, soft, scores=True),
        "pairs": lambda: pairs_view(groups, corpus),
        "n-tuple": lambda: n_tuple_view(groups, corpus, soft, n, scores=False),
        "n-tuple-scores": lambda: n_tuple_view(groups, corpus, soft, n, scores=True),
        "flagembedding": lambda: flagembedding_view(groups, corpus, soft, opt.query_prompt),
        "tevatron": lambda: tevatron_view(groups, corpus),
        "tevatron-inline": lambda: tevatron_inline_view(groups, corpus),
        "tevatron-corpus": lambda: tevatron_corpus_view(inputs.corpus),
        "pointwise": lambda: pointwise_view(groups, corpus, soft, texts, None),
        "pointwise-reasoning": lambda: pointwise_view(groups, corpus, soft, texts, reasoning),
        "labeled-list": lambda: labeled_list_view(groups, corpus, soft),
    }
    examples, why_none = listwise_examples(inputs)
    for name, flag in (("listwise-sft", False), ("listwise-sft-reasoning", True)):
        builders[name] = lambda flag=flag: listwise_view(
            examples, corpus, texts, flag, opt.listwise_max_passages, opt.listwise_doc_chars
        )
    if why_none:
        skipped["listwise-sft"] = skipped["listwise-sft-reasoning"] = why_none
    elif not any(r for *_, r in examples):
        skipped["listwise-sft-reasoning"] = "the listwise teacher wrote no reasoning"
    if not reasoning:
        skipped["pointwise-reasoning"] = "no pointwise teacher reasoning (label.reasoning)"
    if n < 1:
        for v in ("triplet", "triplet-scores", "n-tuple", "n-tuple-scores", "flagembedding"):
            skipped[v] = "no query has a hard negative (mine.negatives)"

    views: dict[str, dict[str, pa.Table]] = {}
    for name in wanted:
        if name in skipped:
            continue
        table = builders[name]()
        if table.num_rows == 0:
            skipped[name] = "no rows"
            continue
        if name in UNSPLIT:
            views[name] = {"train": table}
        else:
            views[name] = split_table(table, opt.seed, opt.validation_fraction)
    return views, {k: v for k, v in skipped.items() if k in wanted}
