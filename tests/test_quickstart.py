"""The README's quickstart: a full run, status complete, and a re-run that recomputes nothing."""

from __future__ import annotations

import time

import pytest

from rankmill.manifest import RunDir
from rankmill.pipeline import load_pipeline
from rankmill.stages.export import export_files
from rankmill.status import run_status
from tests.fixtures.cli import finish


@pytest.mark.slow
@pytest.mark.timeout(2400)  # every stage against a small local model on 2 cores
def test_quickstart_runs_completes_and_resumes_for_free(tmp_path, repo):
    run_dir = tmp_path / "qs"
    t0 = time.perf_counter()
    finish(["run", "pipelines/quickstart.yaml", "--run-dir", str(run_dir)], repo)
    t_first = time.perf_counter() - t0

    status = finish(["status", str(run_dir)], repo)  # exits 0 only when complete
    assert status.strip().endswith("complete")

    rd = RunDir(str(run_dir))
    corpus = rd.read_table("ingest", "corpus")
    assert corpus.num_rows >= 200
    # the teacher stages wrote synthetic queries, pointwise labels and listwise labels, and
    # every rank pool is a ranking or a reject with its reason, counted in status
    lineage = rd.read_table("queries", "lineage").to_pylist()
    assert len(lineage) >= 6 and all(r["model"] == "smollm2-135m" for r in lineage)
    assert rd.read_table("label", "labels").num_rows > 0
    rankings = rd.read_table("rank", "rankings").num_rows
    ranked_out = [
        r for r in rd.read_table("rank", "rejects").to_pylist() if r["table"] == "candidates"
    ]
    judged = [r for r in ranked_out if r["reason"] != "over_budget"]
    assert rankings + len(judged) == 4
    stages = {s["stage"]: s for s in run_status(str(run_dir))["stages"]}
    assert stages["rank"]["rejects"]["over_budget"] == len(ranked_out) - len(judged)
    assert stages["rank"]["llm_calls"] >= 4 and stages["queries"]["llm_calls"] >= 6
    # the judge ensemble voted on every mined pair of its first queries, and later stages
    # read its relabeled negatives and soft labels instead of mine's
    jp = load_pipeline(str(repo / "pipelines" / "quickstart.yaml"), []).stages["judge"]
    mined_rows = [
        r
        for r in rd.read_table("mine", "negatives").to_pylist()
        if r["positive_ids"] or r["negative_ids"]
    ]
    judged_queries = sorted(r["query_id"] for r in mined_rows)[: jp.max_queries]
    mined = {
        (r["query_id"], d)
        for r in mined_rows
        if r["query_id"] in judged_queries
        for d in [*r["positive_ids"], *r["negative_ids"]]
    }
    votes = rd.read_table("judge", "votes").to_pylist()
    judgments = rd.read_table("judge", "judgments").to_pylist()
    assert votes and {(j["query_id"], j["doc_id"]) for j in judgments} == mined
    assert {(v["query_id"], v["doc_id"]) for v in votes} == mined
    llm_votes = sum(1 for v in votes if v["kind"] == "llm")
    samples = sum(j.samples for j in jp.judges if j.kind == "llm")
    judge = stages["judge"]["judge"]
    assert judge["votes"] == len(votes) and judge["pairs"] == len(mined)
    assert judge["llm_calls"] == llm_votes and judge["llm_calls_full"] == samples * len(mined)
    assert judge["calls_saved"] == samples * len(mined) - llm_votes
    assert judge["mean_agreement"] is not None
    assert (
        f"judge: {len(votes)} votes on {len(mined)} pairs; LLM calls {llm_votes} of "
        f"{samples * len(mined)} for full voting ({judge['calls_saved']} saved"
    ) in status
    upstream = rd.read_plan("export").upstream
    assert upstream["negatives"] == "judge.negatives"
    assert upstream["judgments"] == "judge.judgments"
    # it ends with training views and the report
    manifest, files = export_files(str(run_dir))
    built = {v["view"] for v in manifest["views"] if v["status"] == "built"}
    assert {"n-tuple", "pointwise", "flagembedding", "tevatron"} <= built
    assert (run_dir / "report.html").read_text().count('class="plot"') == 7
    records_before = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("units/*.json")}

    t0 = time.perf_counter()
    again = finish(["run", "pipelines/quickstart.yaml", "--run-dir", str(run_dir)], repo)
    t_again = time.perf_counter() - t0
    assert "0 unit(s) run" in again
    records_after = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("units/*.json")}
    assert records_after == records_before  # nothing recomputed, nothing rewritten
    print(f"quickstart: first run {t_first:.1f} s, re-run {t_again:.1f} s")
