"""The gateway to OpenAI-compatible chat endpoints: the only way rankmill calls an LLM.

One :class:`Gateway` per endpoint per worker. It sends chat completions through the ``openai``
async client (its own retries off) and adds what a long synthesis run needs:

- **one retry layer** (tenacity), decided by exception type and status: 429 (honouring
  ``Retry-After``), 5xx, 408/409, timeouts and connection errors are retried with jittered
  exponential backoff, bounded by ``max_attempts`` and ``max_retry_time_s``; 400/404/422 raise
  :class:`LLMRequestError`, 401/403 :class:`LLMAuthError`, a 429 that says the quota is
  exhausted :class:`LLMQuotaError` — at once, with what to fix;
- **a durable journal** (:mod:`rankmill.llm.journal`): every completed answer is fsync'ed before
  it is returned, keyed by :func:`request_key`; a request whose key is journaled is answered
  from the journal (one indexed lookup) and never sent again, so a re-run after a crash
  re-sends only what was in flight; on an object-store run dir, ``chat``/``chat_many`` publish
  what they journaled to the run dir before they return;
- **bad answers are data**: ``finish_reason=length`` ("truncated"), content-filter refusals
  ("content_filter"), model refusals ("refusal"), empty ``choices`` ("empty_choices"), empty
  text ("empty_content") and unparseable bodies ("malformed_response") come back as
  ``ChatResult(ok=False, reject_reason=...)``; they are journaled as rejects (a re-run does not
  pay for them again) and, with ``resample_bad=n``, re-sampled up to n times with new seeds;
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
import hashlib
import importlib.util
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from rankmill.config import EndpointConfig
from rankmill.errors import (
    BudgetExceeded,
    LLMAuthError,
    LLMError,
    LLMQuotaError,
    LLMRequestError,
    LLMRetryExhausted,
)
from rankmill.llm import journal as journal_mod
from rankmill.llm.journal import Journal
from rankmill.llm.limits import Limiter, endpoint_limits, make_limiter

log = logging.getLogger(__name__)
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
    """Turn a 200 body into the fields of a journal entry (ok, reason, text, usage, ...)."""
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
        return {**out, "ok": False, "reason": "empty_choices"}
    c0 = choices[0]
    if not isinstance(c0, dict) or not isinstance(c0.get("message", {}), dict):
        return {**out, "ok": False, "reason": "malformed_response", "detail": "bad choice"}
    msg = c0.get("message") or {}
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


def is_transient(exc: BaseException) -> bool:
    """Retry 429 (not quota), 5xx, 408/409, timeouts and connection errors; nothing else."""
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
    ):
        self.endpoint = endpoint
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
        if not endpoint.base_url:
            raise LLMError(
                f"endpoint {name!r} has no base_url yet (a local endpoint gets one when the "
                "runner starts its server); build the gateway after the runner started it"
            )
        self._key = self._read_key(endpoint, name)
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
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        self._client: openai.AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._local = threading.local()
        self._inflight: dict[str, asyncio.Future[ChatResult]] = {}
        self._totals = _Tally()
        self._taken = _Tally()
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
            timeout = httpx2.Timeout(
                self.endpoint.timeout_s, connect=min(30.0, self.endpoint.timeout_s)
            )
            http: httpx2.AsyncClient
            if self.transport == "aiohttp":
                http = openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
            else:
                http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            self._client = openai.AsyncOpenAI(
                base_url=self.endpoint.base_url,
                api_key=self._key.get(),
                max_retries=0,  # tenacity is the only retry layer
                timeout=self.endpoint.timeout_s,
                http_client=http,
            )
            self._client_loop = loop
            self._sem = asyncio.Semaphore(conc)
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
        return self.run(self.chat_many(requests))

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
        if entry is not None:
            self._count(entry, cached=True)
            return ChatResult.from_entry(entry, cached=True, tag=req.tag)
        pending = self._inflight.get(key)
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
        client = self._ensure_client()
        assert self._sem is not None
        est_tokens, est_cost = 0, 0.0
        t0 = time.monotonic()
        attempts = 0

        async def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            if abort:
                raise _Aborted()
            # The client's raw-response path (openai's documented way to call an endpoint
            # without its models): same auth, headers and status errors, but no request
            # transform or response model, whose CPU is most of the client's cost.
            resp = await client.post(
                "/chat/completions",
                body={"model": self.endpoint.model, "messages": req.messages, **params},
                cast_to=httpx2.Response,
            )
            return resp.content

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
            try:
                content = await self._retrying.copy()(attempt)
            except BaseException as exc:
                if self.limiter is not None:
                    self.limiter.settle(est_tokens, 0, est_cost, 0.0, False)
                if isinstance(exc, (_Aborted, asyncio.CancelledError)) or not isinstance(
                    exc, Exception
                ):
                    raise
                err = self._classify(exc, attempts, time.monotonic() - t0)
                if abort is not None and not abort:
                    abort.append(err)
                raise err from None
        parsed = parse_completion(content)
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

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, openai.APIStatusError):
            msg = exc.body.get("message") if isinstance(exc.body, dict) else None
            return self._sanitize(f"HTTP {exc.status_code}: {str(msg or exc.message).rstrip('.')}")
        if isinstance(exc, openai.APITimeoutError):
            # The aiohttp transport reports refused/reset connections as connect timeouts too.
            cause = exc.__cause__
            return (
                f"timeout or dropped connection ({type(cause).__name__ if cause else 'timeout'}, "
                f"timeout_s={self.endpoint.timeout_s:g})"
            )
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            return self._sanitize(
                f"connection error ({type(cause).__name__ if cause else 'unknown'})"
            )
        return self._sanitize(f"{type(exc).__name__}: {exc}")

    def _classify(self, exc: BaseException, attempts: int, seconds: float) -> Exception:
        where = f"endpoint {self.name!r} ({self.endpoint.model} at {self.endpoint.base_url})"
        desc = self._describe(exc)
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
                return LLMAuthError(f"{where} refused the credentials ({desc}); {hint}")
            if s == 429 and _is_quota(exc):
                return LLMQuotaError(
                    f"{where}: the account's quota is exhausted ({desc}); add credit or raise "
                    "the quota with the provider, or point the stage at another endpoint"
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
        self._totals.add(entry, cached)
        (_UNIT_TALLY.get() or self._taken).add(entry, cached)

    def counters(self) -> dict[str, Any]:
        """Totals since the gateway was built: llm_calls (answers paid for now), llm_cached
        (answers from the journal), prompt_tokens, completion_tokens, cost_usd (of llm_calls),
        rejects (by reason) and per_model."""
        return self._totals.as_dict()

    def take_counters(self) -> dict[str, Any]:
        """Like :meth:`counters`, but only what happened since the last take (per unit)."""
        if getattr(self._local, "tally", None) is not None:
            # this thread calls through run(): its own usage (one unit's)
            out = self._local.tally.as_dict()
            self._local.tally = _Tally()
            return out
        out = self._taken.as_dict()
        self._taken = _Tally()
        return out

    def fill_counters(self, counters: Any) -> None:
        """Add the usage since the last take to a manifest ``Counters`` (per-model figures go
        to ``counters.extra`` as ``calls:<model>``, ``prompt_tokens:<model>``, ...)."""
        d = self.take_counters()
        counters.llm_calls += d["llm_calls"]
        counters.llm_cached += d["llm_cached"]
        counters.prompt_tokens += d["prompt_tokens"]
        counters.completion_tokens += d["completion_tokens"]
        counters.cost_usd += d["cost_usd"]
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
            "rejects": dict(self.rejects),
            "per_model": {k: dict(v) for k, v in self.per_model.items()},
        }
