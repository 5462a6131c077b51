"""Query synthesis rules: which documents to write queries from, which queries may be
reformulated into keywords, deduplication, the round-trip filter and decontamination (pure:
no Ray, openai or files; rapidfuzz for similarity).

>>> picks = sample_documents(doc_ids, budget=50, seed=13, strata=doc_topics)
>>> kept, dropped = dedup_queries(texts, threshold=92.0, existing=user_queries)
>>> round_trip_rank("d7", retrieved_ids)          # 1-based rank, or None when missed
>>> contaminated(texts, eval_texts, threshold=90.0)
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = [
    "contaminated",
    "dedup_queries",
    "normalize_query",
    "reformulable",
    "round_trip_rank",
    "sample_documents",
]

# Cues of meaning that a bag of keywords would lose: negation ("not", "without"), causality
# ("why", "because", "leads to") and comparison ("better than", "versus", "compared").
_CUES = {
    "negation": r"\b(?:not|no|never|none|nor|without|except|excluding|neither|cannot|can't|"
    r"isn't|aren't|doesn't|don't|didn't|won't|wasn't|weren't|lack(?:s|ing)?|absence)\b",
    "causality": r"\b(?:why|because|cause[sd]?|causing|due to|leads? to|led to|result(?:s|ed)? "
    r"in|effect of|effects of|affect(?:s|ed)?|impact of|reason(?:s)? for|consequen\w*)\b",
    "comparison": r"\b(?:than|versus|vs\.?|compare[sd]?|comparing|comparison|difference"
    r"(?:s)? between|differ(?:s|ent)? from|better|worse|more|less|fewer|faster|slower|"
    r"higher|lower|greater|smaller|larger|rather|instead of|prefer\w*)\b",
}
_CUE_RES = {k: re.compile(v, re.IGNORECASE) for k, v in _CUES.items()}


def normalize_query(text: str) -> str:
    """Lower case, NFKC, punctuation to spaces, whitespace collapsed: the key of exact dedup."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def reformulable(text: str) -> tuple[bool, str | None]:
    """Whether a query may become keywords: (True, None), or (False, the cue that forbids it)."""
    for kind, rx in _CUE_RES.items():
        if rx.search(text):
            return False, kind
    return True, None


def sample_documents(
    doc_ids: Sequence[str],
    budget: int,
    seed: int,
    strata: Sequence[str | None] | None = None,
    exclude: set[str] | None = None,
) -> list[str]:
    """Up to ``budget`` document ids, drawn without replacement with ``np.random`` seeded by
    ``seed``. With ``strata`` (a label per document), every stratum gets a share proportional
    to its size (largest remainders first, at least one while the budget allows), so rare
    strata are not drowned by common ones. The result is in a deterministic order."""
    exclude = exclude or set()
    pool = [(i, d) for i, d in enumerate(doc_ids) if d not in exclude]
    if budget <= 0 or not pool:
        return []
    rng = np.random.default_rng(seed)
    if strata is None:
        idx = rng.permutation(len(pool))[: min(budget, len(pool))]
        return [pool[i][1] for i in sorted(idx)]
    groups: dict[str, list[str]] = defaultdict(list)
    for i, d in pool:
        groups[str(strata[i]) if strata[i] is not None else ""].append(d)
    names = sorted(groups)
    total = len(pool)
    budget = min(budget, total)
    quotas = {g: budget * len(groups[g]) / total for g in names}
    alloc = {g: int(quotas[g]) for g in names}
    # Every stratum gets one before any gets a second, while the budget allows.
    for g in sorted(names, key=lambda g: -len(groups[g])):
        if alloc[g] == 0 and sum(alloc.values()) < budget:
            alloc[g] = 1
    rest = budget - sum(alloc.values())
    for g in sorted(names, key=lambda g: (-(quotas[g] - int(quotas[g])), g)):
        if rest <= 0:
            break
        if alloc[g] < len(groups[g]):
            alloc[g] += 1
            rest -= 1
    picked: list[str] = []
    for g in names:
        members = groups[g]
        take = rng.permutation(len(members))[: min(alloc[g], len(members))]
        picked.extend(members[i] for i in sorted(take))
    order = {d: i for i, d in enumerate(doc_ids)}
    return sorted(picked, key=order.__getitem__)


def dedup_queries(
    texts: Sequence[str],
    threshold: float = 92.0,
    existing: Sequence[str] = (),
) -> tuple[list[int], dict[int, tuple[str, int | None, float]]]:
    """Deduplicate ``texts`` in order: (kept indexes, dropped index -> (reason, the index it
    duplicates or None for an ``existing`` query, similarity)).

    A text is a duplicate when its normalised form equals an earlier one's (``exact``), or
    when rapidfuzz's ``token_sort_ratio`` with an earlier kept text or an existing query is
    at least ``threshold`` (``near``). Earlier texts win, so the order decides who is kept.
    """
    from rapidfuzz import fuzz, process

    seen: dict[str, int | None] = {normalize_query(t): None for t in existing}
    kept_norm: list[str] = list(seen)
    kept_ref: list[int | None] = [None] * len(kept_norm)
    kept: list[int] = []
    dropped: dict[int, tuple[str, int | None, float]] = {}
    for i, t in enumerate(texts):
        n = normalize_query(t)
        if n in seen:
            dropped[i] = ("duplicate_exact", seen[n], 100.0)
            continue
        if kept_norm:
            hit = process.extractOne(
                n, kept_norm, scorer=fuzz.token_sort_ratio, score_cutoff=threshold
            )
            if hit is not None:
                dropped[i] = ("duplicate_near", kept_ref[hit[2]], float(hit[1]))
                continue
        seen[n] = i
        kept_norm.append(n)
        kept_ref.append(i)
        kept.append(i)
    return kept, dropped


def round_trip_rank(source_doc_id: str, retrieved: Sequence[str]) -> int | None:
    """The 1-based rank of the source document among the retrieved ids, None if missed. The
    round-trip filter keeps a synthetic query when this is not None and <= K."""
    for i, d in enumerate(retrieved, start=1):
        if d == source_doc_id:
            return i
    return None


def contaminated(
    texts: Sequence[str], eval_texts: Sequence[str], threshold: float = 90.0
) -> list[tuple[int, float] | None]:
    """Per text: (index of the closest evaluation query, similarity) when it is at least
    ``threshold`` (rapidfuzz ``token_sort_ratio`` of normalised texts: word order does not
    hide a copy; a set ratio would flag every short query whose words an evaluation query
    happens to contain), else None."""
    from rapidfuzz import fuzz, process

    norm_eval = [normalize_query(t) for t in eval_texts]
    out: list[tuple[int, float] | None] = []
    exact = {n: i for i, n in enumerate(norm_eval)}
    for t in texts:
        n = normalize_query(t)
        if n in exact:
            out.append((exact[n], 100.0))
            continue
        hit = (
            process.extractOne(n, norm_eval, scorer=fuzz.token_sort_ratio, score_cutoff=threshold)
            if norm_eval
            else None
        )
        out.append((hit[2], float(hit[1])) if hit is not None else None)
    return out
