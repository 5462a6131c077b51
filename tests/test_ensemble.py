"""The ensemble maths: votes -> crowd-kit input -> labels, stopping, agreement, relabeling.

Hand-computed cases first; the last tests are a simulation (simulated judges of known quality
labelling cranfield's judged pairs), marked as such.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rankmill.ensemble import (
    METHODS,
    JudgeModel,
    JudgeSpec,
    PairVotes,
    SimulatedJudge,
    StopRule,
    accuracy_against,
    aggregate,
    ask_adaptively,
    cohen_kappas,
    crowd_input,
    fleiss_kappa,
    judge_votes,
    judge_warnings,
    krippendorff_alpha,
    relabel,
    sample_consistency,
    simulate_answers,
    stop_reason,
    task_id,
    votes_of,
)


def V(task: str, judge: str, sample: int, verdict: bool | None) -> dict:
    return {"task": task, "judge": judge, "sample": sample, "verdict": verdict}


VOTES = [
    # a: j1 says yes, yes, no (-> yes, consistency 2/3); j2 yes; j3 no
    V("a", "j1", 0, True),
    V("a", "j1", 1, True),
    V("a", "j1", 2, False),
    V("a", "j2", 0, True),
    V("a", "j3", 0, False),
    # b: j1 no and one unparseable answer (-> no); j2 no; j3 no
    V("b", "j1", 0, False),
    V("b", "j1", 1, None),
    V("b", "j2", 0, False),
    V("b", "j3", 0, False),
    # c: j1 ties 1-1 (abstains); j2 yes; j3 yes
    V("c", "j1", 0, True),
    V("c", "j1", 1, False),
    V("c", "j2", 0, True),
    V("c", "j3", 0, True),
]


def test_samples_collapse_to_one_judge_vote_by_majority_and_a_tie_abstains():
    jv = judge_votes(VOTES).set_index(["task", "worker"])
    assert jv.loc[("a", "j1"), "label"] == 1
    assert jv.loc[("a", "j1"), "samples"] == 3
    assert jv.loc[("a", "j1"), "consistency"] == pytest.approx(2 / 3)
    assert jv.loc[("b", "j1"), "samples"] == 1  # the unparseable answer is no vote
    assert ("c", "j1") not in jv.index
    ck = crowd_input(VOTES)
    assert list(ck.columns) == ["task", "worker", "label"]
    assert len(ck) == 8
    assert set(ck["label"]) == {0, 1}


def test_majority_vote_posteriors_and_soft_confusion_are_the_hand_computed_ones():
    agg = aggregate(VOTES, "majority_vote")
    p = agg.pairs
    assert p.loc["a", "posterior"] == pytest.approx(2 / 3)
    assert p.loc["b", "posterior"] == pytest.approx(0.0)
    assert p.loc["c", "posterior"] == pytest.approx(1.0)
    assert list(p["label"]) == [1, 0, 1]
    assert p.loc["a", "votes"] == 5 and p.loc["a", "judges"] == 3
    assert p.loc["c", "votes"] == 4 and p.loc["c", "judges"] == 2
    assert p.loc["a", "agreement"] == pytest.approx(2 / 3)
    # only j1 took several samples: its consistency on a (2/3) and b (1 valid sample: no row
    # counts, samples > 1 only)
    assert p.loc["a", "self_consistency"] == pytest.approx(2 / 3)
    assert math.isnan(p.loc["b", "self_consistency"])
    # j3 said no on a (P(relevant) 2/3), no on b (0), yes on c (1):
    # tp = 1, fn = 2/3, fp = 0, tn = 1 + 1/3
    j3 = agg.judges.loc["j3"]
    assert (j3["tp"], j3["fn"], j3["fp"], j3["tn"]) == pytest.approx((1, 2 / 3, 0, 4 / 3))
    assert j3["accuracy"] == pytest.approx((1 + 4 / 3) / 3)
    assert j3["sensitivity"] == pytest.approx(1 / (5 / 3))
    assert j3["specificity"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_agrees_on_unanimous_pairs(method):
    votes = [V(t, j, 0, t.startswith("y")) for t in ("y1", "y2", "n1", "n2") for j in "abc"]
    votes += [V("m", "a", 0, True), V("m", "b", 0, True), V("m", "c", 0, False)]
    agg = aggregate(votes, method, n_iter=20)
    assert agg.pairs.loc[["y1", "y2"], "label"].tolist() == [1, 1]
    assert agg.pairs.loc[["n1", "n2"], "label"].tolist() == [0, 0]
    assert agg.pairs["posterior"].between(0, 1).all()
    assert set(agg.judges.index) == {"a", "b", "c"}
    if method == "glad":
        assert agg.pairs["difficulty"].notna().all()


def test_posterior_given_judge_accuracies():
    m = JudgeModel(prior=0.5, sensitivity={"a": 0.9, "b": 0.6}, specificity={"a": 0.8, "b": 0.7})
    # P(yes|rel) / (P(yes|rel) + P(yes|irr)) = 0.9 / (0.9 + 0.2)
    assert m.posterior({"a": 1}) == pytest.approx(0.9 / 1.1)
    # a yes, b no: 0.9 * 0.4 / (0.9 * 0.4 + 0.2 * 0.7)
    assert m.posterior({"a": 1, "b": 0}) == pytest.approx(0.36 / 0.5)
    assert m.posterior({"a": None}) == pytest.approx(0.5)
    assert m.posterior({"unknown": 1}) == pytest.approx(0.5)
    again = JudgeModel.from_rows(m.rows())
    assert again.posterior({"a": 1, "b": 0}) == pytest.approx(m.posterior({"a": 1, "b": 0}))


def test_model_from_aggregate_smooths_counts():
    votes = [V(f"t{i}", j, 0, i % 2 == 0) for i in range(8) for j in "ab"]
    m = JudgeModel.from_aggregate(aggregate(votes, "majority_vote"), smoothing=1.0)
    # 4 relevant pairs all said yes: (4 + 1) / (4 + 2)
    assert m.sensitivity["a"] == pytest.approx(5 / 6)
    assert m.specificity["b"] == pytest.approx(5 / 6)
    assert m.prior == pytest.approx(0.5)


def test_a_lopsided_calibration_slice_never_labels_a_pair_by_the_prior_alone():
    # 8 calibration pairs, all relevant, two judges that say yes either way: the raw prior is
    # 1, and the judges' votes carry little against it
    votes = [V(f"t{i}", j, 0, True) for i in range(8) for j in "ab"]
    m = JudgeModel.from_aggregate(aggregate(votes, "majority_vote"), smoothing=1.0)
    assert m.prior == pytest.approx(9 / 10)  # (8 + 1) / (8 + 2)
    judges = [JudgeSpec("a"), JudgeSpec("b")]
    st = PairVotes(judges)
    assert stop_reason(st, StopRule(), m) is None  # nothing asked yet: ask the cheapest
    states, reasons = ask_adaptively(
        ["p"], judges, lambda calls: [False for _ in calls], StopRule(), m
    )
    assert states["p"].calls >= 1 and reasons["p"] is not None
    # even where the prior does outweigh every vote left, the cheapest judge is asked once
    lopsided = JudgeModel(prior=0.98, sensitivity={"a": 0.6, "b": 0.6},
                          specificity={"a": 0.5, "b": 0.5})  # fmt: skip
    assert stop_reason(PairVotes(judges), StopRule(min_votes=0), lopsided) == "settled"
    assert stop_reason(PairVotes(judges), StopRule(), lopsided) is None


JUDGES3 = [JudgeSpec("a"), JudgeSpec("b"), JudgeSpec("c")]


def test_majority_stops_once_the_remaining_votes_cannot_change_it():
    st = PairVotes(JUDGES3)
    rule = StopRule()
    assert stop_reason(st, rule) is None
    st.add("a", True)
    assert stop_reason(st, rule) is None  # b and c saying no would win
    st.add("b", True)
    assert stop_reason(st, rule) == "settled"  # c alone cannot outvote two
    st2 = PairVotes(JUDGES3)
    st2.add("a", True)
    st2.add("b", False)
    assert stop_reason(st2, rule) is None
    st2.add("c", False)
    assert stop_reason(st2, rule) == "exhausted"


def test_judges_are_asked_round_by_round_and_stop_sampling_once_fixed():
    judges = [JudgeSpec("a", samples=3), JudgeSpec("b", samples=3)]
    st = PairVotes(judges)
    assert st.next_call() == ("a", 0)
    st.add("a", True)
    assert st.next_call() == ("b", 0)  # every judge's first sample before second ones
    st.add("b", False)
    assert st.next_call() == ("a", 1)
    st.add("a", True)  # 2 of 3 agree: the third cannot change a's vote
    assert st.judge_vote(judges[0]) == (1, True)
    assert st.next_call() == ("b", 1)
    st.add("b", False)
    assert st.next_call() is None  # both fixed
    assert st.next_call(StopRule(full=True)) == ("a", 2)  # calibration asks everything


def test_sample_consistency_inverts_the_share_of_agreeing_sample_pairs():
    # judge a: 3 samples per task, 2 agree on every task -> agreeing ordered pairs 2 of 6,
    # a = 1/3 < 1/2: no better than chance -> c = 0.5. Judge b: unanimous -> c = 1.
    votes = [V(t, "a", s, s < 2) for t in ("t1", "t2") for s in range(3)]
    votes += [V(t, "b", s, True) for t in ("t1", "t2") for s in range(3)]
    votes += [V("t1", "c", 0, True)]  # one sample: no estimate
    cons = sample_consistency(votes)
    assert cons == pytest.approx({"a": 0.5, "b": 1.0})
    # 4 samples, 3 agree: agreeing ordered pairs 3*2 = 6 of 12 -> a = 1/2 -> c = 0.5 + 0
    # 5 samples, 4 agree: 4*3 = 12 of 20 -> a = 0.6 -> c = 0.5 + 0.5 * sqrt(0.2)
    cons = sample_consistency([V("t", "d", s, s < 4) for s in range(5)])
    assert cons["d"] == pytest.approx(0.5 + 0.5 * 0.2**0.5)


def test_predicted_stability_is_exact_for_a_hand_computed_pair():
    # one judge, 3 samples of consistency 0.9, belief right with 0.9 (both classes), prior
    # 0.5, so P(belief yes) = 0.5. Asked once, "yes": the label is 1 now. It ends 0 only if
    # both remaining samples say no. P(belief yes | sample yes) = 0.9 * 0.5 / 0.5 = 0.9; both
    # no: 0.01 given a yes belief, 0.81 given a no belief.
    judges = [JudgeSpec("a", samples=3)]
    # judge-vote accuracy that a belief accuracy of 0.9 gives through 3 samples of c = 0.9
    right = 0.9**3 + 3 * 0.9**2 * 0.1
    acc = 0.9 * right + 0.1 * (1 - right)
    m = JudgeModel(
        prior=0.5, sensitivity={"a": acc}, specificity={"a": acc}, consistency={"a": 0.9}
    )
    st = PairVotes(judges)
    st.add("a", True)
    label, keep = m.predict(st)
    assert label == 1
    assert keep == pytest.approx(1 - (0.9 * 0.01 + 0.1 * 0.81), abs=1e-9)
    assert stop_reason(st, StopRule(confidence=0.9), m) == "confident"
    assert stop_reason(st, StopRule(confidence=0.95), m) is None
    # both remaining samples asked: exhausted, and nothing left to change
    st.add("a", True)
    assert m.predict(st) == (1, 1.0)


def test_confident_stop_needs_a_model_and_the_confidence():
    judges = [JudgeSpec("a"), JudgeSpec("b"), JudgeSpec("c")]
    # a and b are strong (LLR of a vote: log(0.95 / 0.05) = 2.94), so after a's yes, b and c
    # saying no could still win: not settled; but the posterior of yes is 0.95.
    m = JudgeModel(
        prior=0.5,
        sensitivity={"a": 0.95, "b": 0.95, "c": 0.9},
        specificity={"a": 0.95, "b": 0.95, "c": 0.9},
    )
    st = PairVotes(judges)
    st.add("a", True)
    assert m.posterior(st.settled_votes()) == pytest.approx(0.95)
    assert stop_reason(st, StopRule(confidence=0.949), m) == "confident"
    assert stop_reason(st, StopRule(confidence=0.96), m) is None
    assert stop_reason(st, StopRule(confidence=0.9)) is None  # no model: majority only
    assert stop_reason(st, StopRule(confidence=0.5, full=True), m) is None
    assert stop_reason(st, StopRule(confidence=0.99, max_votes=1), m) == "cap"


def test_asking_adaptively_counts_calls_and_matches_full_voting_when_settled():
    judges = [JudgeSpec("cheap", 1, llm=False), JudgeSpec("a", 3), JudgeSpec("b", 3)]
    answers = {
        # everyone says yes: cheap, a twice (fixed), b twice (fixed) -> 5 calls, 4 LLM calls
        "yes": {"cheap": [True], "a": [True, True, True], "b": [True, True, True]},
        # a disagrees with itself and with b: everything is asked
        "mixed": {"cheap": [False], "a": [True, False, True], "b": [False, True, False]},
    }
    rounds: list[int] = []

    def answer(calls):
        rounds.append(len(calls))
        return [answers[t][j][s] for t, j, s in calls]

    states, reasons = ask_adaptively(list(answers), judges, answer, StopRule())
    assert states["yes"].calls == 4
    assert states["yes"].llm_calls() == 3
    assert states["yes"].asked == {"cheap": [True], "a": [True, True], "b": [True]}
    assert reasons["yes"] == "settled"
    assert states["mixed"].calls == 7
    assert reasons["mixed"] == "exhausted"
    assert rounds[0] == 2  # one round asks every open pair at once
    full, _ = ask_adaptively(list(answers), judges, answer, StopRule(full=True))
    assert {t: s.calls for t, s in full.items()} == {"yes": 7, "mixed": 7}
    assert len(votes_of(full)) == 14
    adaptive_labels = aggregate(votes_of(states), "majority_vote").pairs["label"]
    full_labels = aggregate(votes_of(full), "majority_vote").pairs["label"]
    assert adaptive_labels.to_dict() == full_labels.to_dict()


def test_agreement_statistics_on_a_hand_computed_table():
    # two judges, four tasks: agree on 3 of 4. po = 0.75; a says yes 2/4, b says yes 1/4:
    # pe = 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa = (0.75 - 0.5) / 0.5 = 0.5
    a = [1, 1, 0, 0]
    b = [1, 0, 0, 0]
    votes = [V(f"t{i}", "a", 0, bool(x)) for i, x in enumerate(a)]
    votes += [V(f"t{i}", "b", 0, bool(x)) for i, x in enumerate(b)]
    k = cohen_kappas(votes)
    assert k.loc[0, "kappa"] == pytest.approx(0.5)
    assert k.loc[0, "agreement"] == pytest.approx(0.75)
    # Fleiss: p_yes = 3/8, Pe = (3/8)^2 + (5/8)^2 = 34/64; P_i = 1,0,1,1 -> Pbar = 3/4
    assert fleiss_kappa(votes) == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    unanimous = [V(f"t{i}", j, 0, i % 2 == 0) for i in range(6) for j in "abc"]
    assert krippendorff_alpha(unanimous) == pytest.approx(1.0)
    assert krippendorff_alpha(votes) < 1.0


def test_warnings_name_near_duplicate_and_below_chance_judges():
    rng = np.random.default_rng(0)
    truth = {f"t{i}": int(rng.random() < 0.5) for i in range(200)}
    votes = []
    for t, y in truth.items():
        votes.append(V(t, "good", 0, bool(y) if rng.random() < 0.9 else not y))
        votes.append(V(t, "copy", 0, votes[-1]["verdict"]))  # a copy of good
        votes.append(V(t, "other", 0, bool(y) if rng.random() < 0.85 else not y))
        votes.append(V(t, "contrarian", 0, not y if rng.random() < 0.8 else bool(y)))
    agg = aggregate(votes, "dawid_skene")
    found = judge_warnings(cohen_kappas(votes), agg.judges)
    kinds = {(w["kind"], tuple(w["judges"])) for w in found}
    assert ("near_duplicate", ("copy", "good")) in kinds
    assert ("below_chance", ("contrarian",)) in kinds
    assert not any("other" in w["judges"] for w in found)


def test_relabel_decisions_carry_reason_and_posterior():
    rows = [
        # a mined negative the ensemble calls relevant
        {"query_id": "q", "doc_id": "n1", "role": "negative", "label": 1, "posterior": 0.9,
         "confidence": 0.9, "agreement": 1.0, "teacher_score": 8.0, "teacher_verdict": True},
        # a positive it calls irrelevant
        {"query_id": "q", "doc_id": "p1", "role": "positive", "label": 0, "posterior": 0.2,
         "confidence": 0.8, "agreement": 0.67},
        # a negative it agrees with; the teacher disagrees: its score is not a target
        {"query_id": "q", "doc_id": "n2", "role": "negative", "label": 0, "posterior": 0.05,
         "confidence": 0.95, "agreement": 1.0, "teacher_score": 7.0, "teacher_verdict": True},
        # unsure
        {"query_id": "q", "doc_id": "n3", "role": "negative", "label": 1, "posterior": 0.55,
         "confidence": 0.55, "agreement": 0.5},
    ]  # fmt: skip
    d = {x.doc_id: x for x in relabel(rows, "positive", min_confidence=0.6)}
    assert (d["n1"].new_role, d["n1"].reason, d["n1"].posterior) == (
        "positive",
        "negative_judged_relevant",
        0.9,
    )
    assert d["n1"].teacher_score == 8.0
    assert (d["p1"].new_role, d["p1"].reason) == ("dropped", "positive_judged_irrelevant")
    assert d["n2"].new_role == "negative" and d["n2"].reason is None
    assert d["n2"].teacher_score is None and d["n2"].teacher_dropped
    assert d["n3"].rejected and d["n3"].reason == "low_confidence"
    dropped = {x.doc_id: x for x in relabel(rows, "drop", min_agreement=0.6)}
    assert dropped["n1"].new_role == "dropped"
    assert dropped["n3"].reason == "low_agreement"
    # held: nothing changes, nothing is rejected, teacher scores stay; the reason is kept
    held = {x.doc_id: x for x in relabel(rows, "positive", min_confidence=0.6, hold=True)}
    assert all(x.new_role == x.role and not x.rejected and x.reason is None for x in held.values())
    assert {k: x.held for k, x in held.items()} == {
        "n1": "negative_judged_relevant",
        "p1": "positive_judged_irrelevant",
        "n2": "teacher_disagrees",
        "n3": "low_confidence",
    }
    assert held["n2"].teacher_score == 7.0 and not held["n2"].teacher_dropped
    assert held["n1"].teacher_score == 8.0


# -- simulation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cranfield_truth(shared_data) -> dict[str, int]:
    """Simulation ground truth: cranfield's judged-relevant pairs (1) and, per query, three
    times as many unjudged documents drawn with a seed (0), as among mined candidates."""
    from rankmill.stages.ingest import CHECKS, IngestParams, Policies, read_collection

    c = read_collection(
        IngestParams(
            source=str(shared_data / "cranfield"),
            policies=Policies(**{k: "keep" for k in CHECKS}),
        )
    )
    rng = np.random.default_rng(5)
    docs = c.corpus.column("doc_id").to_pylist()
    truth: dict[str, int] = {}
    judged: dict[str, set[str]] = {}
    for r in c.qrels.to_pylist():
        judged.setdefault(r["query_id"], set()).add(r["doc_id"])
        if r["score"] > 0:
            truth[task_id(r["query_id"], r["doc_id"])] = 1
    for q, seen in sorted(judged.items()):
        n_pos = sum(1 for d in seen if truth.get(task_id(q, d)) == 1)
        picks = [d for d in rng.choice(docs, size=4 * n_pos + 8, replace=False) if d not in seen]
        for d in picks[: 3 * n_pos]:
            truth[task_id(q, d)] = 0
    return truth


# One strong judge and four weak ones with opposite biases (a yes-sayer, a no-sayer).
SIM_JUDGES = [
    SimulatedJudge("strong", 0.93, 0.92),
    SimulatedJudge("yes_sayer", 0.80, 0.55),
    SimulatedJudge("no_sayer", 0.50, 0.85),
    SimulatedJudge("weak", 0.65, 0.65),
    SimulatedJudge("weak2", 0.62, 0.70),
]


@pytest.mark.slow
def test_simulation_dawid_skene_recovers_accuracies_and_beats_majority(cranfield_truth):
    """Simulation: judges of known quality label cranfield pairs; Dawid–Skene, from the
    votes alone, recovers each judge's accuracy within 0.05 and labels better than majority
    vote because it weighs the strong judge more."""
    truth = cranfield_truth
    answers = simulate_answers(truth, SIM_JUDGES, seed=11)
    votes = [V(t, j, s, v) for (t, j, s), v in answers.items()]
    ds = aggregate(votes, "dawid_skene")
    empirical = accuracy_against(votes, truth)
    for judge in empirical.index:
        assert abs(ds.judges.loc[judge, "accuracy"] - empirical[judge]) < 0.05, judge
    t = pd.Series(truth)
    acc_ds = (ds.pairs["label"].astype(int) == t.loc[ds.pairs.index]).mean()
    mv = aggregate(votes, "majority_vote")
    acc_mv = (mv.pairs["label"].astype(int) == t.loc[mv.pairs.index]).mean()
    assert acc_ds > acc_mv + 0.02
    assert acc_ds >= empirical["strong"] - 0.01  # at least as good as the best judge


@pytest.mark.slow
def test_simulation_adaptive_stopping_saves_calls_and_keeps_labels(cranfield_truth):
    """Simulation: with accuracies fitted on a calibration slice, adaptive stopping asks far
    fewer calls than full voting, and its labels agree with full voting's on most pairs and
    are as accurate. (Four judges: with three, Dawid–Skene is only just identified and a
    small slice can land it in a poor optimum.)"""
    truth = dict(sorted(cranfield_truth.items())[:2400])
    judges = [
        SimulatedJudge("bi", 0.72, 0.72, llm=False),
        SimulatedJudge("small", 0.80, 0.78, samples=3, consistency=0.8),
        SimulatedJudge("medium", 0.86, 0.85, samples=3, consistency=0.9),
        SimulatedJudge("large", 0.93, 0.92, samples=3, consistency=0.95),
    ]
    specs = [j.spec() for j in judges]
    answers = simulate_answers(truth, judges, seed=3)

    def answer(calls):
        return [answers[c] for c in calls]

    tasks = sorted(truth)
    rng = np.random.default_rng(0)
    calibration = set(rng.choice(tasks, size=300, replace=False).tolist())
    full, _ = ask_adaptively(tasks, specs, answer, StopRule(full=True))
    full_votes = votes_of(full)
    cal_votes = [v for v in full_votes if v["task"] in calibration]
    model = JudgeModel.from_aggregate(aggregate(cal_votes, "dawid_skene"), votes=cal_votes)
    want = {"small": 0.8, "medium": 0.9, "large": 0.95}
    assert model.consistency == pytest.approx(want, abs=0.03)
    rest = [t for t in tasks if t not in calibration]
    states, reasons = ask_adaptively(rest, specs, answer, StopRule(), model)
    adaptive_votes = votes_of(states) + cal_votes
    llm_calls = sum(s.llm_calls() for s in states.values()) + 9 * len(calibration)
    assert llm_calls < 0.6 * 9 * len(tasks)
    assert {"settled", "confident", "exhausted"} <= set(reasons.values())
    a = aggregate(adaptive_votes, "dawid_skene").pairs["label"]
    f = aggregate(full_votes, "dawid_skene").pairs["label"]
    assert (a == f.loc[a.index]).mean() >= 0.95
    # where they differ, full voting is not the better one: both fit Dawid–Skene on noisy
    # votes, and the pairs they split are the ones no judge settles
    t = pd.Series(truth)
    acc_adaptive = (a.astype(int) == t.loc[a.index]).mean()
    acc_full = (f.astype(int) == t.loc[f.index]).mean()
    assert acc_adaptive >= acc_full - 0.01
