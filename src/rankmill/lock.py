"""One writer per run directory: the run lock, its holder record and its heartbeat.

``rankmill run`` holds :class:`RunLock` for as long as it runs::

    with RunLock(RunDir(path)) as lock:     # RunDirLocked if another run holds it
        ...                                  # lock.run_id names this run

On a local (or shared POSIX) run dir the lock is an ``flock`` on ``<run-dir>/lock`` through
``filelock``: the kernel releases it when its holder dies, even by SIGKILL, so the next run
takes over at once. On an object store, where there is no lock primitive, ``lock.json`` is a
lease: it is taken over when its heartbeat is older than :data:`REMOTE_STALE_S`.

``lock.json`` names the holder (host, pid, since, run id); ``lock.heartbeat`` is rewritten
every :data:`HEARTBEAT_S` seconds while the run is alive. Workers watch both
(:class:`Watchdog`): when the heartbeat stops (the driver was killed) or another run has taken
the lock, they exit, and they never commit a unit for a run that no longer holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from rankmill.errors import RunDirLocked
from rankmill.manifest import RunDir

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LOCAL_STALE_S = 8.0  # no heartbeat change for this long: the driver is gone
REMOTE_HEARTBEAT_S = 5.0
REMOTE_STALE_S = 30.0


def read_holder(rd: RunDir) -> dict[str, Any] | None:
    text = rd.read_text(rd.path("lock.json"))
    if not text:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another rankmill run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"rankmill run pid {holder.get('pid')} on host {holder.get('host')} since {since}"


class RunLock:
    """The run directory's lock, held by the driver of one ``rankmill run``."""

    def __init__(self, rd: RunDir, run_id: str | None = None):
        self.rd = rd
        self.run_id = run_id or uuid.uuid4().hex
        self._flock: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # -- taking and giving back ----------------------------------------------------------------
    def acquire(self) -> RunLock:
        self.rd.mkdirs(self.rd.root)
        if self.rd.local:
            import filelock

            lock = filelock.FileLock(self.rd.path("lock"), timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise RunDirLocked(
                    f"{self.rd.uri} is in use by {_describe(read_holder(self.rd))}; wait for it "
                    "to finish or stop it (two runs on one run dir would pay for calls twice)"
                ) from None
            self._flock = lock
        else:
            holder = read_holder(self.rd)
            beat = self._remote_beat_age()
            if holder and holder.get("run_id") != self.run_id and beat < REMOTE_STALE_S:
                raise RunDirLocked(
                    f"{self.rd.uri} is in use by {_describe(holder)} (heartbeat {beat:.0f} s "
                    f"ago; taken over after {REMOTE_STALE_S:.0f} s of silence)"
                )
        self.rd.write_atomic(
            self.rd.path("lock.json"),
            json.dumps(
                {
                    "run_id": self.run_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "since": time.time(),
                }
            ).encode(),
        )
        self._beat()
        self.held = True
        self._thread = threading.Thread(target=self._beat_loop, name="rankmill-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            with contextlib.suppress(Exception):
                holder = read_holder(self.rd)
                if holder and holder.get("run_id") == self.run_id:
                    self.rd.fs.delete_file(self.rd.path("lock.json"))
        if self._flock is not None:
            with contextlib.suppress(Exception):
                self._flock.release()
            self._flock = None
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- heartbeat -------------------------------------------------------------------------------
    def _beat(self) -> None:
        self.rd.write_atomic(
            self.rd.path("lock.heartbeat"), f"{self.run_id} {time.time():.3f}".encode()
        )

    def _beat_loop(self) -> None:
        every = HEARTBEAT_S if self.rd.local else REMOTE_HEARTBEAT_S
        while not self._stop.wait(every):
            try:
                self._beat()
            except Exception as exc:  # a full disk must not kill the run; workers will see it
                log.warning("run lock heartbeat failed: %s", exc)

    def _remote_beat_age(self) -> float:
        text = self.rd.read_text(self.rd.path("lock.heartbeat"))
        try:
            return time.time() - float((text or "").split()[1])
        except (IndexError, ValueError):
            return float("inf")


def holds_lock(rd: RunDir, run_id: str) -> bool:
    """Whether the run ``run_id`` still holds the run dir (checked before every commit)."""
    if not run_id:
        return True  # units run outside a locked run (tests calling execute_unit directly)
    holder = read_holder(rd)
    return holder is not None and holder.get("run_id") == run_id


class Watchdog:
    """Ends a worker process whose run has gone: heartbeat silent, or the lock taken over.

    Compares heartbeat *contents* over time on this machine's clock, so the driver's and the
    workers' clocks need not agree.
    """

    def __init__(self, rd: RunDir, run_id: str, on_gone: Any = None):
        self.rd = rd
        self.run_id = run_id
        self.on_gone = on_gone or (lambda why: os._exit(1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rankmill-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.run_id:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        stale_after = LOCAL_STALE_S if self.rd.local else REMOTE_STALE_S
        every = HEARTBEAT_S if self.rd.local else REMOTE_HEARTBEAT_S
        last, since = None, time.monotonic()
        while not self._stop.wait(every):
            try:
                beat = self.rd.read_text(self.rd.path("lock.heartbeat"))
            except Exception:
                beat = None
            if beat and beat.split()[0] != self.run_id:
                self.on_gone("another run took over the run directory")
                return
            if beat != last:
                last, since = beat, time.monotonic()
            elif time.monotonic() - since > stale_after:
                self.on_gone("the driver of the run stopped (no heartbeat)")
                return
