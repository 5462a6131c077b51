"""The journal's store: keyed lookups that read nothing up front, writers killed mid-run and
mid-publish, compaction (and its CLI), corrupt files, and run dirs on object storage (a local
S3 server)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankmill.errors import JournalError
from rankmill.llm import ChatRequest
from rankmill.llm import journal as journal_mod
from rankmill.llm.journal import Journal, compact, maintain, read_totals
from tests.fixtures.s3 import LocalS3
from tests.llm.conftest import user

REPO = Path(__file__).resolve().parents[2]


def _entry(key: str, ok: bool = True, cost: float = 0.001, text: str = "yes") -> dict:
    return {
        "v": 1,
        "key": key,
        "ok": ok,
        "reason": None if ok else "truncated",
        "text": text,
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "cost_usd": cost,
    }


def _write(run_dir: str, keys: list[str], ok: bool = True, **kw) -> None:
    j = Journal(run_dir, **kw)
    for k in keys:
        j.append_sync(_entry(k, ok))
    j.close()


def _segments(run_dir: str) -> list[str]:
    return sorted(p.name for p in Path(run_dir, "llm", "journal").glob("*.sqlite"))


def _kill_writer(run_dir: str, keys: list[str], env: dict[str, str] | None = None) -> None:
    """A process that journals ``keys`` and is SIGKILLed before it closes its journal."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from rankmill.llm.journal import Journal
        j = Journal({run_dir!r}, writer_id="killed")
        for k in {keys!r}:
            j.append_sync({{"key": k, "ok": True, "text": "t-" + k, "cost_usd": 0.5}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


# -- lookups -------------------------------------------------------------------------------------
def test_opening_reads_no_entry_and_a_lookup_reads_one(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    _write(run, [f"a{i}" for i in range(1500)])
    _write(run, [f"b{i}" for i in range(1500)])
    decoded = []
    real = journal_mod._loads
    monkeypatch.setattr(journal_mod, "_loads", lambda b: decoded.append(1) or real(b))
    j = Journal(run)
    assert decoded == [] and len(j) == 3000  # counts come from the segments' totals
    assert j.get("b777")["key"] == "b777" and len(decoded) == 1
    assert j.get("missing") is None and len(decoded) == 1
    for seg in j._readers():
        (plan,) = seg.conn.execute(
            "EXPLAIN QUERY PLAN SELECT ok, body FROM entries WHERE key = ?", ("x",)
        ).fetchall()
        assert "USING INDEX" in plan[-1]  # one B-tree probe, not a scan
    j.close()


def test_a_success_wins_over_a_journaled_reject_of_the_same_key(tmp_path):
    run = str(tmp_path / "run")
    _write(run, ["k"], ok=False)
    _write(run, ["k"], ok=True)
    j = Journal(run)
    assert j.get("k")["ok"] is True
    j.close()


# -- crashes -------------------------------------------------------------------------------------
def test_a_killed_writer_is_published_once_by_the_next_opener(tmp_path):
    run = str(tmp_path / "run")
    _kill_writer(run, [f"k{i}" for i in range(10)])
    live = Path(run, "llm", "journal", "live")
    assert (live / "killed.sqlite").exists() and _segments(run) == []
    j = Journal(run)
    assert all(j.get(f"k{i}")["text"] == f"t-k{i}" for i in range(10))
    assert _segments(run) == ["killed-000000.sqlite"]
    assert not list(live.glob("killed.*"))
    assert j.totals().requests == 10 and j.totals().cost_usd == pytest.approx(5.0)
    j.close()
    assert read_totals(run).requests == 10  # opening again publishes nothing twice


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_publish_cut_short_is_redone_under_the_same_name(tmp_path, monkeypatch, when):
    run = str(tmp_path / "run")
    j = Journal(run, writer_id="w")
    for i in range(3):
        j.append_sync(_entry(f"k{i}"))
    real_put = journal_mod._Place.put

    def crash(self, tmp, name, totals):
        if when == "after":
            real_put(self, tmp, name, totals)
        raise OSError("power cut")

    monkeypatch.setattr(journal_mod._Place, "put", crash)
    with pytest.raises(OSError, match="power cut"):
        j.close()
    j._filelock.release()  # the process is gone: so is its lock
    monkeypatch.setattr(journal_mod._Place, "put", real_put)
    again = Journal(run)
    assert _segments(run) == ["w-000000.sqlite"]
    assert again.totals().requests == 3 and all(again.get(f"k{i}") for i in range(3))
    again.close()


# -- compaction ----------------------------------------------------------------------------------
def test_compaction_merges_segments_and_keeps_what_was_paid(tmp_path):
    run = str(tmp_path / "run")
    _write(run, [f"k{i}" for i in range(10)])
    _write(run, [f"k{i}" for i in range(5, 15)])  # k5..k9 paid twice
    _write(run, ["r"], ok=False)
    _write(run, ["r"], ok=True)
    live = Journal(run)  # a writer still at work
    live.append_sync(_entry("z"))
    assert len(_segments(run)) == 4
    before = read_totals(run)
    rep = compact(run)
    assert (rep.segments_before, rep.segments_after) == (4, 1)
    assert rep.entries == 16  # k0..k14 and r, once each
    after = read_totals(run)
    assert after.requests == before.requests == 22  # what was paid stays paid
    assert after.cost_usd == pytest.approx(before.cost_usd)
    j = Journal(run)
    assert j.get("r")["ok"] is True and j.get("k12") is not None and j.get("z") is not None
    j.close()
    live.close()  # its answers were never compacted away: they come as its own segment
    assert len(_segments(run)) == 2 and Journal(run).get("z") is not None
    assert compact(run).segments_after == 1 and compact(run).segments_before == 1


def test_automatic_compaction_keeps_the_largest_segment(tmp_path):
    run = str(tmp_path / "run")
    _write(run, [f"big{i}" for i in range(500)])
    for w in range(4):
        _write(run, [f"s{w}-{i}" for i in range(3)])
    biggest = max(_segments(run), key=lambda n: os.path.getsize(Path(run, "llm", "journal", n)))
    totals = maintain(run, max_segments=3)
    assert totals.requests == 512
    assert len(_segments(run)) == 2 and biggest in _segments(run)
    assert totals.requests == read_totals(run).requests


def test_journal_compact_cli(tmp_path):
    from rankmill.cli import app

    run = str(tmp_path / "run")
    for w in range(3):
        _write(run, [f"{w}-{i}" for i in range(4)])
    result = CliRunner().invoke(app, ["journal", "compact", run])
    assert result.exit_code == 0, result.output
    assert "3 -> 1 segment(s), 12 entries" in result.output
    assert len(_segments(run)) == 1


# -- corrupt files -------------------------------------------------------------------------------
def test_a_corrupt_segment_is_named_with_what_to_do(tmp_path, server, make_gw):
    run = str(tmp_path / "run")
    _write(run, ["k"])
    bad = Path(run, "llm", "journal", "zz-bad.sqlite")
    bad.write_bytes(b"this is not a database, it is what a bad copy left" * 100)
    with pytest.raises(JournalError) as info:
        make_gw(run_dir=run).chat_sync(ChatRequest(messages=user("hello")))
    msg = str(info.value)
    assert str(bad) in msg and "move it out of the run directory" in msg
    assert "\n" not in msg


def test_a_truncated_segment_is_named(tmp_path):
    run = str(tmp_path / "run")
    j = Journal(run)
    for i in range(400):
        j.append_sync(_entry(f"k{i}", text="x" * 2000))
    j.close()
    (name,) = _segments(run)
    path = Path(run, "llm", "journal", name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reader = Journal(run)
    with pytest.raises(JournalError, match=name):
        for i in range(400):
            reader.get(f"k{i}")


def test_a_corrupt_totals_file_is_named(tmp_path):
    run = str(tmp_path / "run")
    _write(run, ["k"])
    (side,) = Path(run, "llm", "journal").glob("*.json")
    side.write_text("{not json")
    with pytest.raises(JournalError, match=side.name):
        Journal(run)


# -- object storage ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _s3():
    with LocalS3() as s3:
        yield s3


@pytest.fixture()
def s3(_s3, monkeypatch):
    for k, v in _s3.env.items():
        monkeypatch.setenv(k, v)
    return _s3


def test_object_storage_answers_are_in_the_run_dir_before_they_are_returned(
    s3, server, make_gw, tmp_path, monkeypatch
):
    run = s3.uri("gw-run")
    monkeypatch.setenv(journal_mod.LOCAL_ROOT_ENV, str(tmp_path / "node-a"))
    reqs = [ChatRequest(messages=user(f"q{i}")) for i in range(20)]
    gw = make_gw(run_dir=run)
    first = gw.chat_many_sync(reqs)
    # Published by the time chat_many returned, i.e. before a unit could commit on them.
    keys = s3.keys("gw-run/llm/journal/")
    assert any(k.endswith(".sqlite") for k in keys) and any(k.endswith(".json") for k in keys)
    server.reset()
    monkeypatch.setenv(journal_mod.LOCAL_ROOT_ENV, str(tmp_path / "node-b"))  # another node
    other = make_gw(run_dir=run)
    again = other.chat_many_sync(reqs)
    assert server.stats()["requests"] == 0 and all(r.cached for r in again)
    assert [r.text for r in again] == [r.text for r in first]
    # A second batch is published too (the first one's rows already left the live store).
    more = [ChatRequest(messages=user(f"more {i}")) for i in range(7)]
    gw.chat_many_sync(more)
    assert read_totals(run, local_root=str(tmp_path / "node-c")).requests == 27
    gw.close()
    other.close()
    assert read_totals(run).requests == 27


def test_object_storage_killed_writer_is_published_from_its_node(s3, tmp_path):
    run = s3.uri("killed-run")
    node_a, node_b = str(tmp_path / "node-a"), str(tmp_path / "node-b")
    _kill_writer(run, ["x", "y"], env={**s3.env, journal_mod.LOCAL_ROOT_ENV: node_a})
    assert s3.keys("killed-run/") == []  # nothing was published before the kill
    assert Journal(run, local_root=node_b).get("x") is None
    Journal(run, local_root=node_a).close()  # the next journal on that node publishes it
    j = Journal(run, local_root=node_b)
    assert j.get("x")["text"] == "t-x" and j.totals().requests == 2
    j.close()


def test_object_storage_compaction(s3, tmp_path):
    run = s3.uri("compact-run")
    for w in range(3):
        _write(run, [f"{w}-{i}" for i in range(5)], local_root=str(tmp_path / f"n{w}"))
    assert len([k for k in s3.keys("compact-run/") if k.endswith(".sqlite")]) == 3
    rep = compact(run, local_root=str(tmp_path / "compactor"))
    assert (rep.segments_before, rep.segments_after, rep.entries) == (3, 1, 15)
    assert len([k for k in s3.keys("compact-run/") if k.endswith(".sqlite")]) == 1
    j = Journal(run, local_root=str(tmp_path / "fresh"))
    assert all(j.get(f"{w}-{i}") for w in range(3) for i in range(5))
    assert j.totals().requests == 15
    j.close()


def test_a_segment_compacted_away_under_a_reader_is_found_again(tmp_path):
    run = str(tmp_path / "run")
    _write(run, ["a"])
    _write(run, ["b"])
    reader = Journal(run)  # listed two segments, opened none yet
    compact(run)
    assert reader.get("a") is not None and reader.get("b") is not None
    reader.close()


def test_live_store_is_wal_with_full_sync(tmp_path):
    j = Journal(str(tmp_path / "run"))
    j.append_sync(_entry("k"))
    conn = sqlite3.connect(j.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert j._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    j.close()


def test_appends_from_several_threads_each_with_its_own_loop(tmp_path):
    import asyncio
    import threading

    j = Journal(str(tmp_path / "run"))

    def worker(t: int) -> None:
        async def many() -> None:
            await asyncio.gather(*(j.append(_entry(f"{t}-{i}")) for i in range(150)))

        asyncio.run(many())

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(j.get(f"{t}-{i}") for t in range(4) for i in range(150))
    assert j.totals().requests == 600
    j.close()
    assert read_totals(str(tmp_path / "run")).requests == 600
