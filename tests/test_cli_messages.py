"""What the CLI prints is the text it was given: no emoji codes, no markup, real names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.cli import finish


def _corpus(folder: Path, broken_line: int = 100) -> Path:
    """A JSONL corpus whose line ``broken_line`` is not JSON; texts that look like markup."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"_id": f"d{i}", "text": f"document {i} :smile: [bold]not bold[/bold]"})
        for i in range(1, 121)
    ]
    lines[broken_line - 1] = '{"_id": "d100", "text": "cut off'
    lines[4] = json.dumps({"_id": "d5", "text": "   "})  # an empty text, found at :5:
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_keeps_file_and_line_and_prints_text_verbatim(tmp_path, repo):
    corpus = _corpus(tmp_path / "data")
    out = finish(["validate", str(corpus), "--format", "jsonl"], repo, timeout=300, code=1)
    assert "corpus.jsonl:100:" in out and "malformed_row" in out
    assert "corpus.jsonl:5:" in out and "empty_text" in out
    assert "\N{HUNDRED POINTS SYMBOL}" not in out and "\N{SMILING FACE WITH OPEN MOUTH}" not in out


@pytest.mark.slow
def test_run_names_the_line_and_the_real_stage_and_its_hint_works(tmp_path, repo):
    _corpus(tmp_path / "data")
    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        "run: {name: messages}\n"
        "stages:\n"
        "  corpus_in: {uses: ingest, source: data/corpus.jsonl, format: jsonl}\n"
    )
    run_dir = str(tmp_path / "run")
    out = finish(["run", str(pipe), "--run-dir", run_dir], repo, timeout=600, code=1)
    assert "corpus.jsonl:100:" in out and "malformed_row" in out
    assert "\N{HUNDRED POINTS SYMBOL}" not in out
    hint = "stages.corpus_in.policies.malformed_row=reject"
    assert hint in out and "<ingest>" not in out
    # The hint is a working override: the run goes on and the row leaves as a reject.
    out = finish(["run", str(pipe), "--run-dir", run_dir, "--set", hint], repo, timeout=600)
    shown = finish(["show", run_dir, "corpus_in.rejects"], repo, timeout=300)
    assert "malformed_row" in shown and "corpus.jsonl:100" in shown
    corpus = finish(["show", run_dir, "corpus_in.corpus", "--limit", "3"], repo, timeout=300)
    assert "[bold]not bold[/bold]" in corpus and ":smile:" in corpus
