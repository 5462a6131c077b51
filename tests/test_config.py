from __future__ import annotations

from pathlib import Path

import pytest

from rankmill.config import parse_override
from rankmill.errors import ConfigError
from rankmill.pipeline import load_pipeline, validate_pipeline

TOY = {
    "run": {"name": "toy"},
    "stages": {
        "count": {"uses": "tests.fixtures.stages:CountStage", "n_units": 2},
        "double": {"uses": "tests.fixtures.stages:DoubleStage"},
    },
}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_valid_pipeline_keeps_stage_order_and_types(tmp_path):
    cfg = validate_pipeline(TOY)
    assert list(cfg.stages) == ["count", "double"]
    assert cfg.stages["count"].n_units == 2
    assert cfg.stage_type("double") == "tests.fixtures.stages:DoubleStage"


def test_unknown_stage_key_names_dotted_path():
    raw = {"stages": {"count": {"uses": "tests.fixtures.stages:CountStage", "n_unit": 2}}}
    with pytest.raises(ConfigError, match=r"stages\.count\.n_unit: unknown key"):
        validate_pipeline(raw)


def test_bad_value_names_dotted_path():
    raw = {"stages": {"count": {"uses": "tests.fixtures.stages:CountStage", "n_units": "many"}}}
    with pytest.raises(ConfigError, match=r"stages\.count\.n_units"):
        validate_pipeline(raw)


def test_unknown_top_level_and_run_keys():
    with pytest.raises(ConfigError, match=r"run\.sed: unknown key"):
        validate_pipeline({**TOY, "run": {"sed": 1}})
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        validate_pipeline({**TOY, "bogus": 1})


def test_unknown_stage_type():
    with pytest.raises(ConfigError, match=r"stages\.frobnicate: unknown stage type"):
        validate_pipeline({"stages": {"frobnicate": {}}})


def test_endpoint_needs_url_or_local():
    raw = {**TOY, "endpoints": {"x": {"model": "m"}}}
    with pytest.raises(ConfigError, match=r"endpoints\.x"):
        validate_pipeline(raw)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = write(
        tmp_path,
        "stages:\n  count: {uses: 'tests.fixtures.stages:CountStage'}\n",
    )
    cfg = load_pipeline(p, ["stages.count.n_units=8", "run.seed=7"])
    assert cfg.stages["count"].n_units == 8 and cfg.run.seed == 7
    with pytest.raises(ConfigError, match=r"stages\.count\.n_units"):
        load_pipeline(p, ["stages.count.n_units=lots"])
    with pytest.raises(ConfigError, match=r"stages\.count\.nope: unknown key"):
        load_pipeline(p, ["stages.count.nope=1"])
    with pytest.raises(ConfigError, match="no stage named 'mine'"):
        load_pipeline(p, ["stages.mine.num_negatives=8"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_pipeline(p, ["stages.count.n_units"])


def test_parse_override_types():
    assert parse_override("a.b=8") == ("a.b", 8)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("a.b=hello world") == ("a.b", "hello world")


def test_relative_paths_resolve_against_the_pipeline_file(tmp_path):
    p = write(tmp_path, "stages:\n  ingest: {source: data}\n")
    cfg = load_pipeline(p)
    assert cfg.resolve_path("data") == str((tmp_path / "data").resolve())


def test_quickstart_pipeline_validates(repo):
    cfg = load_pipeline(repo / "pipelines" / "quickstart.yaml")
    assert "ingest" in cfg.stages
