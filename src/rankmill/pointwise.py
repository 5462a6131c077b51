"""Pointwise teacher answers: reasoning plus a verdict (Rank1) or a 0-10 score (ERank), the
repair of an answer that reasoned but never concluded, and consensus over k samples (pure).

An answer is ``<think>reasoning</think>`` (or plain reasoning) followed by the conclusion:
``true``/``false`` (also yes/no, "Relevant: yes") or ``Score: 7``. :func:`split_reasoning`
keeps the reasoning and the conclusion apart, so data with and without reasoning can be
exported from the same labels.

When the answer stops without a conclusion (cut at ``max_tokens``, or the model wandered
off), Rank1's repair applies: cut the reasoning back to its last full sentence
(:func:`cut_to_last_sentence`) and ask once more with the verdict forced by a JSON schema
(:func:`forced_verdict_schema`); the stage counts every such repair.

ERank's score is ``s * P(s)``, with ``P(s)`` the probability of the score's tokens read from
logprobs (:func:`score_probability`). Consensus over samples: ``majority`` for verdicts (ties
go to the mean P(yes), then to "not relevant"), ``closest_to_mean`` for scores (the sample
whose score is nearest the mean is the one kept, ties to the lowest sample index).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Conclusion",
    "closest_to_mean",
    "cut_to_last_sentence",
    "forced_verdict_schema",
    "majority",
    "parse_conclusion",
    "score_probability",
    "split_reasoning",
]

_THINK_END = re.compile(r"</\s*think\s*>", re.IGNORECASE)
_THINK_TAG = re.compile(r"</?\s*think\s*>", re.IGNORECASE)
_VERDICT_TAIL = re.compile(
    r"(?:(?:final\s+)?(?:verdict|answer|relevant|relevance|judg(?:e)?ment)\s*[:=]?\s*)?"
    r"[\"'*`\[(]*\s*(true|false|yes|no)\s*[\"'*`\])]*\s*[.!]?\s*$",
    re.IGNORECASE,
)
_SCORE_TAIL = re.compile(
    r"(?:(?:final\s+)?(?:score|rating|relevance)\s*[:=]?\s*)[\"'*`\[(]*\s*(\d{1,2})"
    r"(?:\s*/\s*10)?\s*[\"'*`\])]*\s*[.!]?\s*$",
    re.IGNORECASE,
)
_BARE_SCORE = re.compile(r"^[\"'*`\[(]*\s*(\d{1,2})(?:\s*/\s*10)?\s*[\"'*`\])]*\s*[.!]?\s*$")
_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


@dataclass
class Conclusion:
    """What an answer concluded: a verdict, or a 0-10 score; both None when it did not."""

    reasoning: str
    verdict: bool | None = None
    score: int | None = None
    conclusion_text: str = ""


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, rest): the text before the last ``</think>`` and after it; with no
    ``</think>``, everything is reasoning until the conclusion is found at the end."""
    ends = list(_THINK_END.finditer(text))
    if ends:
        reasoning = _THINK_TAG.sub("", text[: ends[-1].start()]).strip()
        return reasoning, text[ends[-1].end() :].strip()
    return _THINK_TAG.sub("", text).strip(), ""


def parse_conclusion(text: str | None, kind: str = "verdict") -> Conclusion:
    """Read the conclusion at the end of a reasoning answer. ``kind`` is ``verdict``
    (true/false, yes/no) or ``score`` (an integer 0-10). The conclusion must be the last thing
    the answer says (after ``</think>`` when there is one); anything else concludes nothing."""
    if text is None:
        return Conclusion("")
    reasoning, rest = split_reasoning(text)
    # Without </think>, the conclusion is the end of the text itself.
    tail_source = rest if rest else reasoning
    tail = tail_source.strip().splitlines()[-1] if tail_source.strip() else ""
    if kind == "score":
        m = _SCORE_TAIL.search(tail) or (_BARE_SCORE.match(tail) if rest else None)
        if m and 0 <= int(m.group(1)) <= 10:
            if not rest:
                reasoning = reasoning[: len(reasoning) - len(tail)].rstrip()
            return Conclusion(reasoning, score=int(m.group(1)), conclusion_text=m.group(0).strip())
        return Conclusion(reasoning)
    m = _VERDICT_TAIL.search(tail)
    # Without </think>, a bare "yes." ending a sentence of reasoning is not a verdict: only a
    # line that is the verdict alone (optionally labelled) counts.
    if m and (rest or m.start() == 0):
        if not rest:
            reasoning = reasoning[: len(reasoning) - len(tail)].rstrip()
        word = m.group(1).lower()
        return Conclusion(
            reasoning, verdict=word in ("true", "yes"), conclusion_text=m.group(0).strip()
        )
    return Conclusion(reasoning)


def cut_to_last_sentence(text: str) -> str:
    """``text`` cut after its last complete sentence (., ! or ? followed by a space or the end);
    the whole text when it has no sentence end (a reasoning of one broken sentence is kept)."""
    text = _THINK_TAG.sub("", text).strip()
    last = None
    for m in _SENTENCE_END.finditer(text):
        last = m
    if last is None:
        return text
    return text[: last.end()].strip()


def forced_verdict_schema(kind: str = "verdict") -> dict[str, Any]:
    """The JSON schema that forces a conclusion: ``{"relevant": bool}`` or ``{"score": 0..10}``."""
    if kind == "score":
        prop: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 10}
        name = "score"
    else:
        prop, name = {"type": "boolean"}, "relevant"
    return {
        "type": "object",
        "properties": {name: prop},
        "required": [name],
        "additionalProperties": False,
    }


def score_probability(logprobs: Sequence[dict[str, Any]] | None, score: int) -> float | None:
    """P(score) from the logprobs of the answer's tokens: the product of the probabilities of
    the last run of consecutive tokens that spells the score (``"10"`` may be one token or two).
    None when no such run is found."""
    if not logprobs:
        return None
    target = str(score)
    toks = [
        (re.sub(r"\s", "", str(p.get("token") or "")), p.get("logprob"))
        for p in logprobs
        if isinstance(p, dict)
    ]
    for end in range(len(toks), 0, -1):
        acc, total = "", 0.0
        for start in range(end - 1, -1, -1):
            tok, lp = toks[start]
            if lp is None:
                break
            acc = tok + acc
            total += float(lp)
            if acc == target:
                # The run must stand alone: no digit right before it (e.g. "7" inside "17").
                before = toks[start - 1][0] if start > 0 else ""
                if not before[-1:].isdigit():
                    return math.exp(total)
                break
            if not target.endswith(acc):
                break
    return None


def majority(verdicts: Sequence[bool], p_yes: Sequence[float | None] | None = None) -> bool:
    """The majority verdict; a tie goes to the mean P(yes) (>= 0.5), then to False."""
    if not verdicts:
        raise ValueError("no verdicts")
    yes = sum(1 for v in verdicts if v)
    no = len(verdicts) - yes
    if yes != no:
        return yes > no
    probs = [p for p in (p_yes or []) if p is not None]
    if probs:
        return sum(probs) / len(probs) > 0.5
    return False


def closest_to_mean(scores: Sequence[float]) -> tuple[int, float]:
    """(index of the score nearest the mean, the mean); ties go to the lowest index."""
    if not scores:
        raise ValueError("no scores")
    mean = sum(scores) / len(scores)
    best = min(range(len(scores)), key=lambda i: (abs(scores[i] - mean), i))
    return best, mean
