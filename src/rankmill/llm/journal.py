"""The durable LLM response journal: every completed answer is on disk before it is used.

A run's journal is a directory (``<run_dir>/llm/journal/``) of JSON-lines files, one file per
writer (a process or Ray actor: ``<host>-<pid>-<random>.jsonl``), so workers on several Ray
nodes that share the run directory never append to the same file. Each line is one
completed response, keyed by the request key (see :func:`rankmill.llm.client.request_key`)::

    {"v": 1, "key": "...", "ep": "http://host/v1", "model": "m", "ok": true, "reason": null,
     "text": "yes", "finish_reason": "stop", "logprobs": [...], "prompt_tokens": 31,
     "completion_tokens": 1, "cost_usd": 0.0, "seed": 123, "stage": "label", "t": 1.7e9}

Bad answers (``finish_reason=length``, content filter, empty, malformed) are journaled too,
with ``ok: false`` and the reason, so a re-run returns the same reject instead of paying for
it again; transport errors are never journaled. The API key is never part of a line.

Appends are group-committed: :meth:`Journal.append` queues the line and returns once a flush
that contains it has been written and fsync'ed, so many concurrent requests share one fsync
and an answer is never used before it is durable. A crash can leave a torn last line; loading
skips any line that does not parse (only the last line of a file can be torn, because each
file has a single writer).

Use::

    j = Journal(run_dir_path + "/llm/journal")
    entries = j.load(endpoint="http://host/v1")   # key -> entry, from every writer's file
    await j.append(entry)                          # durable when it returns
    j.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1

try:  # orjson is several times cheaper per line; plain json is the fallback
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is normally present

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads


@dataclass
class JournalTotals:
    """What the journal says the run has already paid for (all endpoints)."""

    requests: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def local_path(run_dir: str) -> str:
    """The local file-system path of a run directory; the journal needs fsync and append."""
    if run_dir.startswith("file://"):
        return run_dir[len("file://") :]
    if "://" in run_dir:
        from rankmill.errors import LLMError

        raise LLMError(
            f"the LLM journal needs a local or shared POSIX file system (append + fsync); run "
            f"directory {run_dir!r} is not one. Use a local path or a network mount for the run."
        )
    return os.path.abspath(run_dir)


def journal_dir(run_dir: str) -> str:
    return os.path.join(local_path(run_dir), "llm", "journal")


def _iter_lines(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = _loads(line)
        except ValueError:
            # A torn last line is what a crash mid-append leaves: expected, skipped quietly.
            level = logging.DEBUG if i >= len(lines) - 2 else logging.WARNING
            log.log(level, "journal %s line %d does not parse; skipped", path.name, i + 1)
            continue
        if isinstance(entry, dict) and "key" in entry:
            yield entry


def scan(directory: str, endpoint: str | None = None) -> tuple[dict[str, dict], JournalTotals]:
    """Read every journal file in ``directory``: entries of ``endpoint`` (all when None) by key,
    and totals over all endpoints."""
    entries: dict[str, dict] = {}
    totals = JournalTotals()
    d = Path(directory)
    if not d.is_dir():
        return entries, totals
    for path in sorted(d.glob("*.jsonl")):
        for e in _iter_lines(path):
            key = e["key"]
            if endpoint is None or e.get("ep") == endpoint:
                prev = entries.get(key)
                # A success beats a journaled reject of the same key (a later resample).
                if prev is None or (not prev.get("ok") and e.get("ok")):
                    entries[key] = e
            totals.requests += 1
            totals.cost_usd += float(e.get("cost_usd") or 0.0)
            totals.prompt_tokens += int(e.get("prompt_tokens") or 0)
            totals.completion_tokens += int(e.get("completion_tokens") or 0)
    return entries, totals


class Journal:
    """One writer's append-only journal file plus a read view of all writers' files."""

    def __init__(self, directory: str, writer_id: str | None = None):
        self.directory = directory
        self.writer_id = writer_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.path = os.path.join(directory, f"{self.writer_id}.jsonl")
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing = False
        # One thread does the writes and fsyncs, so the event loop never blocks on the disk.
        self._executor: ThreadPoolExecutor | None = None
        self.totals = JournalTotals()

    def load(self, endpoint: str | None = None) -> dict[str, dict]:
        entries, self.totals = scan(self.directory, endpoint)
        return entries

    # -- writing -------------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None:
            os.makedirs(self.directory, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            # Make the new file's directory entry durable too.
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return self._fd

    def _write_durably(self, lines: list[bytes]) -> None:
        with self._lock:
            fd = self._open()
            data = b"".join(lines)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)

    def append_sync(self, entry: dict[str, Any]) -> None:
        """Append one entry durably, blocking (for code outside an event loop)."""
        self._write_durably([_dumps(entry) + b"\n"])

    async def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry``; returns once it is written and fsync'ed (group commit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((_dumps(entry) + b"\n", fut))
        if not self._flushing:
            self._flushing = True
            loop.create_task(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="rankmill-journal")
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(
                        self._executor, self._write_durably, [line for line, _ in batch]
                    )
                except Exception as exc:  # the disk failed: every waiter must know
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._flushing = False

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
