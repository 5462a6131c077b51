"""Runner: fingerprints, skipping, resume after a failing unit, wiring."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankmill.cli import app
from rankmill.errors import StageError, UnitFailed
from rankmill.manifest import RunDir
from rankmill.pipeline import validate_pipeline
from rankmill.runner import Runner
from rankmill.status import run_status


def toy(tmp_path: Path, **count) -> dict:
    return {
        "run": {"name": "toy"},
        "stages": {
            "count": {
                "uses": "tests.fixtures.stages:CountStage",
                "n_units": 4,
                "log_path": str(tmp_path / "log.txt"),
                **count,
            },
            "double": {
                "uses": "tests.fixtures.stages:DoubleStage",
                "log_path": str(tmp_path / "log.txt"),
            },
        },
    }


def processed(tmp_path: Path) -> list[str]:
    p = tmp_path / "log.txt"
    lines = p.read_text().splitlines() if p.exists() else []
    p.unlink(missing_ok=True)
    return sorted(" ".join(line.split()[:2]) for line in lines)


def outputs(run_dir: Path) -> dict[str, str]:
    """sha256 of every committed data file, by stage/table/unit (names carry a random token);
    a table without rows, held in its record, by its schema."""
    rd = RunDir(str(run_dir))
    out = {}
    for stage in ("count", "double"):
        plan, recs = rd.stage_status(stage)
        assert plan is not None
        for rec in recs:
            assert rec is not None
            for f in rec.files:
                data = (run_dir / f.path).read_bytes() if f.path else f.schema.encode()
                out[f"{stage}/{f.table}/{rec.unit_id}"] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.slow
def test_resume_after_failing_unit_recomputes_only_that_unit(tmp_path, ray_session):
    marker = tmp_path / "failed-once"
    cfg = validate_pipeline(toy(tmp_path, fail_unit=2, fail_marker=str(marker)))
    run_dir = tmp_path / "run"
    with pytest.raises(UnitFailed) as exc:
        Runner(cfg, str(run_dir)).run()
    assert list(exc.value.failures) == ["00002"]
    assert processed(tmp_path) == [f"count 0000{i}" for i in range(4)]
    rd = RunDir(str(run_dir))
    plan, recs = rd.stage_status("count")
    assert [r is not None for r in recs] == [True, True, False, True]
    assert rd.read_plan("double") is None  # the failing stage stops the run
    st = run_status(str(run_dir))
    assert not st["complete"]
    assert [(x["stage"], x["state"], x["units_committed"]) for x in st["stages"]] == [
        ("count", "partial", 3),
        ("double", "not run", 0),
    ]
    result = CliRunner().invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 1 and "partial" in result.output

    Runner(cfg, str(run_dir)).run()
    log = processed(tmp_path)
    assert [x for x in log if x.startswith("count")] == ["count 00002"]
    assert len([x for x in log if x.startswith("double")]) == 7

    clean_dir = tmp_path / "clean"
    clean = validate_pipeline(toy(tmp_path))
    Runner(clean, str(clean_dir)).run()
    processed(tmp_path)
    assert outputs(run_dir) == outputs(clean_dir)
    assert rd.read_table("double", "doubled").equals(
        RunDir(str(clean_dir)).read_table("double", "doubled")
    )

    # A finished run re-run computes nothing and does not even start Ray work.
    result = Runner(cfg, str(run_dir)).run()
    assert result.units_run == 0 and processed(tmp_path) == []
    shown = CliRunner().invoke(
        app, ["show", str(run_dir), "double.rejects", "--out", str(tmp_path / "r.jsonl")]
    )
    assert shown.exit_code == 0 and "double.rejects: 9 rows" in shown.output
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 9
    assert CliRunner().invoke(app, ["show", str(run_dir), "double.nope"]).exit_code == 2
    st = run_status(str(run_dir))
    assert st["complete"] and st["stages"][1]["rejects"] == {"odd_value": 9}
    assert st["stages"][0]["rows_out"] == 20
    assert CliRunner().invoke(app, ["status", str(run_dir)]).exit_code == 0
    # A changed param makes the stage stale until it is run again.
    Runner(validate_pipeline(toy(tmp_path, n_units=5)), str(run_dir)).run(until="count")
    st = run_status(str(run_dir))
    assert [x["state"] for x in st["stages"]] == ["complete", "stale"] and not st["complete"]


@pytest.mark.slow
def test_param_change_reruns_that_stage_and_later_not_earlier(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    Runner(validate_pipeline(toy(tmp_path)), str(run_dir)).run()
    processed(tmp_path)
    raw = toy(tmp_path)
    raw["stages"]["double"]["rows_per_unit"] = 5
    Runner(validate_pipeline(raw), str(run_dir)).run()
    log = processed(tmp_path)
    assert log and all(x.startswith("double") for x in log)
    raw["stages"]["count"]["rows_per_unit"] = 6
    Runner(validate_pipeline(raw), str(run_dir)).run()
    log = processed(tmp_path)
    assert len([x for x in log if x.startswith("count")]) == 4
    assert len([x for x in log if x.startswith("double")]) == 5  # 24 rows / 5
    # worker placement is not part of the fingerprint
    raw["stages"]["double"]["workers"] = 2
    assert Runner(validate_pipeline(raw), str(run_dir)).run().units_run == 0


@pytest.mark.slow
def test_rejects_are_recorded_with_reasons_and_counted(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    Runner(validate_pipeline(toy(tmp_path)), str(run_dir)).run()
    rd = RunDir(str(run_dir))
    items = rd.read_table("count", "items")
    doubled = rd.read_table("double", "doubled")
    rejects = rd.read_table("double", "rejects")
    assert doubled.num_rows + rejects.num_rows == items.num_rows
    assert set(rejects.column("reason").to_pylist()) == {"odd_value"}
    _, recs = rd.stage_status("double")
    assert sum(r.counters.rejects.get("odd_value", 0) for r in recs) == rejects.num_rows


def test_wiring_errors_are_clear(tmp_path):
    raw = {"stages": {"double": {"uses": "tests.fixtures.stages:DoubleStage"}}}
    with pytest.raises(StageError, match="needs a 'items' table"):
        Runner(validate_pipeline(raw), str(tmp_path / "r")).run()
    raw = toy(tmp_path)
    raw["stages"]["double"]["inputs"] = {"items": "nowhere.items"}
    with pytest.raises(StageError, match="must name an earlier stage"):
        Runner(validate_pipeline(raw), str(tmp_path / "r")).run()
    with pytest.raises(StageError, match="--until nope: no such stage"):
        Runner(validate_pipeline(toy(tmp_path)), str(tmp_path / "r")).run(until="nope")


def test_only_requires_complete_inputs(tmp_path):
    with pytest.raises(StageError, match="--only double: its input stage 'count'"):
        Runner(validate_pipeline(toy(tmp_path)), str(tmp_path / "r")).run(only="double")


def test_fingerprints_are_stable_and_param_sensitive(tmp_path):
    a = Runner(validate_pipeline(toy(tmp_path)), str(tmp_path / "r")).fingerprints()
    b = Runner(validate_pipeline(toy(tmp_path)), str(tmp_path / "r")).fingerprints()
    assert a == b
    c = Runner(validate_pipeline(toy(tmp_path, n_units=5)), str(tmp_path / "r")).fingerprints()
    # Config fingerprints: a later stage's own config did not change; its full fingerprint
    # changes with the content its upstream commits (see the resume tests).
    assert c["count"] != a["count"] and c["double"] == a["double"]


def test_placement_and_cache_params_do_not_change_fingerprints(tmp_path, repo):
    def fps(**mine):
        raw = {
            "stages": {
                "ingest": {"source": str(repo / "data" / "sample")},
                "mine": {"num_negatives": 4, **mine},
            }
        }
        return Runner(validate_pipeline(raw), str(tmp_path / "r")).fingerprints()

    base = fps()
    assert fps(cache_dir=str(tmp_path / "cache"), workers=3, worker_cpus=0.5) == base
    assert fps(num_negatives=5)["mine"] != base["mine"]


def test_changed_input_files_change_the_ingest_fingerprint(tmp_path, repo):
    import shutil

    src = tmp_path / "data"
    shutil.copytree(repo / "data" / "sample", src)
    raw = {"stages": {"ingest": {"source": str(src)}, "mine": {"num_negatives": 2}}}
    before = Runner(validate_pipeline(raw), str(tmp_path / "r")).fingerprints()
    with (src / "queries.jsonl").open("a") as f:
        f.write('{"_id": "qx", "text": "one more question"}\n')
    after = Runner(validate_pipeline(raw), str(tmp_path / "r")).fingerprints()
    assert after["ingest"] != before["ingest"] and after["mine"] == before["mine"]
