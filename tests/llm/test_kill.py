"""SIGKILL a run in the middle of 500 LLM calls at concurrency 64, run it again: every row is
there exactly once, and the server completed each request at most once more than once per kill
(only requests in flight at the kill are sent again)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rankmill.manifest import RunDir
from tests.fixtures.cli import finish, spawn
from tests.fixtures.openai_server import spawn_server

N_ROWS = 500
CONCURRENCY = 64

PIPELINE = """
run: {{name: kill}}
endpoints:
  fake: {{base_url: "{url}", model: fake, max_concurrency: {conc}, timeout_s: 30}}
stages:
  calls: {{uses: "tests.fixtures.llm_stages:CallStage", endpoint: fake, n_rows: {n},
          rows_per_unit: 100}}
"""


@pytest.mark.slow
def test_sigkill_mid_stage_repeats_only_in_flight_requests(tmp_path, repo):
    with spawn_server(cwd=str(repo), latency_s=0.25) as srv:
        pipeline = tmp_path / "kill.yaml"
        pipeline.write_text(PIPELINE.format(url=srv.base_url, conc=CONCURRENCY, n=N_ROWS))
        run_dir = tmp_path / "run"
        args = ["run", str(pipeline), "--run-dir", str(run_dir)]

        proc = spawn(args, repo)  # its own process group: the kill takes its Ray workers too
        t0 = time.time()
        while srv.completed() < 150:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"the run ended before the kill point:\n{out}")
            if time.time() - t0 > 300:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("no LLM calls within 300 s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray worker making the calls
        proc.wait()
        time.sleep(1.5)
        at_kill = srv.completed()
        assert at_kill < N_ROWS, "the kill came too late to test anything"
        time.sleep(1.0)
        assert srv.completed() == at_kill, "something still calls the server after the kill"

        finish(args, repo, timeout=600)

        rd = RunDir(str(run_dir))
        answers = rd.read_table("calls", "answers").to_pylist()
        rejects = rd.read_table("calls", "rejects").to_pylist()
        rows = [a["row_id"] for a in answers] + [r["row_id"] for r in rejects]
        assert sorted(rows) == [f"row-{i:05d}" for i in range(N_ROWS)]  # each exactly once
        assert all(a["text"] == f"answer-{a['row_id']}" for a in answers)

        completed = srv.stats()["completed"]
        assert len(completed) == N_ROWS
        assert max(completed.values()) <= 2  # at most once more, for the one kill
        repeated = sum(1 for v in completed.values() if v == 2)
        # only requests in flight at the kill can have been completed twice
        assert repeated <= CONCURRENCY
