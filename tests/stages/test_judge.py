"""The judge stage: pairs, calibration then adaptive phases, aggregation, relabeling, reports.

The LLM judges talk to the fake OpenAI server over loopback (its "yesno" mode answers yes when
the prompt's user text has an even number of words), the model judge is the real MiniLM."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rankmill.stages.judge import (
    JudgeParams,
    build_judge_pairs,
    relabeled_negatives,
)
from tests.fixtures.pairs import JUDGES, judge_pipeline


def _corpus() -> pa.Table:
    return pa.table(
        {"doc_id": ["d1", "d2", "d3"], "title": ["A", None, "C"], "text": ["one", "two", "three"]}
    )


def _queries() -> pa.Table:
    return pa.table({"query_id": ["q1"], "text": ["question"], "source": ["user"],
                     "source_doc_id": [None]})  # fmt: skip


def test_pairs_from_negatives_carry_roles_and_texts():
    negs = pa.table(
        {"query_id": ["q1"], "positive_ids": [["d1"]], "negative_ids": [["d2", "d3", "d1"]]}
    )
    rows = build_judge_pairs(_corpus(), _queries(), negatives=negs)
    assert [(r["doc_id"], r["role"]) for r in rows] == [
        ("d1", "positive"),
        ("d2", "negative"),
        ("d3", "negative"),
    ]
    assert rows[0]["doc_title"] == "A" and rows[1]["doc_text"] == "two"
    qrels = pa.table({"query_id": ["q1", "q1"], "doc_id": ["d3", "d2"], "score": [0, 2]})
    rows = build_judge_pairs(_corpus(), _queries(), qrels=qrels)
    assert [(r["doc_id"], r["role"]) for r in rows] == [("d2", "positive"), ("d3", "negative")]
    two = pa.table({"query_id": ["q2", "q1"], "doc_id": ["d1", "d2"], "score": [1, 1]})
    rows = build_judge_pairs(_corpus(), _queries(), qrels=two, max_queries=1)
    assert [(r["query_id"], r["doc_id"]) for r in rows] == [("q1", "d2")]


def test_params_need_unique_judges_and_endpoints_for_llm_judges():
    with pytest.raises(ValueError):
        JudgeParams(judges=[{"name": "a", "endpoint": "e"}, {"name": "a", "endpoint": "e"}])
    with pytest.raises(ValueError):
        JudgeParams(judges=[{"name": "a"}])
    with pytest.raises(ValueError):
        JudgeParams(judges=[{"name": "m", "kind": "bi_encoder", "samples": 3}])


def test_relabeled_negatives_move_ids_with_their_scores():
    from rankmill.ensemble import Decision, task_id
    from rankmill.schemas import NEGATIVES

    negs = pa.Table.from_pylist(
        [
            {"query_id": "q1", "positive_ids": ["p"], "positive_scores": [0.9],
             "negative_ids": ["a", "b", "c"], "negative_scores": [0.8, 0.7, 0.6],
             "negative_ranks": [1, 2, 3], "score_kind": "dense"},
        ],
        schema=NEGATIVES,
    )  # fmt: skip

    def dec(d: str, role: str, new: str) -> Decision:
        return Decision("q1", d, role, new, None, 0.5, None)

    out = relabeled_negatives(
        negs,
        {task_id("q1", "a"): dec("a", "negative", "positive"),
         task_id("q1", "b"): dec("b", "negative", "dropped")},
    )  # fmt: skip
    r = out.to_pylist()[0]
    assert r["positive_ids"] == ["p", "a"] and r["positive_scores"] == [0.9, 0.8]
    assert r["negative_ids"] == ["c"] and r["negative_scores"] == [0.6]
    assert r["negative_ranks"] == [3]


@pytest.mark.slow
def test_judge_stage_calibrates_then_stops_early(tmp_path, ray_session):
    from rankmill.manifest import RunDir
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner
    from rankmill.stage import load_prompt
    from rankmill.stages.label import document_text, label_messages
    from tests.fixtures.openai_server import FakeOpenAIServer, expected_yesno

    with FakeOpenAIServer(answer_mode="yesno") as srv:
        judge = {"pairs_from": "candidates", "calibration_pairs": 6, "rows_per_unit": 4,
                 "judges": JUDGES}  # fmt: skip
        raw = judge_pipeline(srv.base_url, "judge-test", 7, judge, source={"pool_size": 3})
        run_dir = tmp_path / "run"
        Runner(validate_pipeline(raw), str(run_dir)).run()
        rd = RunDir(str(run_dir))
        votes = rd.read_table("judge", "votes").to_pylist()
        judgments = rd.read_table("judge", "judgments").to_pylist()
        sent = srv.completed()

        corpus = {d["doc_id"]: d for d in rd.read_table("source", "corpus").to_pylist()}
        queries = {q["query_id"]: q["text"] for q in rd.read_table("source", "queries").to_pylist()}
        pairs = {(j["query_id"], j["doc_id"]) for j in judgments}
        assert len(pairs) == len(judgments) >= 12
        calib = {(v["query_id"], v["doc_id"]) for v in votes if v["phase"] == 0}
        assert len(calib) == 6
        for v in votes:
            if v["kind"] != "llm":
                assert v["score"] is not None and v["verdict"] == (v["score"] >= 0.3)
                continue
            d = corpus[v["doc_id"]]
            text, _ = document_text(d["title"], d["text"], 2000)
            tmpl = load_prompt("label" if v["judge"] == "a" else "judge_strict")
            msgs = label_messages(tmpl, queries[v["query_id"]], text, "word")
            assert v["verdict"] == (expected_yesno(msgs[-1]["content"]) == "yes")
            assert v["p_yes"] == pytest.approx(0.9 if v["verdict"] else 0.1, abs=1e-3)
        # Calibration: every judge, every sample. Later: a's samples always agree (the fake
        # server's answer does not depend on the seed), so a third sample is never asked.
        per_pair: dict = {}
        for v in votes:
            per_pair.setdefault((v["query_id"], v["doc_id"]), []).append(v)
        for key, vs in per_pair.items():
            a_samples = sorted(v["sample_index"] for v in vs if v["judge"] == "a")
            if key in calib:
                assert a_samples == [0, 1, 2] and len(vs) == 5
            else:
                assert a_samples in ([], [0], [0, 1]) and len(vs) <= 4
        llm_votes = [v for v in votes if v["kind"] == "llm"]
        assert sent == len(llm_votes)  # one request per vote, none twice
        assert len({v["request_key"] for v in llm_votes}) == len(llm_votes)
        assert len(llm_votes) < 4 * len(pairs)  # fewer than every judge every sample

        by_pair = {(j["query_id"], j["doc_id"]): j for j in judgments}
        for key, j in by_pair.items():
            assert 0.0 <= j["posterior"] <= 1.0
            assert j["label"] == (j["posterior"] > 0.5)
            assert j["soft_label"] == j["posterior"]  # what export's views read
            assert j["stop_reason"] in ("exhausted", "settled", "confident")
            assert j["calibration"] == (key in calib)
        relabels = rd.read_table("judge", "relabels").to_pylist()
        for r in relabels:
            j = by_pair[(r["query_id"], r["doc_id"])]
            assert r["from_role"] == j["role"] and r["to_role"] == j["new_role"]
            assert r["reason"] == j["reason"] and r["posterior"] == j["posterior"]
            assert r["relevant"] == j["label"]
        changed = [j for j in judgments if j["new_role"] != j["role"]]
        assert len(changed) == len(relabels)
        report = {r["judge"]: r for r in rd.read_table("judge", "judge_report").to_pylist()}
        assert set(report) == {"minilm", "a", "b"}
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in report.values())
        assert report["a"]["self_consistency"] == pytest.approx(1.0)
        agreement = rd.read_table("judge", "agreement").to_pylist()
        assert {(r["judge_a"], r["judge_b"]) for r in agreement} >= {("a", "b"), ("a", "minilm")}

        from rankmill.status import run_status

        st = next(s for s in run_status(str(run_dir))["stages"] if s["stage"] == "judge")
        assert st["extra"]["votes"] == len(votes)
        assert st["extra"]["calls_saved"] == 4 * len(pairs) - len(llm_votes)
        assert 0.0 < st["extra"]["calls_saved_share"] < 1.0

        # A re-run asks nothing: every unit and step is committed.
        assert Runner(validate_pipeline(raw), str(run_dir)).run().units_run == 0
        assert srv.completed() == sent


def test_judges_below_min_kappa_change_no_role(tmp_path, ray_session):
    """Judged pairs (positives and negatives): the same votes relabel roles when trusted, and
    change nothing, recording what they would have changed, when their agreement is below
    min_kappa."""
    from rankmill.manifest import RunDir
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner
    from rankmill.status import run_status
    from tests.fixtures.openai_server import FakeOpenAIServer

    with FakeOpenAIServer(answer_mode="yesno") as srv:
        judges = [
            JUDGES[0],
            {**JUDGES[1], "samples": 1},
            {k: v for k, v in JUDGES[2].items() if k != "seed"},
        ]
        judge = {"pairs_from": "qrels", "calibration_pairs": 4, "min_kappa": None,
                 "judges": judges}  # fmt: skip
        raw = judge_pipeline(srv.base_url, "judge-held", 7, judge)
        results = {}
        for name, min_kappa in (("trusted", None), ("held", 1.0)):
            raw["stages"]["judge"]["min_kappa"] = min_kappa
            Runner(validate_pipeline(raw), str(tmp_path / name)).run()
            rd = RunDir(str(tmp_path / name))
            results[name] = (
                rd.read_table("judge", "judgments").to_pylist(),
                rd.read_table("judge", "relabels").to_pylist(),
            )
        judgments, relabels = results["trusted"]
        changed = [j for j in judgments if j["new_role"] != j["role"]]
        assert changed and len(relabels) == len(changed)
        held, held_relabels = results["held"]
        assert {(j["query_id"], j["doc_id"], j["label"]) for j in held} == {
            (j["query_id"], j["doc_id"], j["label"]) for j in judgments
        }
        assert all(j["new_role"] == j["role"] and j["status"] == "kept" for j in held)
        assert sorted((r["query_id"], r["doc_id"], r["reason"]) for r in held_relabels) == sorted(
            (j["query_id"], j["doc_id"], f"held:{j['reason']}") for j in changed
        )
        assert all(r["to_role"] == r["from_role"] for r in held_relabels)
        st = next(s for s in run_status(str(tmp_path / "held"))["stages"] if s["stage"] == "judge")
        assert st["extra"]["relabeling_held"] == 1
