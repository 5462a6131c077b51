"""Arrow schemas of the tables that pass between stages.

Ids are strings: the user's own ids, or content hashes for rows rankmill creates. Every
stage may also write ``rejects`` (:data:`REJECTS`): one row per input row that did not make
it out, with a machine-readable ``reason`` and a free-text ``detail``.
"""

from __future__ import annotations

import pyarrow as pa

CORPUS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string(), nullable=False),
    ]
)

QUERIES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        # "user" for given queries; synthetic queries name how they were made
        pa.field("source", pa.string()),
        # the document a synthetic query was written from (null for user queries)
        pa.field("source_doc_id", pa.string()),
    ]
)

QRELS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("score", pa.int32(), nullable=False),
    ]
)

# Documents that must not be used as negatives for a query (e.g. Cranfield's source_docs):
# the document the query was written from.
EXCLUSIONS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("stage", pa.string()),
        pa.field("unit_id", pa.string()),
        pa.field("table", pa.string()),  # which input table the rejected row came from
        pa.field("row_id", pa.string()),  # its id there (doc_id, query_id, line number...)
        pa.field("query_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

# Candidate pools per query, written by ``mine``: doc_ids in final (fused) rank order. Later
# stages (label, teach, judge) read query_id and doc_ids; the rest is for analysis.
CANDIDATES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float64())),  # fused score per doc
        pa.field("bm25_ranks", pa.list_(pa.int32())),  # 1-based; null where BM25 missed it
        pa.field("bm25_scores", pa.list_(pa.float64())),  # null where BM25 missed it
        pa.field("dense_ranks", pa.list_(pa.int32())),  # 1-based; null where dense missed it
        pa.field("dense_scores", pa.list_(pa.float64())),
        pa.field("retrievers", pa.list_(pa.string())),  # "bm25", "dense" or "bm25+dense"
        pa.field("positive_ids", pa.list_(pa.string())),
    ]
)

# LLM relevance labels, one row per (query, doc, sample) answer that parsed, written by
# ``label`` (and later by teacher/judge stages, which add their own tables beside it). Answers
# that did not parse are in ``rejects`` with their reason, never here. ``judge`` names who gave
# the label (the stage name), so several label stages can be stacked into an ensemble.
LABELS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),  # 0..samples-1
        pa.field("verdict", pa.bool_(), nullable=False),  # the parsed answer: relevant or not
        pa.field("p_yes", pa.float64()),  # P(relevant) from logprobs; null when none came back
        pa.field("judge", pa.string()),  # the stage that labelled it
        pa.field("endpoint", pa.string()),  # endpoint name in the pipeline
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),  # prompt template name
        pa.field("seed", pa.int64()),  # the seed the request was sent with, if any
        pa.field("attempt", pa.int32()),  # 0; n when the nth resample after a bad answer parsed
        pa.field("request_key", pa.string()),  # the LLM journal key of the answer
        pa.field("cached", pa.bool_()),  # answer came from the journal, not the endpoint
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("answer", pa.string()),  # the raw answer text (short by construction)
        pa.field("pair_source", pa.string()),  # "candidates" or "qrels"
        pa.field("rank", pa.int32()),  # 1-based rank in the candidate pool; null for qrels
        pa.field("qrel_score", pa.int32()),  # the given judgment of the pair, if any
    ]
)

# Hard negatives per query, written by ``mine``. Scores are on the scale of ``score_kind``
# ("dense": cosine of the mining model; "cross_encoder": the rescoring model's score), so a
# trainer can apply its own margin; ranks are 1-based positions in the ranking they were
# mined from.
NEGATIVES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("positive_ids", pa.list_(pa.string()), nullable=False),
        pa.field("positive_scores", pa.list_(pa.float64())),
        pa.field("negative_ids", pa.list_(pa.string()), nullable=False),
        pa.field("negative_scores", pa.list_(pa.float64())),
        pa.field("negative_ranks", pa.list_(pa.int32())),
        pa.field("score_kind", pa.string()),
    ]
)
