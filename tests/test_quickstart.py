"""The README's quickstart: a full run, status complete, and a re-run that recomputes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rankmill.manifest import RunDir


def rankmill(args, cwd, timeout=1800):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "rankmill.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quickstart_runs_completes_and_resumes_for_free(tmp_path, repo):
    run_dir = tmp_path / "qs"
    t0 = time.perf_counter()
    first = rankmill(["run", "pipelines/quickstart.yaml", "--run-dir", str(run_dir)], repo)
    t_first = time.perf_counter() - t0
    assert first.returncode == 0, first.stdout + first.stderr

    status = rankmill(["status", str(run_dir)], repo)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.strip().endswith("complete")

    rd = RunDir(str(run_dir))
    corpus = rd.read_table("ingest", "corpus")
    assert corpus.num_rows >= 200
    records_before = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("units/*.json")}

    t0 = time.perf_counter()
    again = rankmill(["run", "pipelines/quickstart.yaml", "--run-dir", str(run_dir)], repo)
    t_again = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 unit(s) run" in again.stdout
    records_after = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("units/*.json")}
    assert records_after == records_before  # nothing recomputed, nothing rewritten
    print(f"quickstart: first run {t_first:.1f} s, re-run {t_again:.1f} s")
