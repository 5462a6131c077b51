"""Errors that cannot heal stop the endpoint at once, for every request and every worker;
broken HTTP 200 bodies are retried, never journaled; retries are counted."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rankmill import errors
from rankmill.config import EndpointConfig
from rankmill.errors import (
    LLMAuthError,
    LLMError,
    LLMQuotaError,
    LLMRequestError,
    LLMRetryExhausted,
    LLMUnreachable,
    RankmillError,
)
from rankmill.llm import ChatRequest, Gateway
from rankmill.llm.client import read_fatal_markers
from rankmill.llm.journal import Journal, iter_entries
from tests.fixtures.openai_server import HTTP200_FAULT_KINDS, free_port
from tests.llm.conftest import user


def _lines(gw: Gateway) -> list[dict]:
    gw.journal.close()  # published: what a later reader of the run dir sees
    return list(iter_entries(gw.run_dir))


def test_fatal_classes_are_marked():
    fatal = {c.__name__ for c in (LLMAuthError, LLMRequestError, LLMQuotaError, LLMUnreachable)}
    assert all(getattr(errors, n).fatal for n in fatal)
    assert not LLMRetryExhausted.fatal and not LLMError.fatal and not RankmillError.fatal
    assert issubclass(LLMUnreachable, LLMError)


def test_a_bad_key_sends_one_request_and_says_what_to_fix(server, make_gw, monkeypatch):
    monkeypatch.setenv("RANKMILL_TEST_KEY", "sk-wrong")
    server.script(require_key="sk-right")
    gw = make_gw(api_key_env="RANKMILL_TEST_KEY", max_concurrency=16)
    reqs = [ChatRequest(messages=user(f"q{i}")) for i in range(50)]
    with pytest.raises(LLMAuthError) as info:
        gw.chat_many_sync(reqs)
    msg = str(info.value)
    assert "\n" not in msg and "sk-wrong" not in msg
    for part in ("'default'", server.base_url, "RANKMILL_TEST_KEY", "check the key"):
        assert part in msg
    assert server.stats()["requests"] == 1  # the probe; the other 49 never left
    # sticky: later calls fail with the same error, sending nothing
    with pytest.raises(LLMAuthError) as again:
        gw.chat_sync(ChatRequest(messages=user("later")))
    assert str(again.value) == msg
    assert server.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("403", LLMAuthError, "denied access"),
        ("404", LLMRequestError, "does not know model 'fake'"),
        ("quota", LLMQuotaError, "quota is exhausted"),
    ],
)
def test_each_fatal_answer_stops_the_endpoint(server, make_gw, kind, error, words):
    server.script(always=kind)
    gw = make_gw(max_concurrency=8)
    with pytest.raises(error) as info:
        gw.chat_many_sync([ChatRequest(messages=user(f"q{i}")) for i in range(20)])
    assert words in str(info.value) and "\n" not in str(info.value)
    assert server.stats()["requests"] == 1


def test_a_fatal_error_fails_the_requests_in_flight_at_once(server, make_gw):
    # Proven by a first answer, then three requests hang and the fourth meets a 401.
    server.script(plan=["ok", "hang", "hang", "hang", "401"], hang_s=120)
    gw = make_gw(max_concurrency=4, timeout_s=60)
    assert gw.chat_sync(ChatRequest(messages=user("first"))).ok

    async def four() -> list:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(gw.chat(ChatRequest(messages=user(f"q{i}")))))
            await asyncio.sleep(0.05)  # arrive in order: the 401 comes last
        return await asyncio.gather(*tasks, return_exceptions=True)

    t0 = time.monotonic()
    outcomes = gw.run(four())
    # Far sooner than any request timeout could have ended the hanging ones.
    assert time.monotonic() - t0 < 30
    assert [type(o) for o in outcomes] == [LLMAuthError] * 4
    assert len({str(o) for o in outcomes}) == 1
    assert server.stats()["requests"] == 5


def test_other_gateways_of_the_run_stop_before_sending(server, make_gw, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("RANKMILL_TEST_KEY", "sk-wrong")
    server.script(require_key="sk-right")
    # Two workers' gateways, built when the stage starts.
    first = make_gw(run_dir=run_dir, api_key_env="RANKMILL_TEST_KEY")
    second = make_gw(run_dir=run_dir, api_key_env="RANKMILL_TEST_KEY")
    with pytest.raises(LLMAuthError) as info:
        first.chat_sync(ChatRequest(messages=user("a")))
    assert server.stats()["requests"] == 1
    with pytest.raises(LLMAuthError) as other:
        second.chat_many_sync([ChatRequest(messages=user(f"b{i}")) for i in range(10)])
    assert str(other.value) == str(info.value)
    assert server.stats()["requests"] == 1  # the second worker sent nothing
    (marker,) = read_fatal_markers(run_dir)
    assert marker["error"] == "LLMAuthError" and marker["endpoint"] == "default"
    assert "sk-wrong" not in json.dumps(marker)
    # The user fixes the key and runs again: gateways built now ignore the old marker.
    monkeypatch.setenv("RANKMILL_TEST_KEY", "sk-right")
    fixed = make_gw(run_dir=run_dir, api_key_env="RANKMILL_TEST_KEY")
    assert fixed.chat_sync(ChatRequest(messages=user("a"))).ok


def test_a_marker_of_another_endpoint_stops_nothing(server, make_gw, tmp_path):
    run_dir = str(tmp_path / "run")
    server.script(always="404")
    bad = make_gw(run_dir=run_dir, model="no-such-model")
    good = make_gw(run_dir=run_dir)
    with pytest.raises(LLMRequestError):
        bad.chat_sync(ChatRequest(messages=user("a")))
    server.script(always=None)
    assert good.chat_sync(ChatRequest(messages=user("a"))).ok


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_refused_connection_is_unreachable_within_seconds(tmp_path, transport):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    ep = EndpointConfig(base_url=url, model="m", max_attempts=6, max_concurrency=8)
    gw = Gateway(ep, run_dir=str(tmp_path / "run"), name="teacher", transport=transport)
    t0 = time.monotonic()
    try:
        with pytest.raises(LLMUnreachable) as info:
            gw.chat_many_sync([ChatRequest(messages=user(f"q{i}")) for i in range(20)])
    finally:
        gw.close()
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "connection refused" in msg and url in msg and "endpoints.teacher.base_url" in msg
    assert "timeout" not in msg.lower() and "\n" not in msg


def test_an_unknown_host_is_unreachable(tmp_path):
    ep = EndpointConfig(base_url="http://no-such-host.invalid/v1", model="m")
    gw = Gateway(ep, run_dir=str(tmp_path / "run"), name="teacher")
    try:
        with pytest.raises(LLMUnreachable) as info:
            gw.chat_sync(ChatRequest(messages=user("q")))
    finally:
        gw.close()
    assert "host name not found" in str(info.value)


@pytest.mark.parametrize("kind", HTTP200_FAULT_KINDS)
def test_broken_200_bodies_are_retried_with_the_same_seed(server, make_gw, kind):
    server.script(plan=[kind, kind])
    gw = make_gw()
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert r.ok and r.text and r.attempts == 3
    (attempts,) = server.stats()["attempts"].values()  # one request body, sent three times
    assert attempts == 3
    (line,) = _lines(gw)
    assert line["ok"] is True and line["seed"] == r.seed


def test_broken_200_bodies_that_persist_are_an_error_not_an_answer(server, make_gw):
    server.script(always="empty_choices")
    gw = make_gw(max_attempts=3)
    with pytest.raises(LLMRetryExhausted) as info:
        gw.chat_sync(ChatRequest(messages=user("hello")))
    assert "HTTP 200 with a bad body" in str(info.value)
    assert _lines(gw) == []


def test_a_journaled_transport_fault_of_an_older_run_is_asked_again(server, make_gw, tmp_path):
    req = ChatRequest(messages=user("hello"))
    first = make_gw(run_dir=str(tmp_path / "a")).chat_sync(req)
    # What older versions journaled for an HTTP 200 with "choices": [] under that key.
    run_dir = str(tmp_path / "b")
    with Journal(run_dir) as j:
        j.append_sync(
            {"v": 1, "key": first.key, "ep": server.base_url, "model": "fake", "ok": False,
             "reason": "empty_choices", "text": None, "seed": first.seed, "t": time.time()}
        )  # fmt: skip
    server.reset()
    again = make_gw(run_dir=run_dir).chat_sync(req)
    assert again.ok and not again.cached and again.text == first.text
    assert server.stats()["requests"] == 1


def test_a_prompt_too_long_is_a_reject_and_the_endpoint_goes_on(server, make_gw):
    server.script(plan=["context_length"])
    gw = make_gw(max_concurrency=1)
    a, b = gw.chat_many_sync([ChatRequest(messages=user(f"q{i}")) for i in range(2)])
    assert not a.ok and a.reject_reason == "prompt_too_long" and "context length" in a.detail
    assert b.ok
    assert [x["ok"] for x in _lines(gw)] == [True]  # nothing paid, not kept
    assert gw.counters()["rejects"] == {"prompt_too_long": 1}


def test_retries_are_counted_and_waiting_ones_are_visible(server, make_gw):
    from rankmill.manifest import Counters

    server.script(plan=["429", "500"], retry_after_s=2.0)
    gw = make_gw()
    seen: list[int] = []

    async def watch() -> None:
        task = asyncio.ensure_future(gw.chat(ChatRequest(messages=user("hello"))))
        while not task.done():
            seen.append(gw.counters()["waiting_retry"])
            await asyncio.sleep(0.05)
        assert (await task).ok

    gw.run(watch())
    assert max(seen) == 1  # the request slept before a retry, and it showed
    assert gw.counters()["retries"] == 2 and gw.counters()["waiting_retry"] == 0
    c = Counters()
    gw.fill_counters(c)
    assert c.extra["llm_retries"] == 2 and c.llm_calls == 1


def test_request_timeout_defaults_to_a_size_from_max_tokens(server, make_gw):
    gw = make_gw(timeout_s=None)
    assert EndpointConfig(base_url="http://x/v1", model="m").timeout_s is None
    assert gw.request_timeout({"max_tokens": 8}) == pytest.approx(30.4)
    assert gw.request_timeout({}) == pytest.approx(30 + 0.05 * 1024)
    assert make_gw(timeout_s=7).request_timeout({"max_tokens": 8}) == 7
    # A hung request ends at its timeout and is retried: the answer still comes back.
    server.script(plan=["hang"], hang_s=3)
    r = make_gw(timeout_s=0.5).chat_sync(ChatRequest(messages=user("hello")))
    assert r.ok and r.attempts == 2
