"""The durable LLM response journal: every completed answer is on disk before it is used.

Each completed response (an answer, or a bad answer journaled as a reject) is one *entry*,
keyed by its request key (:func:`rankmill.llm.client.request_key`)::

    {"v": 1, "key": "...", "ep": "http://host/v1", "model": "m", "ok": true, "reason": null,
     "text": "yes", "finish_reason": "stop", "logprobs": [...], "prompt_tokens": 31,
     "completion_tokens": 1, "cost_usd": 0.0, "seed": 123, "stage": "label", "t": 1.7e9}

Transport errors are never journaled; the API key is never part of an entry.

Layout of ``<run_dir>/llm/journal/``::

    <name>.sqlite        an immutable *segment*: a SQLite file of entries, indexed by key
    <name>.json          its totals (entries, requests, cost, tokens), written before it
    live/<writer>.sqlite a writer's live store (local run dirs; see below)
    live/<writer>.lock   held (flock) while that writer is alive

**Writers.** Every writer (one :class:`Journal`, i.e. one gateway in one process or Ray actor)
appends to its own *live store*, a SQLite database in WAL mode with ``synchronous=FULL``, so
writers on many nodes never share a file. :meth:`Journal.append` queues the entry and returns
once a transaction that contains it has committed (group commit: concurrent requests share
one fsync), so an answer is never used before it is durable. When the writer closes it
*publishes* its entries as one immutable segment and removes its live store.

**Object-storage run dirs** (``s3://bucket/run``, through ``pyarrow.fs``; credentials and
endpoint from the environment only, e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``): the live store sits on the node's local disk (``RANKMILL_JOURNAL_DIR``,
default ``~/.cache/rankmill/journal``), and the gateway publishes what it journaled as a
segment at the end of every ``chat``/``chat_many`` call, i.e. before the unit that used the
answers can commit. Segments are downloaded once per node into that cache and read there.

**Readers** look keys up with one indexed query per segment (plus the writer's own live
store); opening a journal lists the segments and opens each (no entry is read), so it costs
the same at a thousand or ten million entries. Segments are immutable, so any node can read
them from a shared file system or its cache without locks.

**Crashes.** A writer killed mid-run leaves its live store (and, on object storage, maybe a
half-published segment that was never renamed into place). The next journal opened on that
run (on object storage: on that node) whose lock on it succeeds publishes it, exactly once:
a publish records which segment it is writing before writing it, so redoing it produces the
same segment under the same name. Readers never see a partial segment (written to a
temporary name, then moved; an object-store PUT is atomic).

**Compaction** (``rankmill journal compact RUN_DIR``, and automatically before an LLM stage
once a run has more than :data:`AUTO_COMPACT_SEGMENTS` segments) merges segments into one,
keeping one entry per key (a success over a reject) and the totals of what was paid. The
merged segment's name is derived from its sources, so two compactions of the same segments
write the same file; sources are deleted only after it is in place.

**Older run dirs** kept a JSON-lines file per writer; each is converted into a segment the
first time the journal is opened, then removed (a torn last line is skipped).

Why SQLite: it is in the standard library, a keyed lookup is one B-tree probe (a few
microseconds, nothing loaded up front), WAL mode gives durable group commit with one fsync
per transaction, and an immutable file can be read over any file system. LMDB would need a
compiled dependency and one memory map per store, and its single-writer lock file does not
work on object storage either, so it buys nothing here. Measured by
``benchmarks/scale.py`` (open time at a million entries) and ``benchmarks/llm_throughput.py``
(CPU per answer and per journal hit).

Use::

    j = Journal(run_dir)             # a local path or an object-store URI
    entry = j.get(key)               # the journaled entry or None
    await j.append(entry)            # durable when it returns
    await j.sync()                   # published to the run dir (object storage)
    j.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from rankmill.errors import JournalError

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
AUTO_COMPACT_SEGMENTS = 32
SEGMENT_SUFFIX = ".sqlite"
LOCAL_ROOT_ENV = "RANKMILL_JOURNAL_DIR"

try:  # orjson is several times cheaper per entry; plain json is the fallback
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is normally present

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: publishes go by seq
    key TEXT NOT NULL UNIQUE,
    ok INTEGER NOT NULL,
    cost REAL NOT NULL,
    pt INTEGER NOT NULL,
    ct INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    requests INTEGER NOT NULL,
    cost REAL NOT NULL,
    pt INTEGER NOT NULL,
    ct INTEGER NOT NULL
);
"""
_ADD_TOTALS = (
    "INSERT INTO totals (id, requests, cost, pt, ct) VALUES (0, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET requests=requests+excluded.requests, "
    "cost=cost+excluded.cost, pt=pt+excluded.pt, ct=ct+excluded.ct"
)
# One entry per key; a success replaces a journaled reject of the same key, never the reverse.
_UPSERT = (
    "INSERT INTO entries (key, ok, cost, pt, ct, body) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET ok=excluded.ok, cost=excluded.cost, pt=excluded.pt, "
    "ct=excluded.ct, body=excluded.body WHERE excluded.ok > entries.ok"
)
_LOOKUP = "SELECT ok, body FROM entries WHERE key = ?"


@dataclass
class JournalTotals:
    """What the journal says the run has already paid for (all endpoints)."""

    requests: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    entries: int = 0

    def add(self, other: JournalTotals) -> None:
        self.requests += other.requests
        self.cost_usd += other.cost_usd
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.entries += other.entries

    def add_entry(self, e: dict[str, Any]) -> None:
        self.requests += 1
        self.entries += 1
        self.cost_usd += float(e.get("cost_usd") or 0.0)
        self.prompt_tokens += int(e.get("prompt_tokens") or 0)
        self.completion_tokens += int(e.get("completion_tokens") or 0)


def _row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (
        str(e["key"]),
        1 if e.get("ok") else 0,
        float(e.get("cost_usd") or 0.0),
        int(e.get("prompt_tokens") or 0),
        int(e.get("completion_tokens") or 0),
        _dumps(e),
    )


def _uri(path: str, **params: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{urllib.parse.quote(path)}" + (f"?{q}" if q else "")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def journal_dir(run_dir: str) -> str:
    """The journal's folder in a run directory (a path or a URI)."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        return run_dir.rstrip("/") + "/llm/journal"
    if run_dir.startswith("file://"):
        run_dir = run_dir[len("file://") :]
    return os.path.join(os.path.abspath(run_dir), "llm", "journal")


def _corrupt(path: str, exc: BaseException) -> JournalError:
    return JournalError(
        f"LLM journal file {path} is unreadable ({exc}); move it out of the run directory and "
        "run again (the answers it held are requested, and paid for, again), or put back a "
        "good copy"
    )


# -- where segments live -----------------------------------------------------------------------
class _Place:
    """The journal folder of a run dir: a local folder, or a prefix on object storage."""

    def __init__(self, run_dir: str, local_root: str | None = None):
        self.run_dir = run_dir
        self.dir = journal_dir(run_dir)
        self.remote = "://" in self.dir
        if self.remote:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.FileSystem.from_uri(self.dir)
            base = (
                local_root
                or os.environ.get(LOCAL_ROOT_ENV)
                or os.path.join(os.path.expanduser("~"), ".cache", "rankmill", "journal")
            )
            digest = hashlib.sha256(self.dir.encode()).hexdigest()[:16]
            self.local = os.path.join(base, digest)
            self.cache = os.path.join(self.local, "segments")
            self.live = os.path.join(self.local, "live")
            os.makedirs(self.cache, exist_ok=True)
        else:
            self.fs, self.root = None, self.dir
            self.local = self.dir
            self.cache = self.dir
            self.live = os.path.join(self.dir, "live")
        os.makedirs(self.live, exist_ok=True)
        if not self.remote:
            os.makedirs(self.dir, exist_ok=True)

    # listing and reading
    def names(self) -> list[str]:
        """Segment names (without suffix) that are in place, sorted."""
        if self.remote:
            import pyarrow.fs as pafs

            sel = pafs.FileSelector(self.root, allow_not_found=True)
            files = [i.base_name for i in self.fs.get_file_info(sel) if i.is_file]
        else:
            try:
                files = os.listdir(self.dir)
            except FileNotFoundError:
                files = []
        return sorted(f[: -len(SEGMENT_SUFFIX)] for f in files if f.endswith(SEGMENT_SUFFIX))

    def legacy_files(self) -> list[str]:
        if self.remote:
            return []
        return sorted(str(p) for p in Path(self.dir).glob("*.jsonl"))

    def read_totals(self, name: str) -> JournalTotals | None:
        try:
            if self.remote:
                with self.fs.open_input_stream(f"{self.root}/{name}.json") as f:
                    data = f.read()
            else:
                data = Path(self.dir, f"{name}.json").read_bytes()
        except (FileNotFoundError, OSError):
            return None
        try:
            d = json.loads(data)
            return JournalTotals(**{k: d[k] for k in asdict(JournalTotals())})
        except (ValueError, KeyError, TypeError) as exc:
            raise _corrupt(self.describe(f"{name}.json"), exc) from exc

    def describe(self, filename: str) -> str:
        return f"{self.dir}/{filename}"

    def local_file(self, name: str) -> str | None:
        """A local path of the segment (downloaded once on object storage); None if gone."""
        path = os.path.join(self.cache, name + SEGMENT_SUFFIX)
        if not self.remote or os.path.exists(path):
            return path if os.path.exists(path) else None
        tmp = f"{path}.part-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}{SEGMENT_SUFFIX}") as src:
                with open(tmp, "wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            return None
        os.replace(tmp, path)
        return path

    # writing
    def put(self, tmp_path: str, name: str, totals: JournalTotals) -> str:
        """Move a finished segment file into place (its totals first); returns a local path."""
        meta = json.dumps(asdict(totals)).encode()
        final = os.path.join(self.cache, name + SEGMENT_SUFFIX)
        if self.remote:
            with self.fs.open_output_stream(f"{self.root}/{name}.json") as out:
                out.write(meta)
            with self.fs.open_output_stream(f"{self.root}/{name}{SEGMENT_SUFFIX}") as out:
                with open(tmp_path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
            os.replace(tmp_path, final)
            return final
        side = os.path.join(self.dir, f"{name}.json")
        side_tmp = f"{side}.tmp-{uuid.uuid4().hex[:8]}"
        with open(side_tmp, "wb") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(side_tmp, side)
        _fsync_file(tmp_path)
        os.replace(tmp_path, final)
        _fsync_dir(self.dir)
        return final

    def exists(self, name: str) -> bool:
        if self.remote:
            import pyarrow.fs as pafs

            info = self.fs.get_file_info(f"{self.root}/{name}{SEGMENT_SUFFIX}")
            return info.type != pafs.FileType.NotFound
        return os.path.exists(os.path.join(self.dir, name + SEGMENT_SUFFIX))

    def delete(self, name: str) -> None:
        for suffix in (SEGMENT_SUFFIX, ".json"):
            with contextlib.suppress(FileNotFoundError):
                if self.remote:
                    self.fs.delete_file(f"{self.root}/{name}{suffix}")
                else:
                    os.unlink(os.path.join(self.dir, name + suffix))
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.cache, name + SEGMENT_SUFFIX))

    def tmp_path(self, name: str) -> str:
        return os.path.join(self.cache, f".{name}.tmp-{uuid.uuid4().hex[:8]}")

    def prune_cache(self, keep: set[str]) -> None:
        """Drop cached copies of segments that compaction removed (object storage only)."""
        if not self.remote:
            return
        for f in os.listdir(self.cache):
            if f.endswith(SEGMENT_SUFFIX) and f[: -len(SEGMENT_SUFFIX)] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.cache, f))


# -- segments ----------------------------------------------------------------------------------
class _Segment:
    """A read-only connection to one immutable segment."""

    def __init__(self, name: str, path: str, where: str):
        self.name = name
        self.path = path
        self.where = where
        try:
            self.conn = sqlite3.connect(
                _uri(path, immutable="1"), uri=True, check_same_thread=False
            )
            self.conn.execute("PRAGMA cache_size=-1024")  # 1 MiB per segment, not 2
            self.conn.execute("SELECT 1 FROM entries LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _corrupt(where, exc) from exc

    def get(self, key: str) -> tuple[int, bytes] | None:
        try:
            return self.conn.execute(_LOOKUP, (key,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise _corrupt(self.where, exc) from exc

    def close(self) -> None:
        self.conn.close()


def _build_segment(tmp_path: str, sources: list[tuple[str, str, str]]) -> JournalTotals:
    """Write a segment at ``tmp_path`` from ``(sqlite URI, SQL filter, name for errors)``
    sources; returns the totals of the copied rows (``entries``: distinct keys kept)."""
    conn = sqlite3.connect(_uri(tmp_path), uri=True)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        totals = JournalTotals()
        for i, (src, where_sql, describe) in enumerate(sources):
            alias = f"s{i}"
            try:
                conn.execute(f"ATTACH DATABASE ? AS {alias}", (src,))
            except sqlite3.DatabaseError as exc:
                raise _corrupt(describe, exc) from exc
            try:
                row = conn.execute(
                    f"SELECT count(*), coalesce(sum(cost),0), coalesce(sum(pt),0), "
                    f"coalesce(sum(ct),0) FROM {alias}.entries {where_sql}"
                ).fetchone()
                totals.add(JournalTotals(row[0], row[1], row[2], row[3], 0))
                conn.execute(
                    f"INSERT INTO entries (key, ok, cost, pt, ct, body) "
                    f"SELECT key, ok, cost, pt, ct, body FROM {alias}.entries {where_sql} "
                    f"ORDER BY seq "
                    "ON CONFLICT(key) DO UPDATE SET ok=excluded.ok, cost=excluded.cost, "
                    "pt=excluded.pt, ct=excluded.ct, body=excluded.body "
                    "WHERE excluded.ok > entries.ok"
                )
                conn.commit()
            except sqlite3.DatabaseError as exc:
                raise _corrupt(describe, exc) from exc
            finally:
                conn.execute(f"DETACH DATABASE {alias}")
        totals.entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        conn.commit()
    finally:
        conn.close()
    return totals


def _legacy_entries(path: str) -> Iterator[dict[str, Any]]:
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = _loads(line)
        except ValueError:
            # A torn last line is what a crash mid-append leaves: expected, skipped quietly.
            level = logging.DEBUG if i >= len(lines) - 2 else logging.WARNING
            log.log(level, "journal %s line %d does not parse; skipped", path, i + 1)
            continue
        if isinstance(entry, dict) and "key" in entry:
            yield entry


def _convert_legacy(place: _Place, path: str) -> None:
    """Turn an older run dir's JSON-lines journal file into a segment, then remove it."""
    name = "legacy-" + _safe(Path(path).stem)
    if place.exists(name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    tmp = place.tmp_path(name)
    conn = sqlite3.connect(_uri(tmp), uri=True)
    totals = JournalTotals()
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        batch = []
        for e in _legacy_entries(path):
            totals.add_entry(e)
            batch.append(_row(e))
            if len(batch) >= 5000:
                conn.executemany(_UPSERT, batch)
                batch = []
        conn.executemany(_UPSERT, batch)
        totals.entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        conn.commit()
    finally:
        conn.close()
    place.put(tmp, name, totals)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("converted the JSON-lines journal %s into segment %s", path, name)


# -- live stores -------------------------------------------------------------------------------
def _open_live(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit fsyncs the WAL, so a committed answer survives a power cut too.
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


def _info(conn: sqlite3.Connection, name: str, default: int = 0) -> int:
    row = conn.execute("SELECT value FROM info WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else default


def _set_info(conn: sqlite3.Connection, values: dict[str, int]) -> None:
    conn.executemany(
        "INSERT INTO info (name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
        [(k, str(v)) for k, v in values.items()],
    )


def _publish(place: _Place, conn: sqlite3.Connection, writer: str, path: str) -> str | None:
    """Publish the live store's unpublished entries as one segment; returns its local path.

    Idempotent: the segment's number and last seq are recorded before it is written, so a
    publish interrupted by a crash is redone with the same rows under the same name.
    """
    k = _info(conn, "next_segment")
    done = _info(conn, "published_seq")
    pend_upto = _info(conn, "pending_seq", -1)
    if pend_upto < 0:
        upto = conn.execute("SELECT coalesce(max(seq), 0) FROM entries").fetchone()[0]
        if upto <= done:
            return None
        conn.execute("BEGIN IMMEDIATE")
        _set_info(conn, {"pending_seq": upto})
        conn.execute("COMMIT")
    else:
        upto = pend_upto
    name = f"{writer}-{k:06d}"
    local = None
    if not place.exists(name):
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        tmp = place.tmp_path(name)
        totals = _build_segment(tmp, [(_uri(path), f"WHERE seq > {done} AND seq <= {upto}", path)])
        local = place.put(tmp, name, totals)
    conn.execute("BEGIN IMMEDIATE")
    _set_info(conn, {"next_segment": k + 1, "published_seq": upto, "pending_seq": -1})
    conn.execute("COMMIT")
    return local or place.local_file(name)


def _remove_store(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def recover(place: _Place) -> int:
    """Publish the live stores of writers that died (their lock is free); returns how many."""
    n = 0
    for store in sorted(Path(place.live).glob("*.sqlite")):
        writer = store.stem
        lock = FileLock(str(store.with_suffix(".lock")), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue  # a live writer
        try:
            if not store.exists():
                continue
            try:
                conn = _open_live(str(store))
            except sqlite3.DatabaseError as exc:
                raise _corrupt(str(store), exc) from exc
            try:
                _publish(place, conn, writer, str(store))
            except sqlite3.DatabaseError as exc:
                raise _corrupt(str(store), exc) from exc
            finally:
                conn.close()
            _remove_store(str(store))
            n += 1
            log.info("published the journal of a writer that stopped: %s", writer)
        finally:
            lock.release()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.with_suffix(".lock"))
    return n


def _prepare(place: _Place) -> None:
    for path in place.legacy_files():
        _convert_legacy(place, path)
    recover(place)


# -- the journal -------------------------------------------------------------------------------
class Journal:
    """One writer's live store plus a keyed read view of the run's segments."""

    def __init__(
        self, run_dir: str, writer_id: str | None = None, *, local_root: str | None = None
    ):
        self.run_dir = run_dir
        self.place = _Place(run_dir, local_root)
        self.directory = self.place.dir
        self.writer_id = _safe(
            writer_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.path = os.path.join(self.place.live, f"{self.writer_id}.sqlite")
        # Writes (commits, publishes) run on one executor thread under _wlock; lookups run on
        # the caller's thread under _rlock with their own connections, so a lookup never
        # waits for an fsync.
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._filelock: FileLock | None = None
        # Appends waiting for the next commit, per event loop (a Ray actor may run units in
        # several threads, each with its own loop); _qlock guards them and the counters.
        self._qlock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self._flushing: set[asyncio.AbstractEventLoop] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._queued = 0  # entries handed to append
        self._seq = 0  # ... of which committed
        self._synced = 0  # ... of which published (object storage)
        self._own = JournalTotals()  # committed here and not yet in a listed segment
        _prepare(self.place)
        self._segments: dict[str, _Segment | None] = {}  # name -> open segment (lazy)
        self._seg_totals = JournalTotals()
        self._live_totals: dict[str, JournalTotals] = {}  # other writers' live stores
        self._list_segments()

    # -- the read view ---------------------------------------------------------------------------
    def _list_segments(self) -> None:
        names = self.place.names()
        totals = JournalTotals()
        for name in names:
            t = self.place.read_totals(name)
            if t is not None:
                totals.add(t)
            self._segments.setdefault(name, None)
        self._seg_totals = totals
        if not self.place.remote:
            self._open_live_others()

    def _open_live_others(self) -> None:
        """Read the live stores of other writers on this host too (a gateway built while
        another one in the same process or machine is still open sees its answers). Stores
        of writers on other hosts are read once published: WAL needs one host's memory."""
        host = _safe(socket.gethostname()) + "-"
        for store in sorted(Path(self.place.live).glob("*.sqlite")):
            key = "live:" + store.stem
            if store.stem == self.writer_id or not store.stem.startswith(host):
                continue
            if key in self._segments:
                continue
            try:
                conn = sqlite3.connect(
                    _uri(str(store), mode="ro"), uri=True, check_same_thread=False
                )
                row = conn.execute("SELECT requests, cost, pt, ct FROM totals").fetchone()
            except sqlite3.DatabaseError:
                continue  # being created or removed: its answers come as a segment
            seg = _Segment.__new__(_Segment)
            seg.name, seg.path, seg.where, seg.conn = key, str(store), str(store), conn
            self._segments[key] = seg
            if row is not None:
                self._live_totals[key] = JournalTotals(row[0], row[1], row[2], row[3], row[0])

    def _open_segment(self, name: str) -> _Segment | None:
        path = self.place.local_file(name)
        if path is None:
            return None
        return _Segment(name, path, self.place.describe(name + SEGMENT_SUFFIX))

    def _readers(self) -> list[_Segment]:
        """Open segments; segments that a compaction removed meanwhile are re-listed."""
        out = []
        gone = False
        for name in list(self._segments):
            seg = self._segments.get(name)
            if seg is None:
                seg = self._open_segment(name)
                if seg is None:
                    gone = True
                    self._segments.pop(name, None)
                    continue
                self._segments[name] = seg
            out.append(seg)
        if gone:  # pick up the compaction's result
            self._list_segments()
            return self._readers()
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        """The journaled entry of ``key`` (a success over a reject), or None."""
        found: bytes | None = None
        with self._rlock:
            if self._rconn is None and self._seq:
                self._rconn = sqlite3.connect(self.path, check_same_thread=False)
            if self._rconn is not None:
                try:
                    row = self._rconn.execute(_LOOKUP, (key,)).fetchone()
                except sqlite3.DatabaseError as exc:
                    raise _corrupt(self.path, exc) from exc
                if row is not None:
                    if row[0]:
                        return _loads(row[1])
                    found = row[1]
            for seg in self._readers():
                row = seg.get(key)
                if row is not None:
                    if row[0]:
                        return _loads(row[1])
                    found = found or row[1]
        return _loads(found) if found is not None else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def totals(self) -> JournalTotals:
        """Paid so far: every segment listed when the journal was opened, plus this writer."""
        t = JournalTotals()
        t.add(self._seg_totals)
        for lt in self._live_totals.values():
            t.add(lt)
        t.add(self._own)
        return t

    def __len__(self) -> int:
        return self.totals().entries

    def segment_count(self) -> int:
        return len(self._segments)

    # -- writing --------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self._wconn is None:
            self._filelock = FileLock(self.path[: -len(SEGMENT_SUFFIX)] + ".lock", timeout=0)
            self._filelock.acquire()
            try:
                self._wconn = _open_live(self.path)
            except sqlite3.DatabaseError as exc:
                raise _corrupt(self.path, exc) from exc
            _fsync_dir(self.place.live)
        return self._wconn

    def _write_durably(self, rows: list[tuple[Any, ...]]) -> None:
        with self._wlock:
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
                # What was paid, kept beside the entries so readers need not sum them.
                conn.execute(
                    _ADD_TOTALS,
                    (
                        len(rows),
                        sum(r[2] for r in rows),
                        sum(r[3] for r in rows),
                        sum(r[4] for r in rows),
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _count(self, entries: list[dict[str, Any]]) -> None:
        with self._qlock:
            for e in entries:
                self._own.add_entry(e)
            self._seq += len(entries)

    def append_sync(self, entry: dict[str, Any]) -> None:
        """Append one entry durably, blocking (for code outside an event loop)."""
        with self._qlock:
            self._queued += 1
        self._write_durably([_row(entry)])
        self._count([entry])

    async def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry``; returns once it is committed and fsync'ed (group commit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._qlock:
            self._queued += 1
            self._pending.setdefault(loop, []).append((_row(entry), entry, fut))
            start = loop not in self._flushing
            self._flushing.add(loop)
        if start:
            loop.create_task(self._flush_loop(loop))
        await fut

    def _pool(self) -> ThreadPoolExecutor:
        with self._qlock:
            if self._executor is None:
                # One thread commits and publishes, so no event loop blocks on the disk.
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="rankmill-journal")
            return self._executor

    async def _flush_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                with self._qlock:
                    batch = self._pending.pop(loop, [])
                    if not batch:
                        self._flushing.discard(loop)
                        return
                try:
                    await loop.run_in_executor(
                        self._pool(), self._write_durably, [r for r, _, _ in batch]
                    )
                except Exception as exc:  # the disk failed: every waiter must know
                    with self._qlock:
                        self._queued -= len(batch)
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self._count([e for _, e, _ in batch])
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        except BaseException:
            with self._qlock:
                self._flushing.discard(loop)
            raise

    # -- publishing -------------------------------------------------------------------------------
    def _publish_now(self) -> None:
        with self._wlock:
            if self._wconn is None:
                return
            seq = self._seq
            try:
                local = _publish(self.place, self._wconn, self.writer_id, self.path)
                if local is not None:
                    name = Path(local).name[: -len(SEGMENT_SUFFIX)]
                    seg = _Segment(name, local, self.place.describe(name + SEGMENT_SUFFIX))
                    totals = self.place.read_totals(name) or JournalTotals()
                    with self._rlock:  # readable from the segment before leaving the store
                        self._segments[name] = seg
                        self._seg_totals.add(totals)
                        self._own = JournalTotals()
                    upto = _info(self._wconn, "published_seq")
                    self._wconn.execute("DELETE FROM entries WHERE seq <= ?", (upto,))
            except sqlite3.DatabaseError as exc:
                raise _corrupt(self.path, exc) from exc
            self._synced = seq

    def _publish_upto(self, target: int) -> None:
        if self._synced < target:  # an earlier publish in the queue may have covered it
            self._publish_now()

    def sync_blocking(self) -> None:
        """Publish what this writer journaled to the run dir (object storage); a no-op on a
        local run dir, where the live store already is in the run dir."""
        if self.place.remote and self._seq > self._synced:
            self._publish_now()

    async def sync(self) -> None:
        """Like :meth:`sync_blocking` for what was appended before the call, off the event
        loop; callers that arrive together share one publish."""
        if not self.place.remote:
            return
        target = self._queued
        while self._seq < target:  # still being committed
            await asyncio.sleep(0.001)
        if self._synced < target:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool(), self._publish_upto, target)

    def close(self) -> None:
        """Publish this writer's entries as a segment and remove its live store. The journal
        can be used again afterwards (it then opens a new live store)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._wlock, self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None
            conn, self._wconn = self._wconn, None
            if conn is not None:
                try:
                    _publish(self.place, conn, self.writer_id, self.path)
                except sqlite3.DatabaseError as exc:
                    raise _corrupt(self.path, exc) from exc
                finally:
                    conn.close()
                _remove_store(self.path)
            if self._filelock is not None:
                self._filelock.release()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._filelock.lock_file)
                self._filelock = None
            for seg in self._segments.values():
                if seg is not None:
                    seg.close()
            self._segments = {}
            self._live_totals = {}
            self._own = JournalTotals()
            self._seq = self._queued = self._synced = 0
            self._list_segments()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- run-level operations ----------------------------------------------------------------------
def read_totals(run_dir: str, local_root: str | None = None) -> JournalTotals:
    """What the run's journal says was paid (dead writers' stores are published first)."""
    place = _Place(run_dir, local_root)
    _prepare(place)
    totals = JournalTotals()
    for name in place.names():
        t = place.read_totals(name)
        if t is not None:
            totals.add(t)
    return totals


def iter_entries(run_dir: str, local_root: str | None = None) -> Iterator[dict[str, Any]]:
    """Every entry in the run's segments and live stores (for tools and tests; reads all)."""
    place = _Place(run_dir, local_root)
    for name in place.names():
        path = place.local_file(name)
        if path is None:
            continue
        seg = _Segment(name, path, place.describe(name + SEGMENT_SUFFIX))
        try:
            for (body,) in seg.conn.execute("SELECT body FROM entries ORDER BY seq"):
                yield _loads(body)
        finally:
            seg.close()
    for store in sorted(Path(place.live).glob("*.sqlite")):
        conn = sqlite3.connect(_uri(str(store), mode="ro"), uri=True)
        try:
            for (body,) in conn.execute("SELECT body FROM entries ORDER BY seq"):
                yield _loads(body)
        except sqlite3.OperationalError:
            pass  # created but never written
        finally:
            conn.close()


@dataclass
class CompactReport:
    segments_before: int
    segments_after: int
    entries: int
    bytes_before: int
    bytes_after: int
    seconds: float


def compact(
    run_dir: str, *, keep_largest: bool = False, local_root: str | None = None
) -> CompactReport:
    """Merge the run's segments into one (``keep_largest``: all but the largest, which is
    what the automatic compaction does so that its cost follows new entries, not the run).

    Safe while writers run: they only add new segments, and sources are deleted only after
    the merged segment is in place. Totals (what was paid) are kept, duplicates dropped.
    """
    t0 = time.perf_counter()
    place = _Place(run_dir, local_root)
    guard = None if place.remote else FileLock(os.path.join(place.dir, "compact.lock"))
    with guard if guard is not None else contextlib.nullcontext():
        _prepare(place)
        names = place.names()
        sizes = {}
        paths = {}
        for name in names:
            path = place.local_file(name)
            if path is not None:
                paths[name] = path
                sizes[name] = os.path.getsize(path)
        chosen = sorted(paths)
        if keep_largest and chosen:
            largest = max(chosen, key=lambda n: sizes[n])
            chosen.remove(largest)
        before = sum(sizes.values())
        if len(chosen) < 2:
            entries = sum((place.read_totals(n) or JournalTotals()).entries for n in paths)
            return CompactReport(
                len(paths), len(paths), entries, before, before, time.perf_counter() - t0
            )
        totals = JournalTotals()
        for name in chosen:
            t = place.read_totals(name)
            if t is not None:
                totals.add(t)
        merged = "c-" + hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:20]
        tmp = place.tmp_path(merged)
        built = _build_segment(
            tmp,
            [
                (_uri(paths[c], immutable="1"), "", place.describe(c + SEGMENT_SUFFIX))
                for c in chosen
            ],
        )
        totals.entries = built.entries
        place.put(tmp, merged, totals)
        for name in chosen:
            if name != merged:
                place.delete(name)
        remaining = place.names()
        place.prune_cache(set(remaining))
        after = sum(
            os.path.getsize(p) for p in (place.local_file(x) for x in remaining) if p is not None
        )
        entries = sum((place.read_totals(x) or JournalTotals()).entries for x in remaining)
    seconds = time.perf_counter() - t0
    return CompactReport(len(paths), len(remaining), entries, before, after, seconds)


def maintain(run_dir: str, max_segments: int = AUTO_COMPACT_SEGMENTS) -> JournalTotals:
    """Before a stage that calls LLMs (driver): publish dead writers' stores, compact when the
    run has more than ``max_segments`` segments, and return what was paid so far."""
    place = _Place(run_dir)
    _prepare(place)
    if len(place.names()) > max_segments:
        rep = compact(run_dir, keep_largest=True)
        log.info(
            "LLM journal compacted: %d -> %d segments in %.1fs",
            rep.segments_before,
            rep.segments_after,
            rep.seconds,
        )
    return read_totals(run_dir)
