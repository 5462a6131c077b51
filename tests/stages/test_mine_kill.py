"""A run SIGKILLed every 20 s while it mines cranfield still finishes: the corpus embedding
is committed in small chunks, so each attempt adds to what the killed ones left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rankmill.manifest import RunDir
from tests.fixtures.cli import spawn

PIPELINE = """
run: {{name: mine-kill}}
stages:
  ingest: {{source: "{data}", policies: {{empty_text: reject}}}}
  mine: {{num_negatives: 4}}
"""


def chunks(run_dir: Path) -> int:
    """Embedding chunks committed so far (the joined file counts as all of them)."""
    d = run_dir / "cache" / "embeddings"
    return len(list(d.glob("*-c*.npy"))) if d.is_dir() else 0


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    try:  # and the Ray processes it started
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sigkill_every_20s_during_mine_still_finishes(tmp_path, repo, shared_data):
    data = shared_data / "cranfield"
    if not data.is_dir():
        pytest.skip(f"{data} is not there")
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPELINE.format(data=data))
    run_dir = tmp_path / "run"
    args = ["run", str(pipe), "--run-dir", str(run_dir)]
    kills_in_mine = 0
    progress: list[int] = []
    # Every 20 s, or, on a machine where starting a run (Ray, the model) takes longer than
    # that, a little more than the start-up: a kill must be able to land after some embedding.
    interval = 20.0
    for attempt in range(60):
        proc = spawn(args, repo)
        if attempt == 0:
            t0 = time.time()
            while chunks(run_dir) == 0 and proc.poll() is None and time.time() - t0 < 600:
                time.sleep(0.2)
            interval = max(interval, time.time() - t0 + 8.0)
        try:
            proc.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            kill(proc)
            n = chunks(run_dir)
            if n:
                kills_in_mine += 1
                progress.append(n)
            continue
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert proc.returncode == 0, out
        break
    else:
        pytest.fail(f"no attempt finished in 60 tries; chunks after each kill: {progress}")
    assert progress == sorted(progress)  # chunks only accumulate across kills
    negs = RunDir(str(run_dir)).read_table("mine", "negatives")
    assert negs.num_rows > 200
