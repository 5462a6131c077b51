"""SIGKILL the CLI mid-stage at several points; the re-run equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankmill.manifest import RunDir
from tests.fixtures.cli import finish, spawn

PIPELINE = """
run: {{name: crash}}
stages:
  count: {{uses: "tests.fixtures.stages:CountStage", n_units: 6, rows_per_unit: 4, sleep_s: 0.6}}
  double: {{uses: "tests.fixtures.stages:DoubleStage", rows_per_unit: 4, sleep_s: 0.6,
           log_path: "{log}"}}
"""


def committed(run_dir: Path, stage: str) -> int:
    d = run_dir / "stages" / stage / "units"
    return len([p for p in d.glob("*.json")]) if d.is_dir() else 0


def kill_when(proc: subprocess.Popen, run_dir: Path, stage: str, n: int, timeout: float = 240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if committed(run_dir, stage) >= n:
            os.kill(proc.pid, signal.SIGKILL)  # the CLI process itself
            proc.wait()
            time.sleep(0.5)
            try:  # and whatever Ray processes it had started
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"run ended before the kill point ({stage} >= {n}):\n{out}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {n} committed units of {stage}")


def table(run_dir: Path, stage: str, name: str) -> pa.Table:
    return RunDir(str(run_dir)).read_table(stage, name)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path, repo):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPELINE.format(log=tmp_path / "log.txt"))
    clean = tmp_path / "clean"
    finish(["run", str(pipe), "--run-dir", str(clean)], repo)
    expected = {
        (s, t): table(clean, s, t)
        for s, t in [("count", "items"), ("double", "doubled"), ("double", "rejects")]
    }

    run_dir = tmp_path / "run"
    # Kill points: early in the first stage, late in it, and inside the second stage.
    for stage, n in [("count", 1), ("count", 4), ("double", 2)]:
        kill_when(spawn(["run", str(pipe), "--run-dir", str(run_dir)], repo), run_dir, stage, n)
    # A crash also leaves orphans: a torn data file and a temporary record no record names.
    data_dir = run_dir / "stages" / "double" / "data" / "doubled"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "00000.deadbeef0000.parquet").write_bytes(b"PAR1 torn")
    pq.write_table(expected[("double", "doubled")], data_dir / "00001.feedface0000.parquet")
    (run_dir / "stages" / "double" / "units" / "00003.json.tmp-abc").write_text("{")

    (tmp_path / "log.txt").unlink(missing_ok=True)
    finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    for (s, t), want in expected.items():
        got = table(run_dir, s, t)
        assert got.equals(want), f"{s}.{t} differs from the uninterrupted run"
        if t != "rejects":
            ids = got.column("item_id").to_pylist()
            assert len(ids) == len(set(ids)), "a row was duplicated"
    # After the re-run nothing is left to do, and status says complete.
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "0 unit(s) run" in out
    assert finish(["status", str(run_dir)], repo).strip().endswith("complete")
