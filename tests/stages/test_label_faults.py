"""The label stage through the Runner against a failing endpoint: what cannot heal stops the
stage after a handful of requests with one clear line; what can heal loses no row."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fixtures.cli import finish
from tests.fixtures.openai_server import (
    BAD_ANSWER_KINDS,
    HTTP200_FAULT_KINDS,
    TRANSIENT_KINDS,
    FakeOpenAIServer,
    free_port,
)

PIPELINE = """
run: {{name: fatal, seed: 7}}
endpoints:
  judge: {{base_url: "{url}", model: fake-judge, {key}max_concurrency: 8}}
stages:
  source: {{uses: "tests.fixtures.pairs:PairsSource", pool_size: 5, unknown_doc: true}}
  label: {{endpoint: judge, answer_format: word, samples: 1, max_docs_per_query: 5,
          rows_per_unit: 1, workers: 3, worker_cpus: 0.25}}
"""


def _pipeline(tmp_path: Path, url: str, key: str | None = None) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(url=url, key=f"api_key_env: {key}, " if key else ""))
    return path


@pytest.mark.slow
def test_a_bad_key_stops_the_stage_after_a_handful_of_requests(tmp_path, repo, monkeypatch):
    monkeypatch.setenv("RANKMILL_JUDGE_KEY", "sk-wrong-key-4f1e")
    with FakeOpenAIServer(answer_mode="yesno", require_key="sk-right") as srv:
        pipe = _pipeline(tmp_path, srv.base_url, key="RANKMILL_JUDGE_KEY")
        run_dir = tmp_path / "run"
        # 6 pools of 5 (q-bm25's has d-missing): 30 units, 29 of which ask the endpoint.
        out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo, timeout=900, code=1)
        sent = srv.stats()["requests"]
    assert 1 <= sent <= 5, out
    print(f"requests sent with a bad key: {sent}")
    lines = [x for x in out.splitlines() if "refused the credentials" in x]
    assert len(lines) == 1, out
    (line,) = lines
    for part in ("'judge'", srv.base_url, "RANKMILL_JUDGE_KEY", "check the key"):
        assert part in line
    assert "sk-wrong-key-4f1e" not in out


@pytest.mark.slow
def test_a_closed_port_fails_the_stage_with_connection_refused(tmp_path, ray_session):
    from rankmill.errors import LLMUnreachable
    from rankmill.pipeline import load_pipeline
    from rankmill.runner import Runner

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    pipe = _pipeline(tmp_path, url)
    cfg = load_pipeline(pipe)
    Runner(cfg, str(tmp_path / "run")).run(until="source")
    t0 = time.monotonic()
    with pytest.raises(LLMUnreachable) as info:
        Runner(cfg, str(tmp_path / "run")).run()
    assert time.monotonic() - t0 < 60  # not 6 attempts x back-off x 29 units
    assert "connection refused" in str(info.value) and url in str(info.value)


def _labels(raw: dict, run_dir: Path) -> tuple[dict, list, object]:
    from rankmill.manifest import RunDir
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner

    Runner(validate_pipeline(raw), str(run_dir)).run()
    rd = RunDir(str(run_dir))
    labels = rd.read_table("label", "labels").to_pylist()
    rejects = rd.read_table("label", "rejects").to_pylist()
    verdicts = {(r["query_id"], r["doc_id"], r["sample_index"]): r["verdict"] for r in labels}
    assert len(verdicts) == len(labels)
    return verdicts, rejects, rd


@pytest.mark.slow
def test_twenty_percent_faults_of_every_kind_lose_no_row(tmp_path, ray_session):
    def raw(url: str) -> dict:
        return {
            "run": {"name": "faults", "seed": 7},
            "endpoints": {
                "judge": {
                    "base_url": url,
                    "model": "fake-judge",
                    "max_concurrency": 8,
                    "timeout_s": 1.0,
                    "max_attempts": 8,
                }
            },
            "stages": {
                "source": {"uses": "tests.fixtures.pairs:PairsSource", "pool_size": 5},
                "label": {
                    "endpoint": "judge",
                    "answer_format": "word",
                    "samples": 4,
                    "max_docs_per_query": 5,
                    "rows_per_unit": 6,
                    # truncated, filtered and empty answers are the model's: asked again
                    "resample_bad_answers": 4,
                },
            },
        }

    with FakeOpenAIServer(answer_mode="yesno") as clean:
        want, want_rejects, _ = _labels(raw(clean.base_url), tmp_path / "clean")
    assert len(want) == 6 * 5 * 4 and want_rejects == []

    kinds = TRANSIENT_KINDS + HTTP200_FAULT_KINDS + BAD_ANSWER_KINDS
    with FakeOpenAIServer(
        answer_mode="yesno",
        fault_rate=0.2,
        fault_seed=11,
        fault_kinds=kinds,
        retry_after_s=0.05,
        hang_s=3.0,
    ) as srv:
        got, rejects, rd = _labels(raw(srv.base_url), tmp_path / "faulty")
        faults = srv.stats()["faults"]
    assert set(faults) >= set(HTTP200_FAULT_KINDS) | {"length", "hang", "reset"}, faults
    assert sum(faults.values()) >= 0.1 * len(want)
    assert rejects == []
    assert got == want  # every (query, doc, sample), with the fault-free verdict
    from rankmill.manifest import Counters

    total = Counters()
    for rec in rd.stage_status("label")[1]:
        total.add(rec.counters)
    assert total.extra.get("llm_retries", 0) == sum(
        faults.get(k, 0) for k in TRANSIENT_KINDS + HTTP200_FAULT_KINDS
    )
