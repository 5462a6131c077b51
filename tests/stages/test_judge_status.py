"""`rankmill status` on a real judge run: its votes, calls saved and agreement are the ones
the stage's tables hold. The LLM judges talk to the fake OpenAI server over loopback, the
model judge is the real MiniLM."""

from __future__ import annotations

import json
from collections import Counter

import pytest


@pytest.mark.slow
def test_status_shows_the_judge_votes_calls_saved_and_agreement(tmp_path, repo, ray_session):
    from rankmill.manifest import RunDir
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner
    from rankmill.status import judge_lines, run_status
    from tests.fixtures.cli import finish
    from tests.fixtures.openai_server import FakeOpenAIServer
    from tests.fixtures.pairs import JUDGES, judge_pipeline

    with FakeOpenAIServer(answer_mode="yesno") as srv:
        judge = {"pairs_from": "candidates", "calibration_pairs": 6, "rows_per_unit": 6,
                 "judges": JUDGES}  # fmt: skip
        raw = judge_pipeline(srv.base_url, "judge-status", 11, judge, source={"pool_size": 3})
        run_dir = tmp_path / "run"
        Runner(validate_pipeline(raw), str(run_dir)).run()
        sent = srv.completed()

    rd = RunDir(str(run_dir))
    votes = rd.read_table("judge", "votes").to_pylist()
    judgments = rd.read_table("judge", "judgments").to_pylist()
    agreement = {r["judge_b"]: r for r in rd.read_table("judge", "agreement").to_pylist()}
    llm_votes = sum(1 for v in votes if v["kind"] == "llm")
    assert llm_votes == sent

    st = {s["stage"]: s for s in run_status(str(run_dir))["stages"]}
    assert st["source"]["judge"] is None
    j = st["judge"]["judge"]
    full = 4 * len(judgments)  # judge a: 3 samples, judge b: 1, on every pair
    assert j["votes"] == len(votes) and j["pairs"] == len(judgments) == 18
    assert j["llm_calls"] == llm_votes and j["llm_calls_full"] == full
    assert j["calls_saved"] == full - llm_votes > 0
    assert j["calls_saved_share"] == pytest.approx((full - llm_votes) / full, abs=1e-4)
    # the share the stage's finalize step wrote agrees with the units' counts
    assert j["calls_saved_share"] == pytest.approx(st["judge"]["extra"]["calls_saved_share"])
    agree = [x["agreement"] for x in judgments if x["agreement"] is not None]
    assert j["mean_agreement"] == pytest.approx(sum(agree) / len(agree), abs=1e-4)
    assert j["fleiss_kappa"] == pytest.approx(agreement["fleiss_kappa"]["kappa"], abs=1e-4)
    assert j["krippendorff_alpha"] == pytest.approx(
        agreement["krippendorff_alpha"]["kappa"], abs=1e-4
    )
    assert j["stops"] == dict(Counter(x["stop_reason"] for x in judgments))

    # as a user runs it (exit 0: complete)
    shown = finish(["status", str(run_dir)], repo)
    calls, agree_line = judge_lines(j)
    assert f"  judge: {calls}\n" in shown and f"  judge: {agree_line}\n" in shown
    share = (full - llm_votes) / full
    assert (
        f"LLM calls {llm_votes} of {full} for full voting ({full - llm_votes} saved, {share:.0%})"
        in calls
    )
    assert f"Fleiss' κ {agreement['fleiss_kappa']['kappa']:.2f}" in agree_line
    assert "calls_saved" not in shown  # shown once, in the judge's lines

    as_json = finish(["status", str(run_dir), "--json"], repo)
    by_stage = {s["stage"]: s for s in json.loads(as_json)["stages"]}
    assert by_stage["judge"]["judge"] == j
