"""The one retry layer: what is retried, what fails at once and with which error, Retry-After."""

from __future__ import annotations

import time

import pytest

from rankmill.errors import LLMAuthError, LLMQuotaError, LLMRequestError, LLMRetryExhausted
from rankmill.llm import ChatRequest
from rankmill.llm.journal import iter_entries
from tests.llm.conftest import user


def _arrivals(server) -> list[float]:
    return [t for t, _ in server.stats()["arrivals"]]


@pytest.mark.parametrize("kind", ["500", "503", "reset", "truncated", "hang", "429"])
def test_transient_errors_are_retried(server, make_gw, kind):
    server.script(plan=[kind, kind], retry_after_s=0.05, hang_s=5)
    gw = make_gw(timeout_s=0.5)
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert r.ok and r.text and r.attempts == 3
    assert server.stats()["requests"] == 3
    assert len(server.stats()["completed"]) == 1


def test_retry_after_is_honoured(server, make_gw):
    server.script(plan=["429", "429"], retry_after_s=0.6)
    gw = make_gw()  # backoff itself is ~10 ms: only Retry-After can explain the gaps
    t0 = time.monotonic()
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert r.ok
    assert time.monotonic() - t0 >= 1.2
    t = _arrivals(server)
    assert len(t) == 3
    assert t[1] - t[0] >= 0.6 and t[2] - t[1] >= 0.6


@pytest.mark.parametrize(
    ("kind", "error", "hint"),
    [
        ("400", LLMRequestError, "sampling params"),
        ("404", LLMRequestError, "endpoints.default.model"),
        ("401", LLMAuthError, "api_key_env"),
        ("403", LLMAuthError, "api_key_env"),
        ("quota", LLMQuotaError, "quota"),
    ],
)
def test_fatal_statuses_fail_at_once_with_a_hint(server, make_gw, kind, error, hint):
    server.script(plan=[kind])
    gw = make_gw()
    with pytest.raises(error) as info:
        gw.chat_sync(ChatRequest(messages=user("hello")))
    assert hint in str(info.value)
    assert server.stats()["requests"] == 1  # not retried
    # transport and status errors are never journaled
    assert list(iter_entries(gw.run_dir)) == []


def test_attempts_are_bounded(server, make_gw):
    server.script(plan=["500"] * 10)
    gw = make_gw(max_attempts=3)
    with pytest.raises(LLMRetryExhausted) as info:
        gw.chat_sync(ChatRequest(messages=user("hello")))
    assert "3 attempt" in str(info.value) and "max_attempts" in str(info.value)
    assert server.stats()["requests"] == 3


def test_retry_time_is_bounded(server, make_gw):
    server.script(plan=["429"] * 10, retry_after_s=0.5)
    gw = make_gw(max_attempts=10, max_retry_time_s=1.2)
    t0 = time.monotonic()
    with pytest.raises(LLMRetryExhausted):
        gw.chat_sync(ChatRequest(messages=user("hello")))
    assert time.monotonic() - t0 < 2.0
    assert server.stats()["requests"] <= 3


def test_a_fatal_error_stops_the_batch_and_keeps_finished_answers(server, make_gw):
    gw = make_gw(max_concurrency=1)
    reqs = [ChatRequest(messages=user(f"q{i}")) for i in range(5)]
    server.script(plan=["ok", "ok", "401"])
    with pytest.raises(LLMAuthError):
        gw.chat_many_sync(reqs)
    # the answers that came back before the error are journaled: a re-run does not pay them
    assert server.stats()["requests"] == 3
    server.reset()
    with pytest.raises(LLMAuthError):  # the stopped gateway stays stopped
        gw.chat_many_sync(reqs)
    assert server.stats()["requests"] == 0
    results = make_gw(max_concurrency=1).chat_many_sync(reqs)  # a re-run builds a new one
    assert all(r.ok for r in results)
    assert sum(r.cached for r in results) == 2
    assert server.stats()["requests"] == 3
