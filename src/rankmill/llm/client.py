"""The gateway to OpenAI-compatible chat endpoints: the only way rankmill calls an LLM.

One :class:`Gateway` per endpoint per worker. It sends chat completions through the ``openai``
async client (its own retries off) and adds what a long synthesis run needs:

- **one retry layer** (tenacity), decided by exception type and status: 429 (honouring
  ``Retry-After``), 5xx, 408/409, timeouts, dropped connections and HTTP 200 bodies that are
  not a chat completion (not JSON, no ``choices``, a choice without its message) are retried
  with the same seed and jittered exponential backoff, bounded by ``max_attempts`` and
  ``max_retry_time_s``; each request has a timeout (``timeout_s``, by default sized from its
  ``max_tokens``); how many requests wait on a retry is in :meth:`Gateway.counters`;
- **errors that cannot heal stop the endpoint**: 401/403 (:class:`LLMAuthError`), 400/404/422
  (:class:`LLMRequestError`: unknown model, bad params, wrong URL), an exhausted quota
  (:class:`LLMQuotaError`) and an address where nothing answers (:class:`LLMUnreachable`:
  connection refused after two quick tries, unknown host, no route). Until one request has
  come back, a gateway sends one request at a time (a probe), so a bad key costs one request
  per worker, not one per row. The first such error is sticky: every call in flight and every
  later call of the gateway fails at once with the same error, and a marker under
  ``<run_dir>/llm/fatal/`` makes the other workers' gateways (built before it was written)
  fail the same way before they send anything. A request longer than the model's context is
  the exception: a reject (``prompt_too_long``), not an error;
- **a durable journal** (:mod:`rankmill.llm.journal`): every completed answer is fsync'ed before
  it is returned, keyed by :func:`request_key`; a request whose key is journaled is answered
  from the journal (one indexed lookup) and never sent again, so a re-run after a crash
  re-sends only what was in flight; on an object-store run dir, ``chat``/``chat_many`` publish
  what they journaled to the run dir before they return;
- **bad answers are data**: the model's own bad answers — ``finish_reason=length``
  ("truncated"), content-filter refusals ("content_filter"), model refusals ("refusal") and
  empty text ("empty_content") — come back as ``ChatResult(ok=False, reject_reason=...)``;
  they are journaled as rejects (a re-run does not pay for them again) and, with
  ``resample_bad=n``, re-sampled up to n times with new seeds;
- **sampling**: N samples of one prompt are N requests with distinct ``sample_index`` and
  ``seed`` (servers such as llama.cpp ignore ``n>1``); the seed is derived from the run seed,
  the prompt and the sample index unless the caller sets one;
- **limits and budget** (:mod:`rankmill.llm.limits`): ``max_concurrency`` in flight per
  gateway; requests/tokens per minute and ``run.budget`` run-wide through the run's ledger;
  :class:`rankmill.errors.BudgetExceeded` is raised before a request that would cross it;
- **accounting**: calls, journal hits, tokens and estimated cost, in total and per model.

The API key is read from ``os.environ[api_key_env]`` when the gateway is built and is never
part of a key, the journal, a log line or an exception message.

Use from a stage::

    def setup(self):
        self.gw = Gateway.from_context(self.ctx, self.params.endpoint)

    def process(self, unit):
        reqs = [ChatRequest(messages=[...], sample_index=s, params={"max_tokens": 4},
                            tag=row_id) for row_id in ... for s in range(n)]
        results = self.gw.chat_many_sync(reqs)      # or: await self.gw.chat_many(reqs)
        counters = Counters(); self.gw.fill_counters(counters)   # this unit's LLM usage
        ...

    def teardown(self):
        self.gw.close()
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import email.utils
import errno
import hashlib
import importlib.util
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    stop_after_attempt,
    stop_before_delay,
)

from rankmill.config import EndpointConfig
from rankmill.errors import (
    BudgetExceeded,
    JournalMiss,
    LLMAuthError,
    LLMError,
    LLMQuotaError,
    LLMRequestError,
    LLMRetryExhausted,
    LLMUnreachable,
)
from rankmill.llm import journal as journal_mod
from rankmill.llm.journal import Journal, journal_dir
from rankmill.llm.limits import Limiter, endpoint_limits, make_limiter

log = logging.getLogger(__name__)


class _Lazy:
    """A module imported on first use: answering from the journal needs no HTTP stack (the
    openai package takes about a second to import on a small machine)."""

    def __init__(self, name: str):
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


httpx2: Any = _Lazy("httpx2")
openai: Any = _Lazy("openai")
# httpx2 logs every request at INFO: thousands of lines per unit, and CPU we need for calls.
if logging.getLogger("httpx2").level == logging.NOTSET:
    logging.getLogger("httpx2").setLevel(logging.WARNING)

T = TypeVar("T")

# The usage tally of the unit whose thread made the current call (see Gateway.run).
_UNIT_TALLY: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "rankmill_unit_tally", default=None
)

try:
    import orjson

    def _canon(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    def _canon(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    _loads = json.loads

# Params that change the transport, not the answer, or that this gateway sets itself.
_UNSUPPORTED = ("n", "stream", "stream_options")
_QUOTA_CODES = ("insufficient_quota", "quota_exceeded", "billing_hard_limit_reached")
# What servers say when a prompt does not fit the model's context (OpenAI, vLLM, llama.cpp,
# SGLang, Ollama): a property of that one request, so a reject rather than a stop.
_CONTEXT_CODES = ("context_length_exceeded", "exceed_context_size_error")
_CONTEXT_PHRASES = (
    "maximum context length",
    "context length",
    "context window",
    "exceeds the available context size",
    "too many tokens",
    "prompt is too long",
)
# Reasons of an HTTP 200 whose body is not a chat completion: a fault on the way (a proxy, a
# crashed worker, a cut stream), not the model's answer. Retried with the same seed like a
# 5xx and never journaled; a journaled line with one of them (older runs) is asked again.
TRANSPORT_FAULTS = frozenset({"malformed_response", "empty_choices"})
# A refused connection is tried this many times, quickly, before the endpoint is given up.
UNREACHABLE_ATTEMPTS = 2


@dataclass
class ChatRequest:
    """One chat completion to make.

    ``params`` override the endpoint's default ``sampling`` (temperature, max_tokens,
    logprobs, top_logprobs, response_format, ...; server-specific extras such as llama.cpp's
    ``top_k`` pass through). ``seed`` in params pins the seed; otherwise it is derived.
    ``tag`` is the caller's own (e.g. a row id) and comes back on the result.
    """

    messages: list[dict[str, Any]]
    sample_index: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    tag: Any = None
    resample_bad: int | None = None  # overrides the gateway's resample_bad


@dataclass
class ChatResult:
    """The outcome of one request: an answer (``ok``) or a reject with its reason."""

    key: str
    ok: bool
    text: str | None = None
    finish_reason: str | None = None
    reject_reason: str | None = None
    detail: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    seed: int | None = None
    sample_index: int = 0
    model: str = ""
    attempts: int = 0  # HTTP attempts this call made (0 when served from the journal)
    resampled: int = 0  # extra samples taken because earlier ones were bad answers
    tag: Any = None

    @classmethod
    def from_entry(cls, e: dict[str, Any], cached: bool, tag: Any = None) -> ChatResult:
        return cls(
            key=e["key"],
            ok=bool(e.get("ok")),
            text=e.get("text"),
            finish_reason=e.get("finish_reason"),
            reject_reason=e.get("reason"),
            detail=e.get("detail"),
            logprobs=e.get("logprobs"),
            prompt_tokens=int(e.get("prompt_tokens") or 0),
            completion_tokens=int(e.get("completion_tokens") or 0),
            cost_usd=float(e.get("cost_usd") or 0.0),
            cached=cached,
            seed=e.get("seed"),
            sample_index=int(e.get("sample_index") or 0),
            model=e.get("model") or "",
            tag=tag,
        )


# -- keys and seeds ----------------------------------------------------------------------------
def endpoint_identity(ep: EndpointConfig) -> str:
    """What identifies an endpoint in request keys. A local server gets a new port each run,
    so it is identified by its model instead of its URL (its answers stay valid)."""
    if ep.local:
        return f"local:{ep.model}:{os.path.basename(ep.model_path or '')}"
    return (ep.base_url or "").rstrip("/")


def prompt_hash(endpoint: str, model: str, messages: Any, params: dict[str, Any]) -> str:
    """Hash of what determines an answer's distribution (everything but seed/sample)."""
    return hashlib.sha256(
        _canon({"ep": endpoint, "model": model, "messages": messages, "params": params})
    ).hexdigest()


def derive_seed(run_seed: int, phash: str, sample_index: int, resample: int = 0) -> int:
    """A seed per (run seed, prompt, sample index, resample round), in [0, 2**31)."""
    h = hashlib.sha256(f"{run_seed}:{phash}:{sample_index}:{resample}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def request_key(phash: str, seed: int | None, sample_index: int) -> str:
    """The journal key: sha256 of (base_url, model, messages, sampling params incl. seed,
    sample index) — via the prompt hash. The API key is not part of it."""
    return hashlib.sha256(f"{phash}:{seed}:{sample_index}".encode()).hexdigest()


# -- answers -----------------------------------------------------------------------------------
def _normalize_logprobs(lp: Any) -> list[dict[str, Any]] | None:
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if not isinstance(content, list):
        return None
    out = []
    for t in content:
        if not isinstance(t, dict):
            continue
        top = [
            {"token": x.get("token"), "logprob": x.get("logprob")}
            for x in (t.get("top_logprobs") or [])
            if isinstance(x, dict)
        ]
        out.append({"token": t.get("token"), "logprob": t.get("logprob"), "top_logprobs": top})
    return out


def parse_completion(content: bytes) -> dict[str, Any]:
    """Turn a 200 body into the fields of a journal entry (ok, reason, text, usage, ...).

    A body that is not a chat completion at all gets a reason in :data:`TRANSPORT_FAULTS`
    (the gateway retries those); the others are the model's answer, good or bad."""
    try:
        body = _loads(content)
    except ValueError:
        return {"ok": False, "reason": "malformed_response", "detail": "body is not JSON"}
    if not isinstance(body, dict):
        return {"ok": False, "reason": "malformed_response", "detail": "body is not an object"}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    out: dict[str, Any] = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "model": body.get("model") if isinstance(body.get("model"), str) else None,
    }
    choices = body.get("choices")
    if not isinstance(choices, list):
        return {**out, "ok": False, "reason": "malformed_response", "detail": "no choices list"}
    if not choices:
        return {**out, "ok": False, "reason": "empty_choices", "detail": "choices is empty"}
    c0 = choices[0]
    if not isinstance(c0, dict) or not isinstance(c0.get("message"), dict):
        return {
            **out,
            "ok": False,
            "reason": "malformed_response",
            "detail": "a choice without a message",
        }
    msg = c0["message"]
    text = msg.get("content")
    finish = c0.get("finish_reason")
    out.update(
        text=text if isinstance(text, str) else None,
        finish_reason=finish,
        logprobs=_normalize_logprobs(c0.get("logprobs")),
    )
    if finish == "length":
        return {**out, "ok": False, "reason": "truncated"}
    if finish == "content_filter":
        return {**out, "ok": False, "reason": "content_filter"}
    if msg.get("refusal"):
        return {**out, "ok": False, "reason": "refusal", "detail": str(msg["refusal"])[:300]}
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
        return {**out, "ok": True, "reason": None}
    if not isinstance(text, str) or not text.strip():
        return {**out, "ok": False, "reason": "empty_content"}
    return {**out, "ok": True, "reason": None}


# -- errors ------------------------------------------------------------------------------------
def _is_quota(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    fields = {
        str(exc.code or ""),
        str(getattr(exc, "type", "") or ""),
        str(body.get("code") or ""),
        str(body.get("type") or ""),
    }
    return any(c in fields for c in _QUOTA_CODES)


class BadResponseBody(Exception):
    """An HTTP 200 whose body is not a chat completion (see :data:`TRANSPORT_FAULTS`)."""

    def __init__(self, reason: str, detail: str | None):
        super().__init__(f"HTTP 200 with a bad body: {detail or reason}")
        self.reason = reason


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def unreachable_reason(exc: BaseException) -> str | None:
    """'connection refused', 'host name not found' or 'no route to host' when nothing can
    answer at the address, whatever the HTTP stack wrapped it in (the aiohttp transport
    reports a refused connection as a connect timeout); None otherwise."""
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError) or (
            isinstance(e, OSError) and e.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name not found"
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "no route to host"
    return None


def is_context_overflow(exc: BaseException) -> bool:
    """A 400/413 saying the prompt does not fit the model's context."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 413):
        return False
    body = exc.body if isinstance(exc.body, dict) else {}
    codes = {str(exc.code or ""), str(body.get("code") or ""), str(body.get("type") or "")}
    if any(c in codes for c in _CONTEXT_CODES):
        return True
    text = str(body.get("message") or exc.message or "").lower()
    return any(p in text for p in _CONTEXT_PHRASES)


def is_transient(exc: BaseException) -> bool:
    """Retry 429 (not quota), 5xx, 408/409, timeouts, connection errors and bad 200 bodies."""
    if isinstance(exc, BadResponseBody):
        return True
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return not _is_quota(exc)
        return exc.status_code >= 500 or exc.status_code in (408, 409)
    return isinstance(exc, (openai.APIConnectionError, httpx2.TransportError))


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After seconds or HTTP date, retry-after-ms)."""
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    headers = resp.headers
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class _Wait:
    """Jittered exponential backoff that never waits less than the server's Retry-After."""

    def __init__(self, base: float, cap: float):
        self.base = base
        self.cap = cap

    def __call__(self, state: RetryCallState) -> float:
        exp = min(self.cap, self.base * 2 ** max(0, state.attempt_number - 1))
        wait = random.uniform(0, exp)  # "full jitter": spreads workers that failed together
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None and unreachable_reason(exc):
            return 0.5 + random.uniform(0, 0.25)  # one quick second look, no back-off
        if exc is not None:
            ra = retry_after_s(exc)
            if ra is not None:
                wait = ra + random.uniform(0, min(1.0, 0.1 * ra + 0.01))
        return wait


class _Secret:
    """Holds the API key so that no repr, log or pickle of the gateway shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    def __reduce__(self) -> Any:
        raise TypeError("an API key is never pickled; build the gateway where it is used")


# -- a run-wide stop of an endpoint ------------------------------------------------------------
# The errors after which no request to the endpoint can succeed until the user changes something.
_ENDPOINT_FATAL: dict[str, type[LLMError]] = {
    c.__name__: c for c in (LLMAuthError, LLMRequestError, LLMQuotaError, LLMUnreachable)
}


def fatal_dir(run_dir: str) -> str:
    """Where gateways leave a marker when an endpoint failed for good (beside the journal)."""
    return journal_dir(run_dir).rsplit("/llm/journal", 1)[0].rstrip("/") + "/llm/fatal"


def fatal_marker_path(run_dir: str, endpoint: EndpointConfig) -> str:
    """The marker file of one endpoint (its address, model and key variable, not the key)."""
    ident = f"{endpoint_identity(endpoint)}\n{endpoint.model}\n{endpoint.api_key_env or ''}"
    name = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return f"{fatal_dir(run_dir)}/{name}.json"


def _fs(path: str) -> tuple[Any, str]:
    """(pyarrow file system, path in it) of a marker path on object storage; (None, path)
    for a local one."""
    if "://" not in path:
        return None, path
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path)


def read_fatal_markers(run_dir: str) -> list[dict[str, Any]]:
    """Every endpoint-stop marker of a run (error, message, endpoint, stage, t), oldest first.
    A marker is history once a later run built its gateways: it stops only gateways built
    before it was written."""
    folder = fatal_dir(run_dir)
    fs, root = _fs(folder)
    try:
        if fs is None:
            names = [f"{root}/{n}" for n in os.listdir(root)]
        else:
            import pyarrow.fs as pafs

            names = [i.path for i in fs.get_file_info(pafs.FileSelector(root))]
    except (FileNotFoundError, OSError):
        return []
    prefix = folder[: len(folder) - len(root)] if fs is not None else ""
    out = [_read_marker(prefix + n) for n in sorted(names) if n.endswith(".json")]
    return sorted((m for m in out if m is not None), key=lambda m: float(m["t"]))


def _read_marker(path: str) -> dict[str, Any] | None:
    fs, where = _fs(path)
    try:
        if fs is None:
            with open(where, "rb") as f:
                data = f.read()
        else:
            with fs.open_input_stream(where) as f:
                data = f.read()
        m = _loads(data)
    except (OSError, ValueError):  # absent, or torn by a crash mid-write: no marker
        return None
    ok = isinstance(m, dict) and m.get("error") in _ENDPOINT_FATAL and "t" in m
    return m if ok and isinstance(m.get("message"), str) else None


def _write_marker(path: str, marker: dict[str, Any]) -> None:
    fs, where = _fs(path)
    if fs is not None:  # an object PUT is atomic
        fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(where) as f:
            f.write(_canon(marker))
        return
    os.makedirs(os.path.dirname(where), exist_ok=True)
    tmp = f"{where}.{os.getpid()}.{random.getrandbits(32):08x}.tmp"
    with open(tmp, "wb") as f:
        f.write(_canon(marker))
    os.replace(tmp, where)


# -- the gateway -------------------------------------------------------------------------------
class Gateway:
    """Calls one endpoint with retries, a durable journal, limits, budget and accounting."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        run_dir: str,
        name: str = "default",
        seed: int = 13,
        stage: str = "",
        shared: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        resample_bad: int = 0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        journal: Journal | None = None,
        transport: str = "auto",
        journal_only: bool = False,
    ):
        self.endpoint = endpoint
        # Answers only from the journal: a request it lacks raises JournalMiss, unsent.
        self.journal_only = journal_only
        self.name = name
        self.seed = seed
        self.stage = stage
        self.run_dir = run_dir
        self.resample_bad = resample_bad
        if transport == "auto":
            transport = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"
        if transport not in ("aiohttp", "httpx"):
            raise ValueError(f"transport must be 'auto', 'aiohttp' or 'httpx', not {transport!r}")
        self.transport = transport
        self.ep_id = endpoint_identity(endpoint)
        if not endpoint.base_url and not journal_only:
            raise LLMError(
                f"endpoint {name!r} has no base_url yet (a local endpoint gets one when the "
                "runner starts its server); build the gateway after the runner started it"
            )
        self._key = _Secret("not-needed") if journal_only else self._read_key(endpoint, name)
        self.journal = journal or Journal(run_dir)
        totals = self.journal.totals()
        limits = endpoint_limits({name: endpoint})
        self.limiter: Limiter | None = make_limiter(
            shared or {}, run_dir, name, budget, limits, totals.cost_usd, totals.requests
        )
        stop = stop_after_attempt(endpoint.max_attempts) | stop_before_delay(
            endpoint.max_retry_time_s
        )
        self._retrying = AsyncRetrying(
            stop=stop,
            wait=_Wait(backoff_base_s, backoff_max_s),
            retry=self._should_retry,
            reraise=True,
        )
        self._client: openai.AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._probe: asyncio.Lock | None = None
        # Until one request came back, one at a time: a bad key or URL costs one request.
        self._proven = False
        # The error that stopped this endpoint for good; every later call raises it again.
        self._fatal: LLMError | None = None
        self._built_at = time.time()
        self._marker = fatal_marker_path(run_dir, endpoint)
        self._marker_seen_at = float("-inf")
        self._live: set[asyncio.Future[Any]] = set()  # retry loops of requests in flight
        self._killed: set[asyncio.Future[Any]] = set()  # ... cancelled by a fatal error
        self._waiting_retry = 0  # requests sleeping before their next attempt, now
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._local = threading.local()
        self._inflight: dict[str, asyncio.Future[ChatResult]] = {}
        self._totals = _Tally()
        self._taken = _Tally()
        self._count_lock = threading.Lock()  # journal hits are counted in callers' threads too
        self._price_in = endpoint.price_input_per_mtok / 1e6
        self._price_out = endpoint.price_output_per_mtok / 1e6
        log.info(
            "LLM gateway %s: %s model %s, %d journaled answers, concurrency %d",
            name,
            self.ep_id,
            endpoint.model,
            len(self.journal),
            endpoint.max_concurrency,
        )

    @classmethod
    def from_context(cls, ctx: Any, endpoint_name: str, **kwargs: Any) -> Gateway:
        """Build the gateway of ``ctx.endpoints[endpoint_name]`` for a stage (StageContext)."""
        ep = ctx.endpoint(endpoint_name)
        workers = max(1, int(getattr(ctx, "workers", 1) or 1))
        if workers > 1:
            # max_concurrency is the endpoint's: the stage's actors share it, rounding down so
            # that together they never exceed it (the runner starts no more actors than it).
            share = max(1, ep.max_concurrency // workers)
            ep = ep.model_copy(update={"max_concurrency": share})
        return cls(
            ep,
            run_dir=ctx.run_dir,
            name=endpoint_name,
            seed=ctx.seed,
            stage=ctx.stage_name,
            shared=ctx.shared,
            budget=ctx.budget,
            journal_only=bool(getattr(ctx, "journal_only", False)),
            **kwargs,
        )

    @staticmethod
    def _read_key(ep: EndpointConfig, name: str) -> _Secret:
        if not ep.api_key_env:
            # Never let the client fall back to OPENAI_API_KEY: that would send a real key to
            # whatever base_url this endpoint names.
            return _Secret("not-needed")
        value = os.environ.get(ep.api_key_env)
        if not value:
            raise LLMAuthError(
                f"endpoint {name!r}: the environment variable {ep.api_key_env} named by "
                f"endpoints.{name}.api_key_env is not set; export it with the API key"
            )
        return _Secret(value)

    # -- client per event loop -----------------------------------------------------------------
    def _ensure_client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            conc = self.endpoint.max_concurrency
            # One pooled HTTP client with a connection per in-flight request (a new TCP
            # connection per request costs CPU a 2-core box cannot spare). openai's own aiohttp
            # transport costs about a third of the CPU of its default httpx one per request.
            limits = httpx2.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8)
            # Each request sets its own timeout (request_timeout); this one is the default.
            timeout = httpx2.Timeout(self.request_timeout(self.endpoint.sampling), connect=10.0)
            http: httpx2.AsyncClient
            if self.transport == "aiohttp":
                http = openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
            else:
                http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            self._client = openai.AsyncOpenAI(
                base_url=self.endpoint.base_url,
                api_key=self._key.get(),
                max_retries=0,  # tenacity is the only retry layer
                timeout=timeout,
                http_client=http,
            )
            self._client_loop = loop
            self._sem = asyncio.Semaphore(conc)
            self._probe = asyncio.Lock()
        return self._client

    # -- the public calls ----------------------------------------------------------------------
    async def chat(self, request: ChatRequest) -> ChatResult:
        """One request: from the journal if answered before, else sent (with retries)."""
        try:
            return await self._chat(request, None)
        finally:
            await self.journal.sync()  # on object storage: in the run dir before it is used

    async def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Run ``requests`` concurrently (up to max_concurrency); results in request order.

        Bad answers are results, not exceptions. An error that no retry can fix (auth, quota,
        budget, retries exhausted) stops sending the rest, waits for what is in flight (so
        its answers are journaled) and is raised.
        """
        abort: list[BaseException] = []
        tasks = [asyncio.ensure_future(self._chat(r, abort)) for r in requests]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await self.journal.sync()  # on object storage: in the run dir before it is used
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = abort[0] if abort else errors[0]
            raise first
        return results  # type: ignore[return-value]

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine of this gateway from plain (non-async) code, e.g. Stage.process.

        Every thread's calls run on one event loop of the gateway's own (a background
        thread), so units that an actor processes at once share its concurrency limit and
        connection pool: while one unit waits for its slowest answer, the next unit's requests
        already fill the free slots. Usage is counted per calling thread (one unit)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("Gateway.run() is for sync code; inside a coroutine, await it")
        loop = self._background_loop()
        tally = self._thread_tally()

        async def scoped() -> T:
            _UNIT_TALLY.set(tally)  # seen by every task this call creates (context copies)
            return await coro  # type: ignore[misc]

        return asyncio.run_coroutine_threadsafe(scoped(), loop).result()

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._own_loop is None or self._own_loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name=f"rankmill-gateway-{self.name}", daemon=True
                )
                thread.start()
                self._own_loop, self._loop_thread = loop, thread
            return self._own_loop

    def _thread_tally(self) -> _Tally:
        tally = getattr(self._local, "tally", None)
        if tally is None:
            tally = self._local.tally = _Tally()
        return tally

    def chat_many_sync(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """:meth:`chat_many` from plain code. Answers the journal holds are read here, in the
        calling thread; only the others go through the event loop."""
        out: list[ChatResult | None] = [self._journaled(r) for r in requests]
        rest = [i for i, res in enumerate(out) if res is None]
        if rest:
            got = self.run(self.chat_many([requests[i] for i in rest]))
            for i, res in zip(rest, got, strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def _journaled(self, req: ChatRequest) -> ChatResult | None:
        """The journal's final answer to ``req``, or None: absent, or a bad answer that the
        event loop's path would sample again."""
        key, _, _, _ = self._prepare(req, 0)
        entry = self.journal.get(key)
        if entry is None or entry.get("reason") in TRANSPORT_FAULTS:
            return None
        limit = self.resample_bad if req.resample_bad is None else req.resample_bad
        if not entry.get("ok") and limit > 0:
            return None
        with self._count_lock:
            self._totals.add(entry, True)
            self._thread_tally().add(entry, True)
        return ChatResult.from_entry(entry, cached=True, tag=req.tag)

    def chat_sync(self, request: ChatRequest) -> ChatResult:
        return self.run(self.chat(request))

    # -- internals -----------------------------------------------------------------------------
    def _prepare(self, req: ChatRequest, resample: int) -> tuple[str, dict[str, Any], int, str]:
        params = {**self.endpoint.sampling, **req.params}
        for k in _UNSUPPORTED:
            v = params.pop(k, None)
            if k == "n" and v not in (None, 1):
                raise LLMRequestError(
                    "n>1 is not supported (llama.cpp and others ignore it); send N requests "
                    "with sample_index 0..N-1 instead"
                )
            if k == "stream" and v:
                raise LLMRequestError("stream=True is not supported by the gateway")
        params = {k: v for k, v in params.items() if v is not None}
        fixed_seed = params.pop("seed", None)
        phash = prompt_hash(self.ep_id, self.endpoint.model, req.messages, params)
        if fixed_seed is not None and resample == 0:
            seed = int(fixed_seed)
        else:
            seed = derive_seed(self.seed, phash, req.sample_index, resample)
        params["seed"] = seed
        return request_key(phash, seed, req.sample_index), params, seed, phash

    async def _chat(self, req: ChatRequest, abort: list[BaseException] | None) -> ChatResult:
        limit = self.resample_bad if req.resample_bad is None else req.resample_bad
        result = await self._one(req, 0, abort)
        rounds = 0
        while not result.ok and rounds < limit:
            rounds += 1
            log.info(
                "%s: %s answer (%s); new sample with another seed",
                self.name,
                result.reject_reason,
                result.key[:12],
            )
            nxt = await self._one(req, rounds, abort)
            nxt.resampled = rounds
            result = nxt
        return result

    async def _one(
        self, req: ChatRequest, resample: int, abort: list[BaseException] | None
    ) -> ChatResult:
        key, params, seed, _ = self._prepare(req, resample)
        entry = self.journal.get(key)
        if entry is not None and entry.get("reason") in TRANSPORT_FAULTS:
            entry = None  # journaled by an older version as an answer: ask again
        if entry is not None:
            self._count(entry, cached=True)
            return ChatResult.from_entry(entry, cached=True, tag=req.tag)
        pending = self._inflight.get(key)
        if pending is None and self.journal_only:
            raise JournalMiss(f"endpoint {self.name!r}: request {key[:12]} is not journaled")
        if pending is not None:  # the same request is already on its way: share its answer
            res = await asyncio.shield(pending)
            return dataclasses.replace(res, cached=True, tag=req.tag, attempts=0, resampled=0)
        fut: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            res = await self._send(req, key, params, seed, abort)
            fut.set_result(res)
            return res
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: sharers re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    async def _send(
        self,
        req: ChatRequest,
        key: str,
        params: dict[str, Any],
        seed: int,
        abort: list[BaseException] | None,
    ) -> ChatResult:
        self._raise_if_fatal()
        self._ensure_client()
        if not self._proven:
            assert self._probe is not None
            async with self._probe:
                if not self._proven:  # this request is the probe: the others wait for it
                    return await self._exchange(req, key, params, seed, abort)
        return await self._exchange(req, key, params, seed, abort)

    async def _exchange(
        self,
        req: ChatRequest,
        key: str,
        params: dict[str, Any],
        seed: int,
        abort: list[BaseException] | None,
    ) -> ChatResult:
        self._raise_if_fatal()
        client = self._ensure_client()
        assert self._sem is not None
        est_tokens, est_cost = 0, 0.0
        t0 = time.monotonic()
        attempts = 0
        waiting = [False]  # this request sleeps before a retry (counted in waiting_retry)
        # Our request key as the client's idempotency key: the same for every retry of this
        # request, and no random key drawn per request.
        options: Any = {"timeout": self.request_timeout(params), "idempotency_key": key}

        async def attempt() -> dict[str, Any]:
            nonlocal attempts
            self._stop_waiting(waiting)
            attempts += 1
            if abort and attempts > 1:  # a first attempt has its reservation: it goes out
                raise _Aborted()
            self._raise_if_fatal()
            # The client's raw-response path (openai's documented way to call an endpoint
            # without its models): same auth, headers and status errors, but no request
            # transform or response model, whose CPU is most of the client's cost.
            resp = await client.post(
                "/chat/completions",
                body={"model": self.endpoint.model, "messages": req.messages, **params},
                cast_to=httpx2.Response,
                options=options,
            )
            parsed = parse_completion(resp.content)
            if parsed.get("reason") in TRANSPORT_FAULTS:
                raise BadResponseBody(parsed["reason"], parsed.get("detail"))
            self._proven = True
            return parsed

        def before_sleep(state: RetryCallState) -> None:
            waiting[0] = True
            self._waiting_retry += 1
            for tally in (self._totals, _UNIT_TALLY.get() or self._taken):
                tally.retries += 1
            self._log_retry(state)

        # The semaphore bounds HTTP requests in flight; it is released as soon as the answer
        # is in, so the journal's fsync does not hold an endpoint slot.
        async with self._sem:
            if abort:
                raise _Aborted()
            if self.limiter is not None:
                est_tokens, est_cost = self._estimate(req.messages, params)
                try:
                    await self.limiter.reserve(est_tokens, est_cost)
                except BudgetExceeded as exc:
                    if abort is not None and not abort:
                        abort.append(exc)
                    raise
            loop = self._retrying.copy(before_sleep=before_sleep)
            inner = asyncio.ensure_future(loop(attempt))
            self._live.add(inner)
            try:
                parsed = await inner
            except BaseException as exc:
                if self.limiter is not None:
                    self.limiter.settle(est_tokens, 0, est_cost, 0.0, False)
                if inner in self._killed and self._fatal is not None:
                    err: BaseException = self._fatal_again()  # another request stopped us
                elif isinstance(exc, (_Aborted, asyncio.CancelledError)) or not isinstance(
                    exc, Exception
                ):
                    raise
                elif isinstance(exc, LLMError) and exc.fatal:
                    err = exc  # raised by _raise_if_fatal inside an attempt
                elif is_context_overflow(exc):
                    self._proven = True  # the endpoint answered: only this prompt is too long
                    return self._too_long(req, key, seed, exc, attempts)
                else:
                    err = self._classify(exc, attempts, time.monotonic() - t0)
                    if err.fatal and type(err).__name__ in _ENDPOINT_FATAL:
                        self._stop_endpoint(err)  # type: ignore[arg-type]
                if abort is not None and not abort:
                    abort.append(err)
                raise err from None
            finally:
                self._live.discard(inner)
                self._killed.discard(inner)
                self._stop_waiting(waiting)
        pt = int(parsed.get("prompt_tokens") or 0)
        ct = int(parsed.get("completion_tokens") or 0)
        cost = pt * self._price_in + ct * self._price_out
        entry: dict[str, Any] = {
            "v": journal_mod.JOURNAL_VERSION,
            "key": key,
            "ep": self.ep_id,
            "model": parsed.get("model") or self.endpoint.model,
            "ok": parsed["ok"],
            "reason": parsed.get("reason"),
            "detail": parsed.get("detail"),
            "text": parsed.get("text"),
            "finish_reason": parsed.get("finish_reason"),
            "logprobs": parsed.get("logprobs"),
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "cost_usd": cost,
            "seed": seed,
            "sample_index": req.sample_index,
            "stage": self.stage,
            "t": time.time(),
        }
        if "tool_calls" in parsed:
            entry["tool_calls"] = parsed["tool_calls"]
        if self.limiter is not None:  # paid once the body is in, whatever happens next
            self.limiter.settle(est_tokens, pt + ct, est_cost, cost, True)
        # Durable before use: a crash after this line cannot make us pay again.
        await self.journal.append(entry)
        self._count(entry, cached=False)
        result = ChatResult.from_entry(entry, cached=False, tag=req.tag)
        result.attempts = attempts
        return result

    def request_timeout(self, params: dict[str, Any]) -> float:
        """Seconds one request may take: ``timeout_s``, else 30 s plus 50 ms per token it
        may write (a 20 tokens/s floor): 30.4 s for an 8-token verdict, 81 s for 1,024."""
        if self.endpoint.timeout_s is not None:
            return float(self.endpoint.timeout_s)
        out = params.get("max_tokens") or params.get("max_completion_tokens") or 1024
        return 30.0 + 0.05 * int(out)

    def _stop_waiting(self, waiting: list[bool]) -> None:
        if waiting[0]:
            waiting[0] = False
            self._waiting_retry -= 1

    def _should_retry(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None or self._fatal is not None or not is_transient(exc):
            return False
        if unreachable_reason(exc):
            return state.attempt_number < UNREACHABLE_ATTEMPTS
        return True

    # -- a stop for good -----------------------------------------------------------------------
    def _fatal_again(self) -> LLMError:
        assert self._fatal is not None
        return type(self._fatal)(str(self._fatal))

    def _raise_if_fatal(self) -> None:
        """Raise the endpoint's fatal error: this gateway's, or one another worker left as a
        marker after this gateway was built (checked at most twice a second; on object
        storage every 5 s)."""
        if self._fatal is None:
            now = time.monotonic()
            # A local marker costs one failed open; on object storage a request, so rarer.
            if now - self._marker_seen_at >= (5.0 if "://" in self._marker else 0.5):
                self._marker_seen_at = now
                m = _read_marker(self._marker)
                if m is not None and float(m["t"]) >= self._built_at:
                    self._stop_endpoint(_ENDPOINT_FATAL[m["error"]](m["message"]), write=False)
        if self._fatal is not None:
            raise self._fatal_again()

    def _stop_endpoint(self, err: LLMError, write: bool = True) -> None:
        """Make ``err`` sticky: fail the requests in flight now, and every later one."""
        if self._fatal is not None:
            return
        self._fatal = err
        log.info("%s: stopped for good: %s", self.name, err)  # the caller reports it
        if write:
            marker = {
                "error": type(err).__name__,
                "message": str(err),
                "endpoint": self.name,
                "ep": self.ep_id,
                "model": self.endpoint.model,
                "stage": self.stage,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "t": time.time(),
            }
            try:
                _write_marker(self._marker, marker)
            except Exception as exc:  # the other workers will find out with their own probe
                log.warning("could not write %s: %s", self._marker, exc)
        current = asyncio.current_task()
        for fut in list(self._live):
            if fut is not current and not fut.done():
                self._killed.add(fut)
                fut.cancel()

    def _estimate(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> tuple[int, float]:
        chars = 0
        for m in messages:
            c = m.get("content")
            chars += len(c) if isinstance(c, str) else len(str(c))
        # ~3 characters per token over-estimates English a little: the budget errs on the safe side.
        prompt = chars // 3 + 4 * len(messages) + 8
        completion = int(params.get("max_tokens") or params.get("max_completion_tokens") or 1024)
        cost = prompt * self._price_in + completion * self._price_out
        return prompt + completion, cost

    def _sanitize(self, text: str) -> str:
        key = self._key.get()
        if key and key != "not-needed":
            text = text.replace(key, "***")
        return text[:500]

    def _too_long(
        self, req: ChatRequest, key: str, seed: int, exc: BaseException, attempts: int
    ) -> ChatResult:
        """A prompt over the model's context: a reject of this request, not a stop. Not
        journaled (nothing was paid; a larger context on the next run may take it)."""
        for tally in (self._totals, _UNIT_TALLY.get() or self._taken):
            tally.rejects["prompt_too_long"] = tally.rejects.get("prompt_too_long", 0) + 1
        return ChatResult(
            key=key,
            ok=False,
            reject_reason="prompt_too_long",
            detail=self._describe(exc),
            seed=seed,
            sample_index=req.sample_index,
            model=self.endpoint.model,
            attempts=attempts,
            tag=req.tag,
        )

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, openai.APIStatusError):
            msg = exc.body.get("message") if isinstance(exc.body, dict) else None
            return self._sanitize(f"HTTP {exc.status_code}: {str(msg or exc.message).rstrip('.')}")
        if isinstance(exc, BadResponseBody):
            return str(exc)
        why = unreachable_reason(exc)
        if why:
            return f"{why} at {self.endpoint.base_url}"
        chain = _chain(exc)
        names = {type(e).__name__ for e in chain}
        if isinstance(exc, openai.APITimeoutError) and (
            names & {"ReadTimeout", "SocketTimeoutError", "TimeoutError", "WriteTimeout"}
            or not names & {"ServerDisconnectedError", "ClientOSError", "ClientConnectorError"}
        ):
            t = self.endpoint.timeout_s
            setting = f"{t:g}s" if t is not None else "sized from max_tokens"
            return f"no answer in time (endpoints.{self.name}.timeout_s: {setting})"
        root = chain[-1]
        return self._sanitize(
            f"connection dropped ({type(root).__name__}: {str(root)[:120] or 'no detail'})"
        )

    def _classify(self, exc: BaseException, attempts: int, seconds: float) -> LLMError:
        where = f"endpoint {self.name!r} (model {self.endpoint.model} at {self.endpoint.base_url})"
        desc = self._describe(exc)
        why = unreachable_reason(exc)
        if why:
            fix = (
                "start the server, or fix"
                if why == "connection refused"
                else "check the host name and network, or fix"
            )
            return LLMUnreachable(
                f"{where}: {why} ({attempts} attempt(s)); {fix} endpoints.{self.name}.base_url"
            )
        if isinstance(exc, openai.APIStatusError):
            s = exc.status_code
            if s in (401, 403):
                env = self.endpoint.api_key_env
                hint = (
                    f"check the key in the environment variable {env} "
                    f"(endpoints.{self.name}.api_key_env)"
                    if env
                    else f"the endpoint wants a key: set endpoints.{self.name}.api_key_env to the "
                    "name of an environment variable that holds it"
                )
                what = "refused the credentials" if s == 401 else "denied access"
                return LLMAuthError(f"{where} {what} ({desc}); {hint}")
            if s == 429 and _is_quota(exc):
                return LLMQuotaError(
                    f"{where}: the account's quota is exhausted ({desc}); add credit or raise "
                    "the quota with the provider, or point the stage at another endpoint"
                )
            if s == 404:
                return LLMRequestError(
                    f"{where} answered 404 ({desc}): the server does not know model "
                    f"{self.endpoint.model!r} or has no chat completions at this URL; check "
                    f"endpoints.{self.name}.model and base_url (it usually ends in /v1)"
                )
            if not is_transient(exc):
                return LLMRequestError(
                    f"{where} rejected the request ({desc}); check endpoints.{self.name}.model, "
                    f"base_url and the sampling params (endpoints.{self.name}.sampling and the "
                    "stage's params)"
                )
        if is_transient(exc):
            return LLMRetryExhausted(
                f"{where}: gave up after {attempts} attempt(s) in {seconds:.1f}s, last error: "
                f"{desc}. Raise endpoints.{self.name}.max_attempts / max_retry_time_s or check "
                "the server; answers so far are journaled, run again to resume"
            )
        return LLMError(f"{where}: {desc}")

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            self.name,
            state.attempt_number,
            self._describe(exc) if exc else "?",
            wait,
        )

    # -- accounting ----------------------------------------------------------------------------
    def _count(self, entry: dict[str, Any], cached: bool) -> None:
        with self._count_lock:
            self._totals.add(entry, cached)
            (_UNIT_TALLY.get() or self._taken).add(entry, cached)

    def counters(self) -> dict[str, Any]:
        """Totals since the gateway was built: llm_calls (answers paid for now), llm_cached
        (answers from the journal), prompt_tokens, completion_tokens, cost_usd (of llm_calls),
        rejects (by reason), per_model, retries (attempts that failed and were tried again)
        and waiting_retry (requests sleeping before their next attempt right now)."""
        return {**self._totals.as_dict(), "waiting_retry": self._waiting_retry}

    def take_counters(self) -> dict[str, Any]:
        """Like :meth:`counters`, but only what happened since the last take (per unit)."""
        if getattr(self._local, "tally", None) is not None:
            # this thread calls through run(): its own usage (one unit's)
            out = {**self._local.tally.as_dict(), "waiting_retry": self._waiting_retry}
            self._local.tally = _Tally()
            return out
        out = {**self._taken.as_dict(), "waiting_retry": self._waiting_retry}
        self._taken = _Tally()
        return out

    def fill_counters(self, counters: Any) -> None:
        """Add the usage since the last take to a manifest ``Counters`` (per-model figures go
        to ``counters.extra`` as ``calls:<model>``, ``prompt_tokens:<model>``, ...; retried
        attempts as ``llm_retries``)."""
        d = self.take_counters()
        counters.llm_calls += d["llm_calls"]
        counters.llm_cached += d["llm_cached"]
        counters.prompt_tokens += d["prompt_tokens"]
        counters.completion_tokens += d["completion_tokens"]
        counters.cost_usd += d["cost_usd"]
        if d["retries"]:
            counters.extra["llm_retries"] = counters.extra.get("llm_retries", 0) + d["retries"]
        for model, m in d["per_model"].items():
            for k, v in m.items():
                ek = f"{k}:{model}"
                counters.extra[ek] = counters.extra.get(ek, 0) + v

    # -- closing -------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:  # built on another, already closed loop
                pass
            self._client = None
        if self.limiter is not None:
            self.limiter.close()
        self.journal.close()

    def close(self) -> None:
        loop = self._own_loop
        own = loop is not None and not loop.is_closed()
        if self._client is not None and self._client_loop is not None:
            if own and self._client_loop is loop:
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=60)
            self._client = None
        if self.limiter is not None:
            self.limiter.close()
        self.journal.close()
        if own:
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)
            loop.close()
        self._own_loop = None
        self._loop_thread = None

    def __repr__(self) -> str:
        return f"Gateway({self.name!r}, {self.ep_id!r}, model={self.endpoint.model!r})"


class _Aborted(Exception):
    """Another request of the same batch hit an error that stops the batch."""


class _Tally:
    def __init__(self) -> None:
        self.calls = 0
        self.cached = 0
        self.pt = 0
        self.ct = 0
        self.cost = 0.0
        self.retries = 0
        self.rejects: dict[str, int] = {}
        self.per_model: dict[str, dict[str, float]] = {}

    def add(self, e: dict[str, Any], cached: bool) -> None:
        if not e.get("ok"):
            r = e.get("reason") or "unknown"
            self.rejects[r] = self.rejects.get(r, 0) + 1
        if cached:
            self.cached += 1
            return
        pt, ct, cost = (
            int(e.get("prompt_tokens") or 0),
            int(e.get("completion_tokens") or 0),
            float(e.get("cost_usd") or 0.0),
        )
        self.calls += 1
        self.pt += pt
        self.ct += ct
        self.cost += cost
        m = self.per_model.setdefault(
            str(e.get("model") or "?"),
            {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
        )
        m["calls"] += 1
        m["prompt_tokens"] += pt
        m["completion_tokens"] += ct
        m["cost_usd"] += cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "llm_calls": self.calls,
            "llm_cached": self.cached,
            "prompt_tokens": self.pt,
            "completion_tokens": self.ct,
            "cost_usd": self.cost,
            "retries": self.retries,
            "rejects": dict(self.rejects),
            "per_model": {k: dict(v) for k, v in self.per_model.items()},
        }
