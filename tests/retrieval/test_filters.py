"""False-negative filters: every rule on small hand-made candidate lists."""

from __future__ import annotations

import numpy as np
import pytest

from rankmill.retrieval.filters import (
    DuplicateGuard,
    FilterParams,
    absolute_margin_mask,
    describe_skips,
    filter_candidates,
    ids_mask,
    max_score_mask,
    min_score_mask,
    near_duplicate_of_mask,
    near_duplicates_mask,
    relative_margin_mask,
    similarity_mask,
)

OFF = {
    "max_relative_score": None,
    "duplicate_ratio": None,
}


def test_relative_margin_is_the_positive_aware_rule():
    scores = np.array([0.80, 0.76, 0.75, 0.5])
    # pos 0.8, ratio 0.95 -> threshold 0.76: strictly above is skipped
    assert list(relative_margin_mask(scores, 0.8, 0.95)) == [True, False, False, False]
    # a negative positive score must not raise the bar above the positive itself
    assert list(relative_margin_mask(np.array([-0.1, -0.2, -0.3]), -0.2, 0.95)) == [
        True,
        True,
        False,
    ]


def test_absolute_max_min_and_similarity_masks():
    s = np.array([0.9, 0.7, 0.2])
    assert list(absolute_margin_mask(s, 0.8, 0.05)) == [True, False, False]
    assert list(max_score_mask(s, 0.8)) == [True, False, False]
    assert list(min_score_mask(s, 0.3)) == [False, False, True]
    assert list(similarity_mask(np.array([0.95, 0.5]), 0.9)) == [True, False]
    assert list(ids_mask(["a", "b", "c"], {"b"})) == [False, True, False]


def test_near_duplicate_rules():
    texts = ["the cat sat on the mat", "the cat sat on the mat!", "a dog barked"]
    assert list(near_duplicate_of_mask(texts, ["The cat sat on the mat"], 90)) == [
        True,
        True,
        False,
    ]
    assert list(near_duplicate_of_mask(texts, [], 90)) == [False, False, False]
    # each other: the first of a cluster stays, later copies go
    assert list(near_duplicates_mask(texts + ["the cat sat on the mat"], 95)) == [
        False,
        True,
        False,
        True,
    ]
    # only the leading characters are compared
    assert list(near_duplicate_of_mask(["abcdef-xyz"], ["abcdef-123"], 100, chars=6)) == [True]


def test_duplicate_guard_compares_only_accepted_texts():
    g = DuplicateGuard(95)
    assert not g.is_duplicate("alpha beta gamma")
    g.accept("alpha beta gamma")
    assert g.is_duplicate("alpha beta gamma.")
    assert not g.is_duplicate("something else entirely")


def test_filter_candidates_charges_each_skip_to_its_first_rule():
    ids = ["pos", "ex", "hi", "close", "dup", "ok1", "ok2"]
    scores = np.array([0.9, 0.5, 0.99, 0.79, 0.3, 0.4, 0.2])
    texts = ["P text", "x", "y", "z", "positive passage text", "ok one", "ok two"]
    out = filter_candidates(
        ids,
        scores,
        FilterParams(max_score=0.95, duplicate_ratio=90),
        positive_ids={"pos"},
        positive_scores=[0.8],
        excluded_ids={"ex", "hi"},  # "hi" is excluded first, not charged to max_score
        texts=texts,
        positive_texts=["positive passage text."],
    )
    assert [ids[i] for i in out.kept] == ["ok1", "ok2"]
    assert out.counts() == {
        "positive": 1,
        "excluded": 2,
        "relative_margin": 1,
        "near_duplicate_of_positive": 1,
    }
    assert sum(out.counts().values()) + len(out.kept) == len(ids)


def test_filter_candidates_uses_the_lowest_positive_score():
    ids = ["a", "b", "c"]
    scores = np.array([0.7, 0.55, 0.3])
    out = filter_candidates(
        ids, scores, FilterParams(duplicate_ratio=None), positive_ids=[], positive_scores=[0.9, 0.6]
    )
    # threshold 0.6 - 0.05*0.6 = 0.57
    assert [ids[i] for i in out.kept] == ["b", "c"]


def test_each_filter_can_be_turned_off():
    ids = ["a", "b"]
    scores = np.array([0.99, 0.98])
    out = filter_candidates(
        ids,
        scores,
        FilterParams(**OFF),
        positive_ids=["x"],
        positive_scores=[0.5],
        texts=["t", "t"],
    )
    assert list(out.kept) == [0, 1]
    out = filter_candidates(
        ids,
        scores,
        FilterParams(**OFF, use_exclusions=False),
        positive_ids=[],
        excluded_ids=["a"],
    )
    assert list(out.kept) == [0, 1]
    out = filter_candidates(
        ids,
        scores,
        FilterParams(**OFF, absolute_margin=0.001, max_positive_similarity=0.9),
        positive_ids=[],
        positive_scores=[1.0],
        positive_sims=np.array([0.95, 0.1]),
    )
    assert out.counts() == {"similar_to_positive": 1}
    assert list(out.kept) == [1]


def test_filter_candidates_validates_shapes_and_params():
    with pytest.raises(ValueError):
        filter_candidates(["a"], np.array([0.1, 0.2]), FilterParams(), positive_ids=[])
    with pytest.raises(ValueError):
        FilterParams(max_relative_score=1.5)
    with pytest.raises(ValueError):
        FilterParams(unknown=1)


def test_describe_skips_says_how_many_and_why():
    lines = describe_skips({"relative_margin": 25, "positive": 1}, 100)
    assert lines[0].startswith("skipped 1 (1.0%) of 100 candidates because it is a positive")
    assert "skipped 25 (25.0%)" in lines[1] and "max_relative_score" in lines[1]


def test_duplicate_guard_names_the_rule_a_pick_breaks():
    g = DuplicateGuard(90, references=["the positive passage about bees"])
    assert g.reason("the positive passage about bees!") == "near_duplicate_of_positive"
    assert g.reason("volcanoes erupt") is None
    g.accept("volcanoes erupt")
    assert g.reason("volcanoes erupt.") == "near_duplicate"
    assert g.reason("bread dough rises") is None
