"""``rankmill prompt NAME [--example]``: the template, or the messages it renders to."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rankmill.cli import app

TEACHER_PROMPTS = [
    "label",
    "label_reasoning",
    "label_score",
    "label_conclude",
    "query_question",
    "query_reasoning",
    "query_keywords",
    "hard_negative",
    "rank_window",
]


@pytest.mark.parametrize("name", TEACHER_PROMPTS)
def test_every_prompt_renders_with_example_data(name: str) -> None:
    out = CliRunner().invoke(app, ["prompt", name, "--example", "--json"])
    assert out.exit_code == 0, out.output
    messages = json.loads(out.output)
    assert messages[-1]["role"] == "user" and messages[-1]["content"]
    if name != "label_conclude":
        body = "\n".join(m["content"] for m in messages)
        assert "<<<BEGIN " in body and "<<<END " in body  # example texts are fenced


def test_prompt_without_example_prints_the_template_and_unknown_names_fail() -> None:
    out = CliRunner().invoke(app, ["prompt", "rank_window"])
    assert out.exit_code == 0 and "{% block system %}" in out.output
    bad = CliRunner().invoke(app, ["prompt", "no_such_prompt", "--example"])
    assert bad.exit_code == 2 and "no_such_prompt.j2 not found" in bad.output
