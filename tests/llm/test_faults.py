"""With 20% of responses faulted at random (every kind), no request is lost: each is an answer
or a reject with a reason; transient faults, broken HTTP 200 bodies included, never become
rejects."""

from __future__ import annotations

import logging
import traceback

import pytest

from rankmill.errors import LLMAuthError
from rankmill.llm import ChatRequest
from rankmill.llm.journal import iter_entries
from tests.fixtures.openai_server import ALL_RANDOM_KINDS, BAD_ANSWER_KINDS, HTTP200_FAULT_KINDS
from tests.llm.conftest import user

REASONS = {"truncated", "content_filter", "empty_content"}


def test_random_faults_lose_nothing(server, make_gw):
    server.script(
        fault_rate=0.2, fault_seed=7, fault_kinds=ALL_RANDOM_KINDS, retry_after_s=0.02, hang_s=5
    )
    gw = make_gw(timeout_s=0.4, max_attempts=10, max_concurrency=32)
    reqs = [ChatRequest(messages=user(f"question {i}"), tag=i) for i in range(300)]
    results = gw.chat_many_sync(reqs)
    assert [r.tag for r in results] == list(range(300))
    ok = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    assert all(r.text and r.text.startswith("echo ") for r in ok)
    assert all(r.reject_reason in REASONS for r in bad)
    faults = server.stats()["faults"]
    assert set(faults) >= set(ALL_RANDOM_KINDS) - {"hang"}  # every kind was exercised
    n_bad_answers = sum(faults.get(k, 0) for k in BAD_ANSWER_KINDS)
    assert len(bad) == n_bad_answers > 0  # each bad answer became exactly one reject
    assert sum(faults.get(k, 0) for k in HTTP200_FAULT_KINDS) > 0  # ... and these none
    # every result is journaled exactly once; the re-run sends nothing
    lines = list(iter_entries(gw.run_dir))
    assert sorted(x["key"] for x in lines) == sorted(r.key for r in results)
    server.reset()
    again = make_gw().chat_many_sync(reqs)
    assert server.stats()["requests"] == 0
    assert [(r.ok, r.reject_reason) for r in again] == [(r.ok, r.reject_reason) for r in results]


CANARY = "sk-canary-7f3a9c1e5b2d4e6f8a0b"
WRONG = "sk-canary-wrong-0d9e8f7a6b5c"


def test_canary_key_appears_nowhere(server, make_gw, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # openai and httpx2 debug logs included
    monkeypatch.setenv("RANKMILL_TEST_KEY", CANARY)
    server.script(
        require_key=CANARY,
        fault_rate=0.3,
        fault_seed=3,
        retry_after_s=0.01,
        fault_kinds=["429", "500", "reset", "length", "malformed"],
    )
    run_dir = tmp_path / "run"
    gw = make_gw(run_dir=str(run_dir), api_key_env="RANKMILL_TEST_KEY", max_attempts=10)
    results = gw.chat_many_sync([ChatRequest(messages=user(f"q{i}")) for i in range(40)])
    assert any(r.ok for r in results)
    assert server.stats()["auth_failures"] == 0  # the key was sent, to the server only
    texts = [repr(gw), repr(gw.__dict__)]
    # A wrong key: the 401's exception must not carry it either.
    monkeypatch.setenv("RANKMILL_WRONG_KEY", WRONG)
    server.script(fault_rate=0.0)
    bad = make_gw(run_dir=str(run_dir), api_key_env="RANKMILL_WRONG_KEY")
    with pytest.raises(LLMAuthError) as info:
        bad.chat_sync(ChatRequest(messages=user("again")))
    assert "RANKMILL_WRONG_KEY" in str(info.value)
    texts += [str(info.value), "".join(traceback.format_exception(info.value))]
    gw.close()
    bad.close()
    texts += [rec.getMessage() for rec in caplog.records]
    for text in texts:
        assert CANARY not in text and WRONG not in text
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        assert CANARY.encode() not in data and WRONG.encode() not in data


def test_missing_key_variable_is_a_clear_error(server, make_gw, monkeypatch):
    monkeypatch.delenv("RANKMILL_ABSENT_KEY", raising=False)
    with pytest.raises(LLMAuthError, match="RANKMILL_ABSENT_KEY"):
        make_gw(api_key_env="RANKMILL_ABSENT_KEY")
