"""Sampling, reformulation rules, dedup, round-trip and decontamination (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from rankmill.synthesis import (
    contaminated,
    dedup_queries,
    normalize_query,
    reformulable,
    round_trip_rank,
    sample_documents,
)


def test_sampling_is_seeded_within_budget_and_excludes() -> None:
    ids = [f"d{i}" for i in range(50)]
    a = sample_documents(ids, 10, seed=1)
    assert a == sample_documents(ids, 10, seed=1) and len(set(a)) == 10
    assert a != sample_documents(ids, 10, seed=2)
    assert sample_documents(ids, 100, seed=1) == ids
    assert not set(sample_documents(ids, 10, seed=1, exclude={"d0", "d1"})) & {"d0", "d1"}
    assert sample_documents(ids, 0, seed=1) == []


def test_stratified_sampling_gives_every_stratum_its_share() -> None:
    ids = [f"d{i}" for i in range(100)]
    strata = ["big"] * 80 + ["mid"] * 18 + ["rare"] * 2
    picks = sample_documents(ids, 10, seed=3, strata=strata)
    by = Counter(strata[ids.index(d)] for d in picks)
    # Proportional shares 8 / 1.8 / 0.2: the rare stratum still gets one.
    assert len(picks) == 10 and by == {"big": 8, "mid": 1, "rare": 1}


@pytest.mark.parametrize(
    "text,ok,cue",
    [
        ("flutter of swept wings at transonic speed", True, None),
        ("what is the boundary layer thickness on a flat plate", True, None),
        ("boundary layers without pressure gradient", False, "negation"),
        ("why does the shock wave detach", False, "causality"),
        ("effect of heat transfer on skin friction", False, "causality"),
        ("is a swept wing better than a delta wing", False, "comparison"),
    ],
)
def test_reformulation_skips_negation_causality_comparison(text, ok, cue) -> None:
    assert reformulable(text) == (ok, cue)


def test_dedup_exact_then_near_and_against_existing() -> None:
    texts = [
        "What is wing flutter?",
        "what is  wing flutter",
        "What is the flutter of a wing?",
        "heat transfer in hypersonic flow",
        "Heat transfer in a hypersonic flow",
        "user query here",
    ]
    kept, dropped = dedup_queries(texts, threshold=90, existing=["User query, here!"])
    assert kept == [0, 2, 3]
    assert dropped[1] == ("duplicate_exact", 0, 100.0)
    assert dropped[4][0] == "duplicate_near" and dropped[4][1] == 3 and dropped[4][2] >= 90
    assert dropped[5] == ("duplicate_exact", None, 100.0)
    assert normalize_query(" Ｗhat  IS\tit? ") == "what is it"


def test_round_trip_rank() -> None:
    assert round_trip_rank("d3", ["d1", "d3", "d2"]) == 2
    assert round_trip_rank("d9", ["d1", "d3"]) is None


def test_decontamination_flags_copies_and_reorderings_only() -> None:
    eval_q = ["What is the effect of sweep on flutter speed?", "laminar flow on cones"]
    got = contaminated(
        [
            "what is the effect of sweep on flutter speed",
            "flow on cones laminar",
            "flutter",
            "turbulent jets in still air",
        ],
        eval_q,
        threshold=90,
    )
    assert got[0] == (0, 100.0) and got[1][0] == 1
    assert got[2] is None and got[3] is None
