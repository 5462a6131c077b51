"""Reasoning answers, the verdict repair's cut, ERank's s x P(s), consensus (pure)."""

from __future__ import annotations

import math

import pytest

from rankmill.pointwise import (
    closest_to_mean,
    cut_to_last_sentence,
    forced_verdict_schema,
    majority,
    parse_conclusion,
    score_probability,
    split_reasoning,
)


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("<think>It covers the topic.</think> true", True),
        ("<think>Off topic.</think>\nfalse", False),
        ("The passage answers it.\nVerdict: yes", True),
        ("The passage answers it.\nRelevant: **no**", False),
        ("<think>x</think> Final answer: True.", True),
    ],
)
def test_verdicts_after_reasoning(text, verdict) -> None:
    c = parse_conclusion(text, "verdict")
    assert c.verdict is verdict and c.score is None
    assert "true" not in c.reasoning.lower().split() and "yes" not in c.reasoning.split()


@pytest.mark.parametrize(
    "text",
    [
        "<think>It covers the topic and",
        "The passage is about wings, so the answer is yes because",
        "It mentions yes and no.",
        "<think>ok</think> probably relevant, I think",
        "",
    ],
)
def test_answers_without_a_conclusion(text) -> None:
    assert parse_conclusion(text, "verdict").verdict is None


def test_reasoning_and_verdict_are_kept_apart() -> None:
    c = parse_conclusion("<think>Step one. Step two.</think>\ntrue", "verdict")
    assert c.reasoning == "Step one. Step two." and c.conclusion_text == "true"
    assert split_reasoning("a</think>b") == ("a", "b")


@pytest.mark.parametrize(
    "text,score",
    [
        ("<think>fine</think> Score: 7", 7),
        ("It matches well.\nScore: 10/10", 10),
        ("<think>weak</think> 0", 0),
        ("<think>x</think> Score: 11", None),
        ("It is a 7 out of ten", None),
    ],
)
def test_scores(text, score) -> None:
    assert parse_conclusion(text, "score").score == score


def test_cut_to_last_sentence() -> None:
    assert cut_to_last_sentence("<think>One. Two is clear! Three is cut mid") == (
        "One. Two is clear!"
    )
    assert cut_to_last_sentence("no sentence end here") == "no sentence end here"
    assert cut_to_last_sentence("Version 2.5 is used. It") == "Version 2.5 is used."


def test_forced_schemas() -> None:
    assert forced_verdict_schema()["properties"] == {"relevant": {"type": "boolean"}}
    s = forced_verdict_schema("score")["properties"]["score"]
    assert (s["minimum"], s["maximum"]) == (0, 10)


def _lp(tokens: list[tuple[str, float]]) -> list[dict]:
    return [{"token": t, "logprob": lp} for t, lp in tokens]


def test_score_probability_reads_the_score_tokens() -> None:
    lps = _lp([("Score", -0.1), (":", -0.1), (" 7", math.log(0.6)), (".", -0.2)])
    assert score_probability(lps, 7) == pytest.approx(0.6)
    split = _lp([(":", -0.1), ("1", math.log(0.5)), ("0", math.log(0.8))])
    assert score_probability(split, 10) == pytest.approx(0.4)
    # "7" inside "17" is not the score 7.
    assert score_probability(_lp([("1", -0.1), ("7", -0.1)]), 7) is None
    assert score_probability(None, 3) is None


def test_majority_and_its_ties() -> None:
    assert majority([True, True, False]) is True
    assert majority([True, False]) is False
    assert majority([True, False], [0.9, 0.4]) is True
    with pytest.raises(ValueError):
        majority([])


def test_closest_to_mean_keeps_the_central_sample() -> None:
    # ERank: s x P(s) per sample; the sample nearest the mean is the one kept.
    scores = [7 * 0.9, 3 * 0.5, 8 * 0.7]
    i, mean = closest_to_mean(scores)
    assert mean == pytest.approx(sum(scores) / 3) and i == 2
    assert closest_to_mean([2.0, 4.0]) == (0, 3.0)


def test_consensus_rows_per_pair() -> None:
    from rankmill.stages.label import consensus_rows

    def lab(q, d, s, v, p=None):
        return {"query_id": q, "doc_id": d, "sample_index": s, "verdict": v, "p_yes": p}

    def why(q, d, s, score, text):
        return {"query_id": q, "doc_id": d, "sample_index": s, "score": score, "reasoning": text}

    labels = [lab("q", "a", 0, True, 0.9), lab("q", "a", 1, False, 0.4), lab("q", "a", 2, True)]
    reasons = [
        why("q", "a", 0, 7.2, "r0"),
        why("q", "a", 1, 1.0, "r1"),
        why("q", "a", 2, 5.6, "r2"),
    ]
    (maj,) = consensus_rows(labels, reasons, "majority")
    assert maj["verdict"] is True and maj["kept_sample"] == 0 and maj["reasoning"] == "r0"
    assert maj["agreement"] == pytest.approx(2 / 3) and maj["p_yes"] == pytest.approx(0.65)
    (erank,) = consensus_rows(labels, reasons, "closest_to_mean")
    # mean of s x P(s) = 4.6: sample 2 (5.6) is nearest; its verdict and reasoning are kept
    assert erank["score"] == pytest.approx(4.6) and erank["kept_sample"] == 2
    assert erank["reasoning"] == "r2" and erank["kept_score"] == 5.6
    tie = consensus_rows(
        [lab("q", "b", 0, True, 0.3), lab("q", "b", 1, False, 0.4)], [], "majority"
    )
    assert tie[0]["verdict"] is False and tie[0]["reasoning"] is None
