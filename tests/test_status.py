"""What `rankmill status` makes of a judge stage's counters (a real judge run is checked in
tests/stages/test_judge_status.py)."""

from __future__ import annotations

import pytest

from rankmill.manifest import Counters
from rankmill.status import judge_lines, judge_summary


def _judge_counters() -> Counters:
    # Two units (a calibration one asks everything, an adaptive one saves calls) and the
    # finalize step, summed the way status sums them.
    total = Counters()
    total.add(
        Counters(
            extra={"votes": 24.0, "llm_calls_full": 16.0, "calls_saved": 0.0, "stop:exhausted": 4}
        )
    )
    total.add(
        Counters(
            extra={
                "votes": 30.0,
                "llm_calls_full": 32.0,
                "calls_saved": 10.0,
                "stop:settled": 5.0,
                "stop:confident": 3.0,
                "bad_answers": 2.0,
            }
        )
    )
    total.add(
        Counters(
            extra={
                "calls_saved_share": 0.2083,
                "mean_agreement": 0.8125,
                "fleiss_kappa": 0.4375,
                "krippendorff_alpha": -0.05,
                "relabel:negative_relevant": 1.0,
            }
        )
    )
    return total


def test_judge_summary_counts_calls_against_full_voting():
    j = judge_summary(_judge_counters().extra)
    assert j is not None
    assert j["votes"] == 54 and j["pairs"] == 12
    assert j["llm_calls_full"] == 48 and j["calls_saved"] == 10 and j["llm_calls"] == 38
    assert j["calls_saved_share"] == pytest.approx(10 / 48, abs=1e-4)
    assert j["stops"] == {"confident": 3, "exhausted": 4, "settled": 5}
    assert (j["mean_agreement"], j["fleiss_kappa"], j["krippendorff_alpha"]) == (
        0.8125,
        0.4375,
        -0.05,
    )
    assert j["bad_answers"] == 2
    calls, agree = judge_lines(j)
    assert calls == (
        "54 votes on 12 pairs; LLM calls 38 of 48 for full voting (10 saved, 21%); bad answers 2"
    )
    assert agree == (
        "agreement 0.81, Fleiss' κ 0.44, Krippendorff's α -0.05; "
        "stopped: confident 3, exhausted 4, settled 5"
    )


def test_judge_summary_before_aggregation_and_for_other_stages():
    units_only = {"votes": 6.0, "llm_calls_full": 0.0, "calls_saved": 0.0, "stop:exhausted": 2.0}
    j = judge_summary(units_only)
    assert j is not None and j["calls_saved_share"] is None and j["mean_agreement"] is None
    assert judge_lines(j) == [
        "6 votes on 2 pairs; LLM calls 0 of 0 for full voting (0 saved)",
        "agreement not aggregated yet; stopped: exhausted 2",
    ]
    assert judge_summary({"negatives": 168.0, "queries": 42.0}) is None
