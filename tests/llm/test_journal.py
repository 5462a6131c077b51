"""The durable journal through the gateway: answers on disk before use, re-runs that send
nothing, one store per writer, older JSON-lines journals, bad answers as rejects, keys and
seeds. The store itself (crashes, compaction, corrupt files, object storage) is tested in
test_journal_store.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rankmill.llm import ChatRequest, parse_completion
from rankmill.llm.journal import Journal, iter_entries, read_totals
from tests.llm.conftest import user


def _lines(run_dir: str) -> list[dict]:
    """Every journaled entry, read from disk by another connection."""
    return list(iter_entries(run_dir))


def test_an_answer_is_on_disk_before_it_is_returned(server, make_gw):
    gw = make_gw()
    seen: list[int] = []
    real_append = gw.journal.append

    async def spy(entry):
        await real_append(entry)
        seen.append(len(_lines(gw.run_dir)))

    gw.journal.append = spy  # type: ignore[method-assign]
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert seen == [1]  # the entry was readable from the disk when append returned
    (line,) = _lines(gw.run_dir)
    assert line["key"] == r.key and line["text"] == r.text and line["ok"] is True


def test_a_finished_batch_rerun_sends_no_request(server, make_gw, tmp_path):
    reqs = [ChatRequest(messages=user(f"q{i}"), sample_index=s) for i in range(30) for s in (0, 1)]
    first = make_gw().chat_many_sync(reqs)
    assert server.stats()["requests"] == 60
    server.reset()
    again_gw = make_gw()  # a new process would build a new gateway on the same run dir
    again = again_gw.chat_many_sync(reqs)
    assert server.stats()["requests"] == 0
    assert [r.text for r in again] == [r.text for r in first]
    assert all(r.cached for r in again)
    c = again_gw.counters()
    assert c["llm_calls"] == 0 and c["llm_cached"] == 60


def test_an_older_json_lines_journal_is_converted_once(server, make_gw, tmp_path):
    reqs = [ChatRequest(messages=user(f"q{i}")) for i in range(5)]
    first = make_gw(run_dir=str(tmp_path / "new"))
    first.chat_many_sync(reqs)
    first.close()
    entries = _lines(first.run_dir)
    # What an older rankmill left: a JSON-lines file per writer, a torn last line after a crash.
    old = tmp_path / "old" / "llm" / "journal"
    old.mkdir(parents=True)
    legacy = old / "host-1-abcd.jsonl"
    legacy.write_bytes(
        b"".join(json.dumps(e).encode() + b"\n" for e in entries) + b'{"v": 1, "key": "x", "ok": tr'
    )
    server.reset()
    results = make_gw(run_dir=str(tmp_path / "old")).chat_many_sync(reqs)
    assert all(r.cached and r.ok for r in results)
    assert server.stats()["requests"] == 0
    assert not legacy.exists() and (old / "legacy-host-1-abcd.sqlite").exists()
    totals = read_totals(str(tmp_path / "old"))
    assert totals.requests == 5 and totals.entries == 5


def test_each_writer_has_its_own_store_and_all_are_read(server, make_gw):
    a, b = make_gw(), make_gw()
    a.chat_many_sync([ChatRequest(messages=user("from a"))])
    b.chat_many_sync([ChatRequest(messages=user("from b"))])
    assert a.journal.path != b.journal.path
    assert Path(a.journal.path).exists() and Path(b.journal.path).exists()
    a.close()
    b.close()
    segments = sorted(Path(a.journal.directory).glob("*.sqlite"))
    assert len(segments) == 2  # one immutable segment per writer once it closed
    assert not list(Path(a.journal.directory, "live").glob("*.sqlite"))
    server.reset()
    c = make_gw()
    rs = c.chat_many_sync(
        [ChatRequest(messages=user("from a")), ChatRequest(messages=user("from b"))]
    )
    assert all(r.cached for r in rs) and server.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("length", "truncated"),
        ("content_filter", "content_filter"),
        ("empty_content", "empty_content"),
    ],
)
def test_bad_answers_are_rejects_journaled_as_such(server, make_gw, kind, reason):
    server.script(plan=[kind])
    gw = make_gw()
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert not r.ok and r.reject_reason == reason
    (line,) = _lines(gw.run_dir)
    assert line["ok"] is False and line["reason"] == reason
    # not paid again, and still a reject (never turned into a success)
    server.reset()
    r2 = make_gw().chat_sync(ChatRequest(messages=user("hello")))
    assert r2.cached and not r2.ok and r2.reject_reason == reason
    assert server.stats()["requests"] == 0


def test_a_bad_answer_is_resampled_with_a_new_seed_when_configured(server, make_gw):
    server.script(plan=["length"])
    gw = make_gw(gw_kw={"resample_bad": 1})
    r = gw.chat_sync(ChatRequest(messages=user("hello")))
    assert r.ok and r.resampled == 1
    lines = _lines(gw.run_dir)
    assert [x["ok"] for x in lines] == [False, True]
    assert lines[0]["seed"] != lines[1]["seed"]
    # the re-run gets the successful resample from the journal, without sending
    server.reset()
    r2 = make_gw(gw_kw={"resample_bad": 1}).chat_sync(ChatRequest(messages=user("hello")))
    assert r2.ok and r2.text == r.text and server.stats()["requests"] == 0


def test_samples_have_distinct_deterministic_seeds(server, make_gw, tmp_path):
    reqs = [ChatRequest(messages=user("same prompt"), sample_index=s) for s in range(4)]
    a = make_gw(run_dir=str(tmp_path / "a")).chat_many_sync(reqs)
    b = make_gw(run_dir=str(tmp_path / "b")).chat_many_sync(reqs)
    assert len({r.seed for r in a}) == 4 and len({r.key for r in a}) == 4
    assert [r.seed for r in a] == [r.seed for r in b]
    assert len({r.text for r in a}) == 4  # the server answers differently per seed
    other_seed = make_gw(run_dir=str(tmp_path / "c"), gw_kw={"seed": 99}).chat_many_sync(reqs)
    assert {r.seed for r in other_seed}.isdisjoint({r.seed for r in a})
    pinned = make_gw(run_dir=str(tmp_path / "d")).chat_sync(
        ChatRequest(messages=user("same prompt"), params={"seed": 7})
    )
    assert pinned.seed == 7


def test_key_covers_model_params_messages_sample_but_not_the_api_key(
    server, make_gw, tmp_path, monkeypatch
):
    monkeypatch.setenv("KEY_ONE", "sk-one")
    monkeypatch.setenv("KEY_TWO", "sk-two")
    req = ChatRequest(messages=user("x"), params={"temperature": 0.2})
    k1 = make_gw(run_dir=str(tmp_path / "1"), api_key_env="KEY_ONE").chat_sync(req).key
    k2 = make_gw(run_dir=str(tmp_path / "2"), api_key_env="KEY_TWO").chat_sync(req).key
    assert k1 == k2
    variants = [
        make_gw(run_dir=str(tmp_path / "3"), model="other").chat_sync(req).key,
        make_gw(run_dir=str(tmp_path / "4"))
        .chat_sync(ChatRequest(messages=user("x"), params={"temperature": 0.3}))
        .key,
        make_gw(run_dir=str(tmp_path / "5"))
        .chat_sync(ChatRequest(messages=user("y"), params={"temperature": 0.2}))
        .key,
        make_gw(run_dir=str(tmp_path / "6"))
        .chat_sync(ChatRequest(messages=user("x"), params={"temperature": 0.2}, sample_index=1))
        .key,
    ]
    assert len({k1, *variants}) == 5


def test_concurrent_duplicates_are_sent_once(server, make_gw):
    server.script(latency_s=0.1)
    gw = make_gw()
    rs = gw.chat_many_sync([ChatRequest(messages=user("dup")) for _ in range(5)])
    assert len({r.text for r in rs}) == 1 and server.stats()["requests"] == 1


def test_group_commit_uses_few_transactions(tmp_path):
    j = Journal(str(tmp_path / "run"))
    commits = []
    real = j._write_durably

    def spy(rows):
        commits.append(len(rows))
        real(rows)

    j._write_durably = spy  # type: ignore[method-assign]

    async def many():
        await asyncio.gather(*(j.append({"key": str(i), "ok": True}) for i in range(200)))

    asyncio.run(many())
    assert sum(commits) == 200
    assert len(commits) < 20  # one fsync'ed transaction per flush, not per entry
    assert all(j.get(str(i)) == {"key": str(i), "ok": True} for i in range(200))
    j.close()
    assert len(_lines(str(tmp_path / "run"))) == 200


def test_parse_completion_classifies_bodies():
    ok = {
        "model": "m",
        "choices": [
            {
                "message": {"content": "yes"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {
                            "token": "yes",
                            "logprob": -0.1,
                            "bytes": [1],
                            "top_logprobs": [{"token": "no", "logprob": -2.0}],
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    p = parse_completion(json.dumps(ok).encode())
    assert p["ok"] and p["text"] == "yes" and p["prompt_tokens"] == 5
    assert p["logprobs"] == [
        {"token": "yes", "logprob": -0.1, "top_logprobs": [{"token": "no", "logprob": -2.0}]}
    ]
    assert parse_completion(b"not json")["reason"] == "malformed_response"
    assert parse_completion(b"[]")["reason"] == "malformed_response"
    assert parse_completion(b'{"choices": []}')["reason"] == "empty_choices"
    refusal = {
        "choices": [{"message": {"content": None, "refusal": "I can't"}, "finish_reason": "stop"}]
    }
    assert parse_completion(json.dumps(refusal).encode())["reason"] == "refusal"
