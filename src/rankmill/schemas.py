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

# The pointwise teacher's reasoning, one row per labels row of a reasoning or score mode
# ``label`` stage (same query_id, doc_id, sample_index): kept apart from the verdict so that
# data with and without reasoning can be exported.
REASONING = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("reasoning", pa.string()),  # the text before the conclusion, <think> tags off
        pa.field("verdict", pa.bool_(), nullable=False),
        pa.field("raw_score", pa.int32()),  # the 0-10 score written (score mode)
        pa.field("score_probability", pa.float64()),  # P(raw_score) from logprobs
        pa.field("score", pa.float64()),  # ERank's raw_score x P(raw_score)
        pa.field("repaired", pa.bool_()),  # concluded by the forced-verdict repair
        pa.field("request_key", pa.string()),
        pa.field("repair_request_key", pa.string()),
    ]
)

# One label per (query, doc) over its samples, written by ``label``: ``majority`` of verdicts
# or ERank's ``closest_to_mean`` score; ``kept_sample`` is the sample whose reasoning is kept.
CONSENSUS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("rule", pa.string()),
        pa.field("verdict", pa.bool_(), nullable=False),
        pa.field("score", pa.float64()),  # mean of s x P(s) over samples (score mode)
        pa.field("p_yes", pa.float64()),  # mean P(yes) over samples, where logprobs came back
        pa.field("samples", pa.int32()),
        pa.field("agreement", pa.float64()),  # share of samples with the consensus verdict
        pa.field("kept_sample", pa.int32()),
        pa.field("reasoning", pa.string()),  # the kept sample's reasoning (null for verdicts)
        pa.field("kept_score", pa.float64()),
    ]
)

# Synthetic queries' lineage, written by ``queries``: one row per query it wrote, kept or not.
LINEAGE = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("kind", pa.string()),  # question, reasoning, keywords
        pa.field("template", pa.string()),
        pa.field("prompt_sha256", pa.string()),  # of the template text it was rendered from
        pa.field("source_doc_id", pa.string()),
        pa.field("parent_query_id", pa.string()),  # the query a keyword query reformulates
        pa.field("endpoint", pa.string()),
        pa.field("model", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("request_key", pa.string()),
        pa.field("roundtrip_rank", pa.int32()),  # source doc's rank for the query, null if missed
        pa.field("status", pa.string()),  # "kept" or the reject reason
    ]
)

# Synthetic hard-negative documents written by ``queries`` (ReasonIR): never in the corpus,
# always marked synthetic, tied to the query they were written against.
SYNTHETIC_NEGATIVES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),  # "synthetic:<hash>"
        pa.field("text", pa.string(), nullable=False),
        pa.field("source_doc_id", pa.string()),
        pa.field("synthetic", pa.bool_(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("request_key", pa.string()),
    ]
)

# Listwise teacher output, written by ``rank``: the final ranking of each query's pool that
# passed the self-consistency filter, with its NDCG@10 against the known relevant documents.
RANKINGS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_ids", pa.list_(pa.string()), nullable=False),  # teacher's order, best first
        pa.field("input_doc_ids", pa.list_(pa.string())),  # the pool's order before ranking
        pa.field("ndcg10", pa.float64()),  # null when no relevant document is known
        pa.field("relevance_from", pa.string()),  # "qrels", "source_doc", "labels" or "none"
        pa.field("windows", pa.int32()),
        pa.field("rejected_windows", pa.int32()),  # answers rejected; the window kept its order
        pa.field("model", pa.string()),
    ]
)

# Every window the listwise teacher ranked, for the queries ``rank`` kept.
WINDOWS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("pass_index", pa.int32()),
        pa.field("window_index", pa.int32()),
        pa.field("start", pa.int32()),  # 0-based position of the window in the ranking
        pa.field("input_doc_ids", pa.list_(pa.string())),  # as shown: [1]..[n]
        pa.field("output_doc_ids", pa.list_(pa.string())),
        pa.field("reasoning", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("repairs", pa.string()),  # JSON {kind: count}
        pa.field("status", pa.string()),  # "ok" or the reason the answer was not used
        pa.field("request_key", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
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

# The judge ensemble's votes, written by ``judge``: one row per call (judge x sample) about a
# (query, document) pair. ``verdict`` is null when the answer did not parse (``reason`` says
# why): a bad answer is no vote. Model judges (bi-/cross-encoder) leave the LLM columns null.
VOTES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("kind", pa.string()),  # llm, bi_encoder, cross_encoder
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("verdict", pa.bool_()),  # null: a bad answer
        pa.field("p_yes", pa.float64()),  # P(relevant) from logprobs (LLM judges)
        pa.field("score", pa.float64()),  # the model judge's score (cosine, cross-encoder)
        pa.field("reason", pa.string()),  # why a bad answer is no vote
        pa.field("phase", pa.int32()),  # 0 = calibration slice (every judge, every sample)
        pa.field("role", pa.string()),  # the pair's role before judging
        pa.field("stop_reason", pa.string()),  # why asking about the pair stopped
        pa.field("endpoint", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("request_key", pa.string()),  # the LLM journal key
        pa.field("cached", pa.bool_()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("answer", pa.string()),
    ]
)

# The ensemble's label per pair, written by ``judge``'s finalize step.
JUDGMENTS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("role", pa.string()),  # positive, negative or candidate, before judging
        pa.field("new_role", pa.string()),  # after relabeling ("dropped" if it leaves)
        pa.field("label", pa.bool_()),  # hard label; null when no judge voted
        pa.field("posterior", pa.float64()),  # P(relevant) under the aggregation method
        pa.field("soft_label", pa.float64()),  # the soft label training views use (= posterior)
        pa.field("confidence", pa.float64()),  # posterior of the leading answer
        pa.field("method", pa.string()),  # the aggregation method
        pa.field("votes", pa.int32()),  # valid answers
        pa.field("judges", pa.int32()),  # judges that cast a vote
        pa.field("llm_calls", pa.int32()),
        pa.field("self_consistency", pa.float64()),  # mean share of a judge's own samples agreeing
        pa.field("agreement", pa.float64()),  # share of judge votes equal to the label
        pa.field("difficulty", pa.float64()),  # GLAD's 1/beta (method glad only)
        pa.field("stop_reason", pa.string()),
        pa.field("calibration", pa.bool_()),  # in the calibration slice
        pa.field("teacher_score", pa.float64()),  # kept where teacher and ensemble agree
        pa.field("status", pa.string()),  # kept or rejected
        pa.field("reason", pa.string()),  # why the role changed or the pair was rejected
    ]
)

# Every change the judge ensemble made, with its reason and posterior.
RELABELS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("from_role", pa.string()),
        pa.field("to_role", pa.string()),
        pa.field("relevant", pa.bool_()),  # the ensemble's label of the pair
        pa.field("reason", pa.string(), nullable=False),
        pa.field("posterior", pa.float64()),
        pa.field("teacher_score", pa.float64()),
    ]
)

# Per judge: estimated accuracy and soft confusion counts against the aggregate.
JUDGE_REPORT = pa.schema(
    [
        pa.field("judge", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("method", pa.string()),
        pa.field("n", pa.int64()),  # judge votes
        pa.field("accuracy", pa.float64()),
        pa.field("sensitivity", pa.float64()),
        pa.field("specificity", pa.float64()),
        pa.field("tp", pa.float64()),
        pa.field("fp", pa.float64()),
        pa.field("fn", pa.float64()),
        pa.field("tn", pa.float64()),
        pa.field("calls", pa.int64()),
        pa.field("self_consistency", pa.float64()),
        pa.field("warnings", pa.list_(pa.string())),
    ]
)

# Agreement between judges: Cohen's kappa per pair of judges, then Fleiss' kappa and
# Krippendorff's alpha over all (judge_a "*", judge_b naming the statistic).
AGREEMENT = pa.schema(
    [
        pa.field("judge_a", pa.string()),
        pa.field("judge_b", pa.string()),
        pa.field("n", pa.int64()),
        pa.field("agreement", pa.float64()),
        pa.field("kappa", pa.float64()),
    ]
)
