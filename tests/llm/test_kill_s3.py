"""A run dir on object storage (a local S3 server): SIGKILL a run in the middle of its LLM
calls, run it again: every row is there once, only requests in flight at the kill are sent
twice, and the journal's answers live in the bucket."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rankmill.llm.journal import read_totals
from rankmill.manifest import RunDir
from tests.fixtures.cli import spawn
from tests.fixtures.openai_server import spawn_server
from tests.fixtures.s3 import LocalS3

N_ROWS = 300
CONCURRENCY = 32

PIPELINE = """
run: {{name: kill-s3}}
endpoints:
  fake: {{base_url: "{url}", model: fake, max_concurrency: {conc}, timeout_s: 30}}
stages:
  calls: {{uses: "tests.fixtures.llm_stages:CallStage", endpoint: fake, n_rows: {n},
          rows_per_unit: 50}}
"""


@pytest.mark.slow
def test_sigkill_with_the_run_dir_on_s3(tmp_path, repo, monkeypatch):
    with LocalS3() as s3, spawn_server(cwd=str(repo), latency_s=0.25) as srv:
        for k, v in s3.env.items():  # what a user exports; the CLI inherits it
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("RANKMILL_JOURNAL_DIR", str(tmp_path / "node-local"))
        pipeline = tmp_path / "kill.yaml"
        pipeline.write_text(PIPELINE.format(url=srv.base_url, conc=CONCURRENCY, n=N_ROWS))
        run_dir = s3.uri("runs/kill")
        args = ["run", str(pipeline), "--run-dir", run_dir]

        proc = spawn(args, repo)
        t0 = time.time()
        while srv.completed() < 120:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill point:\n{proc.stdout.read().decode()}")
            if time.time() - t0 > 300:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("no LLM calls within 300 s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.5)
        assert srv.completed() < N_ROWS, "the kill came too late to test anything"

        # Resume; on object storage the killed run's lock is a lease that has to go stale.
        deadline = time.time() + 240
        while True:
            again = spawn(args, repo)
            out, _ = again.communicate(timeout=600)
            if again.returncode != 6 or time.time() > deadline:
                break
            time.sleep(3)
        assert again.returncode == 0, out.decode()

        rd = RunDir(run_dir)
        answers = rd.read_table("calls", "answers").to_pylist()
        assert sorted(a["row_id"] for a in answers) == [f"row-{i:05d}" for i in range(N_ROWS)]
        completed = srv.stats()["completed"]
        assert len(completed) == N_ROWS and max(completed.values()) <= 2
        assert sum(1 for v in completed.values() if v == 2) <= CONCURRENCY
        assert any(k.endswith(".sqlite") for k in s3.keys("runs/kill/llm/journal/"))
        # each row's answer journaled once: the killed worker's unpublished answers were
        # published from its node's disk by the next run, not asked again
        assert read_totals(run_dir).requests == N_ROWS
