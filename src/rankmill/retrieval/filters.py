"""False-negative filters for hard-negative mining (pure).

A query's candidate negatives come ranked by a retriever. Many of the best-ranked ones are
in fact relevant documents that nobody judged (or that a synthetic query's single source
document cannot speak for), and training on them teaches the model to push relevant text
away. Each filter here removes candidates for one stated reason:

============================  ======================================================
reason                        skipped when
============================  ======================================================
``positive``                  the candidate *is* a positive (by id, never by text)
``excluded``                  the data marks it as not to be used for this query
``max_score``                 score > ``max_score``
``min_score``                 score < ``min_score`` (too easy to teach anything)
``absolute_margin``           score > positive_score - ``absolute_margin``
``relative_margin``           score > positive_score - (1 - ``max_relative_score``) ·
                              |positive_score|: the positive-aware rule; with 0.95 a
                              negative must score below 95% of the positive
``similar_to_positive``       its embedding's cosine to a positive's > ``max_positive_similarity``
``near_duplicate_of_positive``  rapidfuzz ratio to a positive's text >= ``duplicate_ratio``
``near_duplicate``            rapidfuzz ratio to a negative already chosen for the query
                              >= ``duplicate_ratio``
============================  ======================================================

The two text rules can run over the whole pool (:func:`filter_candidates` with ``texts``) or,
as the miner runs them, while sampling (:class:`DuplicateGuard`): only the candidates the
sampler picks are compared, and a turned-down pick is replaced by the next one: the chosen
negatives obey the same rules (with ``top`` sampling they are the same negatives), and a
thousand-candidate pool costs a handful of comparisons. Counted that way, the two reasons
count turned-down picks, not the whole pool.

With several positives the margins use the *lowest* positive score, the cautious choice.
Each candidate is charged to the first rule (in the order above) that removes it, so the
counts add up and :func:`describe_skips` can say "skipped N (x%) because of …".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from rankmill.config import Model

REASONS: tuple[str, ...] = (
    "positive",
    "excluded",
    "max_score",
    "min_score",
    "absolute_margin",
    "relative_margin",
    "similar_to_positive",
    "near_duplicate_of_positive",
    "near_duplicate",
)

EXPLAIN: dict[str, str] = {
    "positive": "it is a positive of the query",
    "excluded": "the data marks it as not to be used for the query",
    "max_score": "its score is above max_score",
    "min_score": "its score is below min_score",
    "absolute_margin": "it scores within absolute_margin of the positive",
    "relative_margin": "it scores above max_relative_score x the positive's score",
    "similar_to_positive": "its embedding is closer than max_positive_similarity to a positive",
    "near_duplicate_of_positive": "its text nearly duplicates a positive",
    "near_duplicate": "its text nearly duplicates a better-ranked candidate",
}


class FilterParams(Model):
    """Which false-negative filters run, and their thresholds (None turns one off)."""

    max_relative_score: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="Positive-aware rule: skip a candidate scoring above this fraction of the "
        "(lowest) positive's score, i.e. above pos - (1 - r)·|pos|. 0.95 is the NV-Retriever "
        "TopK-PercPos setting; it equals sentence-transformers' relative_margin=0.05.",
    )
    absolute_margin: float | None = Field(
        None, description="Skip a candidate scoring above the positive's score minus this."
    )
    max_score: float | None = Field(None, description="Skip a candidate scoring above this.")
    min_score: float | None = Field(
        None, description="Skip a candidate scoring below this (too easy to be informative)."
    )
    max_positive_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Skip a candidate whose document embedding has a cosine above this with a "
        "positive's (relevant documents cluster); model-specific, off by default.",
    )
    duplicate_ratio: float | None = Field(
        95.0,
        ge=0,
        le=100,
        description="rapidfuzz ratio (0-100) at or above which a candidate counts as a "
        "near-duplicate of a positive or of a better-ranked candidate.",
    )
    duplicate_chars: int = Field(
        1000, ge=16, description="Compare only this many leading characters of each text."
    )
    use_exclusions: bool = Field(
        True, description="Never use documents the exclusions table names for the query."
    )


@dataclass
class FilterOutcome:
    """Positions (into the candidate list) kept, and those skipped per reason."""

    kept: np.ndarray
    skipped: dict[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {r: int(len(v)) for r, v in self.skipped.items() if len(v)}


# -- single rules: each returns a boolean mask, True = skip ---------------------------------------
def ids_mask(doc_ids: Sequence[str], ids: Collection[str]) -> np.ndarray:
    """Candidates whose id is in ``ids`` (positives, exclusions); ids may be integers (corpus
    rows) given as a numpy array."""
    if isinstance(doc_ids, np.ndarray) and doc_ids.dtype.kind in "iu":
        if len(ids) > 16:
            return np.isin(doc_ids, np.fromiter(ids, dtype=np.int64, count=len(ids)))
        mask = np.zeros(len(doc_ids), dtype=bool)
        for x in ids:
            mask |= doc_ids == x
        return mask
    s = set(ids)
    return np.fromiter((d in s for d in doc_ids), dtype=bool, count=len(doc_ids))


def max_score_mask(scores: np.ndarray, max_score: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) > max_score


def min_score_mask(scores: np.ndarray, min_score: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) < min_score


def absolute_margin_mask(scores: np.ndarray, positive_score: float, margin: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) > positive_score - margin


def relative_margin_mask(scores: np.ndarray, positive_score: float, ratio: float) -> np.ndarray:
    # Subtracting a share of |pos| (not multiplying by ratio) keeps the rule sensible for
    # negative scores, where pos * 0.95 would lie *above* pos.
    threshold = positive_score - (1.0 - ratio) * abs(positive_score)
    return np.asarray(scores, dtype=np.float64) > threshold


def similarity_mask(positive_sims: np.ndarray, max_similarity: float) -> np.ndarray:
    """``positive_sims``: (n_candidates,) highest cosine of each candidate to any positive."""
    return np.asarray(positive_sims, dtype=np.float64) > max_similarity


def near_duplicate_of_mask(
    texts: Sequence[str], references: Sequence[str], ratio: float, chars: int = 1000
) -> np.ndarray:
    """Candidates whose text has rapidfuzz ratio >= ``ratio`` with any reference text."""
    if not len(texts) or not len(references):
        return np.zeros(len(texts), dtype=bool)
    from rapidfuzz import fuzz, process

    a = [t[:chars] for t in texts]
    b = [t[:chars] for t in references]
    sim = process.cdist(a, b, scorer=fuzz.ratio, score_cutoff=ratio, dtype=np.float32)
    return (sim >= ratio).any(axis=1)


def near_duplicates_mask(texts: Sequence[str], ratio: float, chars: int = 1000) -> np.ndarray:
    """Greedy in list order: skip a text that nearly duplicates an earlier *kept* one."""
    n = len(texts)
    skip = np.zeros(n, dtype=bool)
    if n < 2:
        return skip
    from rapidfuzz import fuzz, process

    a = [t[:chars] for t in texts]
    sim = process.cdist(a, a, scorer=fuzz.ratio, score_cutoff=ratio, dtype=np.float32) >= ratio
    for i in range(1, n):
        earlier = sim[i, :i] & ~skip[:i]
        if earlier.any():
            skip[i] = True
    return skip


# -- all rules, in order ------------------------------------------------------------------------
def filter_candidates(
    doc_ids: Sequence[str],
    scores: np.ndarray,
    params: FilterParams,
    positive_ids: Collection[str],
    positive_scores: Sequence[float] = (),
    excluded_ids: Collection[str] = (),
    texts: Sequence[str] | None = None,
    positive_texts: Sequence[str] = (),
    positive_sims: np.ndarray | None = None,
) -> FilterOutcome:
    """Run every per-candidate filter over one query's candidates (in rank order).

    The mutual near-duplicate rule is not here: it depends on which negatives get chosen, so
    the sampler applies it through :class:`DuplicateGuard`.

    ``scores`` are the candidates' scores on the same scale as ``positive_scores`` (dense
    cosine, or cross-encoder scores after rescoring). ``texts`` and ``positive_texts`` feed the
    near-duplicate rules, ``positive_sims`` the similar-to-positive rule; either rule is
    skipped when its inputs are not given.
    """
    n = len(doc_ids)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"{n} candidates but scores of shape {scores.shape}")
    alive = np.ones(n, dtype=bool)
    skipped: dict[str, np.ndarray] = {}

    def apply(reason: str, mask: np.ndarray) -> None:
        hit = mask & alive
        if hit.any():
            skipped[reason] = np.flatnonzero(hit)
            alive[hit] = False

    apply("positive", ids_mask(doc_ids, positive_ids))
    if params.use_exclusions and excluded_ids:
        apply("excluded", ids_mask(doc_ids, excluded_ids))
    if params.max_score is not None:
        apply("max_score", max_score_mask(scores, params.max_score))
    if params.min_score is not None:
        apply("min_score", min_score_mask(scores, params.min_score))
    if len(positive_scores):
        pos = float(np.min(np.asarray(positive_scores, dtype=np.float64)))
        if params.absolute_margin is not None:
            apply("absolute_margin", absolute_margin_mask(scores, pos, params.absolute_margin))
        if params.max_relative_score is not None:
            apply("relative_margin", relative_margin_mask(scores, pos, params.max_relative_score))
    if params.max_positive_similarity is not None and positive_sims is not None:
        apply("similar_to_positive", similarity_mask(positive_sims, params.max_positive_similarity))
    if params.duplicate_ratio is not None and texts is not None and len(positive_texts):
        idx = np.flatnonzero(alive)
        m = near_duplicate_of_mask(
            [texts[i] for i in idx], positive_texts, params.duplicate_ratio, params.duplicate_chars
        )
        full = np.zeros(n, dtype=bool)
        full[idx[m]] = True
        apply("near_duplicate_of_positive", full)
    return FilterOutcome(kept=np.flatnonzero(alive), skipped=skipped)


class DuplicateGuard:
    """Turns down a text that nearly duplicates a reference (the query's positives) or one
    already accepted (the negatives picked so far), for one query.

    Comparing only the picks keeps the cost at O(negatives x (positives + negatives))
    instead of O(pool x ...), which matters with pools of a thousand long passages: most
    candidates never come up for choosing.
    """

    def __init__(self, ratio: float, chars: int = 1000, references: Sequence[str] = ()):
        self.ratio = ratio
        self.chars = chars
        self.references = [t[:chars] for t in references]
        self.accepted: list[str] = []

    def _near(self, text: str, others: list[str]) -> bool:
        from rapidfuzz import fuzz, process

        return bool(others) and (
            process.extractOne(text, others, scorer=fuzz.ratio, score_cutoff=self.ratio) is not None
        )

    def reason(self, text: str) -> str | None:
        """``near_duplicate_of_positive``, ``near_duplicate`` or None (not a duplicate)."""
        t = text[: self.chars]
        if self._near(t, self.references):
            return "near_duplicate_of_positive"
        if self._near(t, self.accepted):
            return "near_duplicate"
        return None

    def is_duplicate(self, text: str) -> bool:
        return self.reason(text) is not None

    def accept(self, text: str) -> None:
        self.accepted.append(text[: self.chars])


def describe_skips(counts: dict[str, int], total: int) -> list[str]:
    """Lines like 'skipped 120 (12.0%) candidates because it scores above ...'."""
    lines = []
    for reason in REASONS:
        n = counts.get(reason, 0)
        if n:
            pct = 100.0 * n / total if total else 0.0
            lines.append(
                f"skipped {n} ({pct:.1f}%) of {total} candidates because {EXPLAIN[reason]}"
            )
    return lines
