"""Listwise ranking by a teacher LLM: parsing and repairing its answers, sliding windows over a
candidate pool, and NDCG@10 for the self-consistency filter (pure: no Ray, openai or files).

A window shows the teacher ``n`` passages labelled ``[1]..[n]``; it answers
``<think>...</think><answer>[3] > [1] > ...</answer>``. :func:`parse_ranking` turns that into
a full permutation of the window, repairing what can be repaired and counting every repair::

    parsed = parse_ranking(text, n=20, min_ranked=10)
    if parsed.reject: ...                      # too few ranked, no answer, ...
    parsed.order                               # 0-based window positions, best first

:class:`SlidingWindows` walks windows over a pool back to front (RankGPT, RankZephyr,
ReasonRank): window 20, step 10 over the top 100 carries the best passages forward, so one
pass puts the 10 best at the top in the teacher's order. It is a state machine so that a
stage can ask every query's next window in one batch of LLM calls::

    sw = SlidingWindows(doc_ids, window=20, step=10, depth=100)
    while (w := sw.next_window()) is not None:
        sw.apply(w, permutation_from_teacher(w.doc_ids))
    sw.order                                   # the final ranking
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ParsedRanking",
    "SlidingWindows",
    "Window",
    "ndcg_at_k",
    "parse_ranking",
    "window_bounds",
]

_THINK_END = re.compile(r"</\s*think\s*>", re.IGNORECASE)
_THINK_START = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_ANSWER = re.compile(r"<\s*answer\s*>(.*?)(?:<\s*/\s*answer\s*>|$)", re.IGNORECASE | re.DOTALL)
# Brackets a model may write instead of ASCII ones (full-width, lenticular, CJK).
_BRACKETS = str.maketrans({"［": "[", "］": "]", "【": "[", "】": "]", "〔": "[", "〕": "]"})
_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_BARE = re.compile(r"(?<![\w.])(\d+)(?![\w.])")


@dataclass
class ParsedRanking:
    """A window's ranking: ``order`` holds 0-based positions of the window, best first, and is
    a full permutation unless ``reject`` is set. ``repairs`` counts each repair by kind."""

    order: list[int]
    ranked: int  # how many ids the answer itself ranked (before appending the missing ones)
    repairs: dict[str, int] = field(default_factory=dict)
    reject: str | None = None
    answer: str = ""  # the part of the text the ranking was read from


def _ascii_digits(text: str) -> tuple[str, int]:
    """Map every Unicode decimal digit to its ASCII digit; (text, how many were mapped)."""
    out, mapped = [], 0
    for ch in text:
        if ch.isdecimal() and not ch.isascii():
            out.append(str(unicodedata.decimal(ch)))
            mapped += 1
        else:
            out.append(ch)
    return "".join(out), mapped


def parse_ranking(text: str | None, n: int, min_ranked: int = 1) -> ParsedRanking:
    """Parse a ranking of ``n`` passages labelled ``[1]..[n]`` and repair it.

    - text up to the last ``</think>`` is reasoning and is dropped; a ``<think>`` that never
      closes is reasoning with no answer (reject ``think_without_answer``);
    - inside ``<answer>...</answer>`` when present, else the whole rest;
    - Unicode digits and full-width brackets are mapped to ASCII (``unicode_digits``);
    - ``[i]`` labels are read; with none, bare numbers are (``unbracketed``);
    - a repeated id keeps its first place (``duplicates``); ids outside 1..n are dropped
      (``unknown_ids``);
    - fewer than ``min_ranked`` distinct known ids: reject ``too_few_ranked`` (``no_ranking``
      when there are none at all);
    - ids the answer left out are appended in their window order (``missing_appended``).
    """
    repairs: Counter[str] = Counter()
    if text is None or not text.strip():
        return ParsedRanking([], 0, {}, "empty_answer")
    body = text
    ends = list(_THINK_END.finditer(body))
    if ends:
        body = body[ends[-1].end() :]
    elif _THINK_START.search(body) and not _ANSWER.search(body):
        return ParsedRanking([], 0, {}, "think_without_answer")
    m = _ANSWER.search(body)
    if m:
        body = m.group(1)
    body = body.translate(_BRACKETS)
    body, mapped = _ascii_digits(body)
    if mapped:
        repairs["unicode_digits"] += mapped
    labels = [int(x) for x in _BRACKETED.findall(body)]
    if not labels:
        labels = [int(x) for x in _BARE.findall(body)]
        if labels:
            repairs["unbracketed"] += 1
    order: list[int] = []
    seen: set[int] = set()
    for label in labels:
        if not 1 <= label <= n:
            repairs["unknown_ids"] += 1
            continue
        if label in seen:
            repairs["duplicates"] += 1
            continue
        seen.add(label)
        order.append(label - 1)
    ranked = len(order)
    if ranked == 0:
        return ParsedRanking([], 0, dict(repairs), "no_ranking", body.strip())
    if ranked < min(min_ranked, n):
        return ParsedRanking(order, ranked, dict(repairs), "too_few_ranked", body.strip())
    missing = [i for i in range(n) if i + 1 not in seen]
    if missing:
        repairs["missing_appended"] += len(missing)
        order.extend(missing)
    return ParsedRanking(order, ranked, dict(repairs), None, body.strip())


def window_bounds(n: int, window: int = 20, step: int = 10) -> list[tuple[int, int]]:
    """``[start, end)`` of each window over ``n`` items, back to front; the last one starts at 0.

    Unlike a loop that stops once ``start`` would go below 0, the front of the list is always
    covered: the last window is clamped to start at 0.
    """
    if window < 2 or step < 1:
        raise ValueError("window must be >= 2 and step >= 1")
    if n <= 1:
        return []  # nothing to order
    if n <= window:
        return [(0, n)]
    bounds = []
    end = n
    while True:
        start = max(0, end - window)
        bounds.append((start, end))
        if start == 0:
            break
        end -= step
    return bounds


@dataclass(frozen=True)
class Window:
    """One window to rank: its pass, its index within the pass, and the ids in input order."""

    pass_index: int
    index: int
    start: int
    end: int
    doc_ids: tuple[str, ...]


class SlidingWindows:
    """Back-to-front sliding windows over the top ``depth`` of a ranking.

    ``passes`` > 1 repeats the walk until a pass changes nothing (or the passes run out): a
    consistent teacher then sorts the whole depth, 10 more places settled per pass.
    """

    def __init__(
        self,
        doc_ids: Sequence[str],
        window: int = 20,
        step: int = 10,
        depth: int = 100,
        passes: int = 1,
    ):
        if step >= window:
            raise ValueError("step must be smaller than window, or windows do not overlap")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("doc_ids must be distinct")
        self.head = list(doc_ids[:depth])
        self.tail = list(doc_ids[depth:])  # below the depth: kept in their order, unranked
        self.window, self.step, self.passes = window, step, passes
        self._bounds = window_bounds(len(self.head), window, step)
        self._pass = 0
        self._next = 0
        self._changed = False
        self._pending: Window | None = None
        self.log: list[tuple[Window, tuple[str, ...]]] = []  # (window, its output order)

    @property
    def order(self) -> list[str]:
        return self.head + self.tail

    @property
    def done(self) -> bool:
        return self._pass >= self.passes or not self._bounds

    def next_window(self) -> Window | None:
        """The next window to rank (the same one again until it is applied), or None at the end."""
        if self._pending is not None:
            return self._pending
        if self.done:
            return None
        start, end = self._bounds[self._next]
        self._pending = Window(self._pass, self._next, start, end, tuple(self.head[start:end]))
        return self._pending

    def apply(self, window: Window, permutation: Sequence[int]) -> None:
        """Reorder ``window`` by ``permutation`` (0-based window positions, best first)."""
        if window != self._pending:
            raise ValueError("apply() takes the window next_window() returned")
        size = window.end - window.start
        if sorted(permutation) != list(range(size)):
            raise ValueError(f"not a permutation of {size} positions: {list(permutation)}")
        new = tuple(window.doc_ids[i] for i in permutation)
        if new != window.doc_ids:
            self._changed = True
        self.head[window.start : window.end] = new
        self.log.append((window, new))
        self._pending = None
        self._next += 1
        if self._next == len(self._bounds):
            self._pass += 1
            self._next = 0
            if not self._changed:
                self._pass = self.passes  # a pass that changed nothing: the order is stable
            self._changed = False

    def skip(self, window: Window) -> None:
        """Leave ``window`` in its input order (its answer was rejected)."""
        self.apply(window, list(range(window.end - window.start)))


def ndcg_at_k(
    ranking: Sequence[str], relevance: Mapping[str, int], k: int = 10, query_id: str = "q"
) -> float | None:
    """NDCG@k of ``ranking`` (best first) against graded ``relevance`` (doc_id -> grade >= 0),
    computed by ir-measures (trec_eval's definition). None when nothing is relevant: the
    metric is undefined there, and a 0 would read as a bad ranking."""
    import ir_measures
    from ir_measures import nDCG

    if not any(g > 0 for g in relevance.values()):
        return None
    qrels = [ir_measures.Qrel(query_id, d, int(g)) for d, g in relevance.items()]
    n = len(ranking)
    # Scores strictly decreasing with rank: trec_eval sorts by score, so ties would reorder.
    run = [ir_measures.ScoredDoc(query_id, d, float(n - i)) for i, d in enumerate(ranking)]
    value = ir_measures.calc_aggregate([nDCG @ k], qrels, run)[nDCG @ k]
    return float(value)
