"""Run-wide request/token rate limits and the LLM budget, shared by every worker of a run.

One :class:`RunLedger` holds, per endpoint, a request pacer (requests_per_minute) and a
token bucket (tokens_per_minute), and run-wide the spend so far against ``run.budget``
(``max_cost_usd``, ``max_requests``). Before each request a gateway *reserves* (one request,
its estimated tokens and cost) and gets back how long to wait; after the answer it *settles*
the reservation with the real usage. A reservation that would cross the budget is refused and
the gateway raises :class:`rankmill.errors.BudgetExceeded`; nothing is sent.

So that limits hold for the whole run and not per worker, the ledger lives in one named Ray
actor per run, created on the driver by :func:`ensure_run_services` (the runner calls it
before a stage that uses an endpoint and passes what it returns to the stage in
``StageContext.shared``); workers find it by name. Workers do not call it per request: a
:class:`RayLimiter` reserves requests in blocks (:meth:`RunLedger.grant`: start times spaced
run-wide, the block's estimated cost held against the budget) and settles in batches
(:meth:`RunLedger.settle_many`), so the actor sees a few calls per second per worker however
many requests are in flight. Without Ray (plain unit tests, direct use) the gateway falls
back to an in-process ledger, one per run directory.

The budget is cumulative over the run directory: the ledger starts from what the journal
says was already paid, so a stopped run resumes only after the limit is raised. Requests
are counted once per journaled request key (retries of transient errors are not requests).

Use::

    shared = ensure_run_services(cfg, run_dir)   # driver; {} when no limits are configured
    limiter = make_limiter(shared, run_dir, endpoint_name, rpm, tpm, budget, journal_totals)
    wait = await limiter.reserve(tokens=300, cost_usd=0.0001)   # may raise BudgetExceeded
    ...
    limiter.settle(reservation_tokens=300, tokens=280, est_cost=..., cost_usd=..., sent=True)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rankmill.errors import BudgetExceeded

log = logging.getLogger(__name__)

LEDGER_KEY = "llm_ledger"
NAMESPACE = "rankmill"


@dataclass
class _Pace:
    """Request pacing and token bucket of one endpoint."""

    rpm: float | None = None
    tpm: float | None = None
    next_slot: float = 0.0  # earliest time of the next request (evenly spaced requests)
    tokens: float = 0.0  # token bucket level; may go negative (debt) while reservations wait
    tokens_at: float = 0.0  # when the level was last brought up to date


@dataclass
class RunLedger:
    """The arithmetic of limits and budget; pure Python, the clock is passed in."""

    max_cost_usd: float | None = None
    max_requests: int | None = None
    spent_cost_usd: float = 0.0
    spent_requests: int = 0
    reserved_cost_usd: float = 0.0
    reserved_requests: int = 0
    paces: dict[str, _Pace] = field(default_factory=dict)

    def configure(
        self,
        budget: dict[str, Any] | None,
        limits: dict[str, dict[str, float | None]],
        spent_cost_usd: float | None = None,
        spent_requests: int | None = None,
    ) -> None:
        """Set limits (keeps pacing state of endpoints whose limits did not change)."""
        budget = budget or {}
        self.max_cost_usd = budget.get("max_cost_usd")
        self.max_requests = budget.get("max_requests")
        if spent_cost_usd is not None:
            self.spent_cost_usd = float(spent_cost_usd)
        if spent_requests is not None:
            self.spent_requests = int(spent_requests)
        for name, lim in limits.items():
            pace = self.paces.get(name)
            rpm, tpm = lim.get("rpm"), lim.get("tpm")
            if pace is None or pace.rpm != rpm or pace.tpm != tpm:
                self.paces[name] = _Pace(rpm=rpm, tpm=tpm, tokens=_capacity(tpm), tokens_at=0.0)

    def reserve(self, endpoint: str, tokens: int, cost_usd: float, now: float) -> tuple[float, str]:
        """Reserve one request; returns (seconds to wait, "") or (-1, why it is refused)."""
        granted, wait, _, why = self.grant(endpoint, 1, tokens, cost_usd, now)
        return (wait, "") if granted else (-1.0, why)

    def grant(
        self,
        endpoint: str,
        n: int,
        tokens_each: int,
        cost_each: float,
        now: float,
        settle: tuple[int, float, int, float, int] | None = None,
    ) -> tuple[int, float, float, str]:
        """Reserve a block of up to ``n`` requests of ``tokens_each`` tokens and ``cost_each``
        dollars (fewer when the budget has less left); ``settle`` first applies a batch of
        settlements (see :meth:`settle_many`).

        Returns ``(granted, delay, spacing, why)``: the block's requests may start at
        ``delay``, ``delay + spacing``, ... seconds from ``now``; ``granted == 0`` means refused
        and ``why`` says which limit.
        """
        if settle is not None:
            self.settle_many(endpoint, *settle)
        fit, why = n, ""
        if self.max_requests is not None:
            left = self.max_requests - self.spent_requests - self.reserved_requests
            if left < fit:
                fit = max(0, left)
                why = (
                    f"run.budget.max_requests={self.max_requests} reached "
                    f"({self.spent_requests} requests paid, {self.reserved_requests} in flight)"
                )
        if self.max_cost_usd is not None:
            left_usd = self.max_cost_usd + 1e-12 - self.spent_cost_usd - self.reserved_cost_usd
            by_cost = int(left_usd // cost_each) if cost_each > 0 else (n if left_usd >= 0 else 0)
            if by_cost < fit:
                fit = max(0, by_cost)
                why = (
                    f"run.budget.max_cost_usd={self.max_cost_usd:g} would be crossed "
                    f"(${self.spent_cost_usd:.4f} spent, ${self.reserved_cost_usd:.4f} in flight, "
                    f"next request up to ${cost_each:.4f})"
                )
        if fit <= 0:
            return 0, -1.0, 0.0, why
        self.reserved_requests += fit
        self.reserved_cost_usd += fit * cost_each
        pace = self.paces.get(endpoint)
        if pace is None:
            return fit, 0.0, 0.0, ""
        start, spacing = now, 0.0
        if pace.rpm:
            spacing = 60.0 / pace.rpm
            start = max(start, pace.next_slot)
            pace.next_slot = start + fit * spacing
        if pace.tpm:
            rate = pace.tpm / 60.0
            cap = _capacity(pace.tpm)
            if pace.tokens_at == 0.0:
                pace.tokens_at = now
            pace.tokens = min(cap, pace.tokens + (now - pace.tokens_at) * rate)
            pace.tokens_at = now
            pace.tokens -= fit * tokens_each
            if pace.tokens < 0:
                start = max(start, now - pace.tokens / rate)
        return fit, max(0.0, start - now), spacing, ""

    def settle_many(
        self,
        endpoint: str,
        released: int,
        released_cost: float,
        sent: int,
        cost_usd: float,
        token_refund: int,
    ) -> None:
        """Settle a batch: ``released`` reservations (``released_cost`` of estimates) end,
        ``sent`` of them were paid ``cost_usd`` in total, and ``token_refund`` estimated
        tokens were not used."""
        self.reserved_requests = max(0, self.reserved_requests - released)
        self.reserved_cost_usd = max(0.0, self.reserved_cost_usd - released_cost)
        self.spent_requests += sent
        self.spent_cost_usd += cost_usd
        pace = self.paces.get(endpoint)
        if pace is not None and pace.tpm:
            pace.tokens += token_refund

    def settle(
        self,
        endpoint: str,
        est_tokens: int,
        tokens: int,
        est_cost: float,
        cost_usd: float,
        sent: bool,
    ) -> None:
        """Replace a reservation's estimates with what the answer really used."""
        self.settle_many(
            endpoint,
            1,
            est_cost,
            1 if sent else 0,
            cost_usd if sent else 0.0,
            est_tokens - (tokens if sent else 0),
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "spent_cost_usd": self.spent_cost_usd,
            "spent_requests": self.spent_requests,
            "reserved_requests": self.reserved_requests,
            "max_cost_usd": self.max_cost_usd,
            "max_requests": self.max_requests,
        }


def _capacity(tpm: float | None) -> float:
    # Ten seconds' worth of tokens may go at once, so a steady stream is not held back, but
    # no minute can see much more than its share.
    return 0.0 if not tpm else tpm / 6.0


# -- the ledger behind an interface the gateway awaits ----------------------------------------
class Limiter:
    """What a gateway calls; subclasses keep the ledger locally or in a Ray actor."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def reserve(self, tokens: int, cost_usd: float) -> None:
        raise NotImplementedError

    def settle(
        self, est_tokens: int, tokens: int, est_cost: float, cost_usd: float, sent: bool
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Give back what this limiter holds (nothing, unless it reserves ahead)."""


class LocalLimiter(Limiter):
    """A ledger in this process (shared by every gateway of the same run directory here)."""

    def __init__(self, endpoint: str, ledger: RunLedger, lock: threading.Lock):
        super().__init__(endpoint)
        self.ledger = ledger
        self.lock = lock

    async def reserve(self, tokens: int, cost_usd: float) -> None:
        with self.lock:
            wait, why = self.ledger.reserve(self.endpoint, tokens, cost_usd, time.monotonic())
        if wait < 0:
            raise BudgetExceeded(_budget_message(why))
        if wait > 0:
            await asyncio.sleep(wait)

    def settle(
        self, est_tokens: int, tokens: int, est_cost: float, cost_usd: float, sent: bool
    ) -> None:
        with self.lock:
            self.ledger.settle(self.endpoint, est_tokens, tokens, est_cost, cost_usd, sent)


class RayLimiter(Limiter):
    """The run-wide ledger in a named Ray actor, reserved in blocks and settled in batches.

    A request does not call the actor: it takes a slot of a block this worker reserved
    (a start time, its share of the budget and of the token bucket). When the block runs out
    one request asks the actor for the next block, carrying the settlements gathered so far;
    other settlements go in one fire-and-forget call every ``SETTLE_EVERY`` requests or
    ``SETTLE_S`` seconds, and on :meth:`close` (which also returns what was not used).

    A block is about ``BLOCK_S`` seconds of the endpoint's requests_per_minute (at most
    ``MAX_BLOCK`` requests), or ``BUDGET_BLOCK`` requests when only a budget is set. Slots are
    spaced run-wide by the actor, and a slot more than ``GRACE_S`` late is dropped (released),
    so no window sees more than its share of requests. The budget is never crossed: a block
    holds its requests' estimated cost until settled; it may stop a worker up to one block
    per worker early.
    """

    BLOCK_S = 0.5
    MAX_BLOCK = 64
    BUDGET_BLOCK = 16
    GRACE_S = 0.5
    SETTLE_EVERY = 64
    SETTLE_S = 0.5

    def __init__(self, endpoint: str, actor: Any, rpm: float | None = None):
        super().__init__(endpoint)
        self.actor = actor
        self.rpm = rpm
        self._slots: collections.deque[float] = collections.deque()
        self._cost_left = 0.0
        self._tokens_left = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._unsettled = [0, 0.0, 0, 0.0, 0]  # released, released cost, sent, cost, tokens
        self._settled_at = time.monotonic()
        self.calls = 0  # actor calls made (grants and settlements)

    def _block_size(self, tokens: int) -> int:
        if self.rpm:
            return max(1, min(self.MAX_BLOCK, int(self.rpm / 60.0 * self.BLOCK_S)))
        return self.BUDGET_BLOCK

    def _take_settlement(self) -> tuple[int, float, int, float, int] | None:
        u = self._unsettled
        if not u[0] and not u[4]:
            return None
        self._unsettled = [0, 0.0, 0, 0.0, 0]
        self._settled_at = time.monotonic()
        return (u[0], u[1], u[2], u[3], u[4])

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def reserve(self, tokens: int, cost_usd: float) -> None:
        async with self._loop_lock():
            while True:
                now = time.monotonic()
                if self.rpm:
                    while self._slots and self._slots[0] < now - self.GRACE_S:
                        self._slots.popleft()  # too late to use without a burst: give it back
                        self._unsettled[0] += 1
                if (
                    self._slots
                    and self._cost_left >= cost_usd - 1e-12
                    and self._tokens_left >= tokens
                ):
                    slot = self._slots.popleft()
                    self._cost_left -= cost_usd
                    self._tokens_left -= tokens
                    break
                n = self._block_size(tokens)
                self.calls += 1
                granted, delay, spacing, why = await self.actor.grant.remote(
                    self.endpoint, n, tokens, cost_usd, self._take_settlement()
                )
                if granted <= 0:
                    raise BudgetExceeded(_budget_message(why))
                base = time.monotonic() + delay
                self._slots.extend(base + i * spacing for i in range(granted))
                self._cost_left += granted * cost_usd
                self._tokens_left += granted * tokens
        wait = slot - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def settle(
        self, est_tokens: int, tokens: int, est_cost: float, cost_usd: float, sent: bool
    ) -> None:
        u = self._unsettled
        u[0] += 1
        u[1] += est_cost
        u[2] += 1 if sent else 0
        u[3] += cost_usd if sent else 0.0
        u[4] += est_tokens - (tokens if sent else 0)
        if u[0] >= self.SETTLE_EVERY or time.monotonic() - self._settled_at > self.SETTLE_S:
            self._flush()

    def _flush(self) -> None:
        batch = self._take_settlement()
        if batch is not None:
            self.calls += 1
            # Fire and forget: the answer is not needed, and an actor call costs CPU to await.
            self.actor.settle_many.remote(self.endpoint, *batch)

    def close(self) -> None:
        """Settle what is pending and give back what this worker reserved but did not use."""
        self._unsettled[0] += len(self._slots)
        self._unsettled[1] += self._cost_left
        self._unsettled[4] += self._tokens_left
        self._slots.clear()
        self._cost_left = 0.0
        self._tokens_left = 0
        self._flush()


def _budget_message(why: str) -> str:
    return (
        f"LLM budget: {why}. Committed work and every paid answer are kept; raise the limit "
        "(--set run.budget.max_cost_usd=... / run.budget.max_requests=...) and run again to resume."
    )


class _LedgerActor(RunLedger):
    """The body of the Ray actor: a RunLedger that reads the actor's own clock."""

    def reserve(  # type: ignore[override]
        self, endpoint: str, tokens: int, cost_usd: float
    ) -> tuple[float, str]:
        return super().reserve(endpoint, tokens, cost_usd, time.monotonic())

    def grant(  # type: ignore[override]
        self,
        endpoint: str,
        n: int,
        tokens_each: int,
        cost_each: float,
        settle: tuple[int, float, int, float, int] | None = None,
    ) -> tuple[int, float, float, str]:
        return super().grant(endpoint, n, tokens_each, cost_each, time.monotonic(), settle)


# -- building them ---------------------------------------------------------------------------
_local_ledgers: dict[str, tuple[RunLedger, threading.Lock]] = {}
_local_guard = threading.Lock()


def local_ledger(run_dir: str) -> tuple[RunLedger, threading.Lock, bool]:
    """The in-process ledger of ``run_dir`` (created on first use; True when new)."""
    key = os.path.abspath(run_dir) if "://" not in run_dir else run_dir
    with _local_guard:
        if key in _local_ledgers:
            led, lock = _local_ledgers[key]
            return led, lock, False
        led, lock = RunLedger(), threading.Lock()
        _local_ledgers[key] = (led, lock)
        return led, lock, True


def ledger_name(run_dir: str) -> str:
    key = os.path.abspath(run_dir) if "://" not in run_dir else run_dir
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"rankmill-llm-ledger-{digest}"


def endpoint_limits(endpoints: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """rpm/tpm by endpoint name, from EndpointConfig objects or their dumps."""
    out = {}
    for name, ep in endpoints.items():
        d = ep if isinstance(ep, dict) else ep.model_dump()
        out[name] = {"rpm": d.get("requests_per_minute"), "tpm": d.get("tokens_per_minute")}
    return out


def needs_ledger(budget: dict[str, Any] | None, limits: dict[str, dict[str, Any]]) -> bool:
    budget = budget or {}
    if budget.get("max_cost_usd") is not None or budget.get("max_requests") is not None:
        return True
    return any(v.get("rpm") or v.get("tpm") for v in limits.values())


_driver_handles: dict[str, Any] = {}


def ensure_run_services(cfg: Any, run_dir: str, ray: Any = None) -> dict[str, Any]:
    """Create (or refresh) the run-wide ledger actor; returns entries for StageContext.shared.

    Call on the driver, with Ray initialized, before running a stage that calls an endpoint.
    ``cfg`` is a PipelineConfig. The actor is named after the run directory, owned by the
    driver (it ends with the driver's job, so nothing outlives the run), and re-configured on
    every call with the current limits and with what the journal says was already paid.
    The driver holds a handle until its job ends (or :func:`release_run_services`).
    Returns ``{}`` when the run has no rate limits and no budget (no actor is needed).
    """
    from rankmill.llm.journal import maintain

    # Publish what writers that died left behind and compact a journal that grew many
    # segments: the driver does it once, before the stage's workers open the journal.
    totals = maintain(run_dir)
    budget = cfg.run.budget.model_dump(mode="json")
    limits = endpoint_limits(cfg.endpoints)
    if not needs_ledger(budget, limits):
        return {}
    if ray is None:
        import ray as ray_module

        ray = ray_module
    if not ray.is_initialized():
        return {}
    name = ledger_name(run_dir)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(_LedgerActor)
    # A named actor without its creating handle is garbage-collected: the driver keeps the
    # first handle for the run (replacing it with a looked-up one would end the actor).
    session = ray.get_runtime_context().get_node_id()  # a new Ray: a new actor
    held = _driver_handles.get(name)
    if held is not None and held[0] == session:
        actor = held[1]
    else:
        actor = actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
        _driver_handles[name] = (session, actor)
    ray.get(actor.configure.remote(budget, limits, totals.cost_usd, totals.requests))
    log.info(
        "LLM ledger %s ready (%d requests, $%.4f already paid)",
        name,
        totals.requests,
        totals.cost_usd,
    )
    return {LEDGER_KEY: {"name": name, "namespace": NAMESPACE}}


def make_limiter(
    shared: dict[str, Any],
    run_dir: str,
    endpoint: str,
    budget: dict[str, Any] | None,
    limits: dict[str, dict[str, Any]],
    spent_cost_usd: float,
    spent_requests: int,
) -> Limiter | None:
    """The limiter a gateway should use: the run's Ray actor when ``shared`` names one and
    Ray is up, else an in-process ledger; None when nothing is limited."""
    info = shared.get(LEDGER_KEY)
    if info:
        try:
            import ray

            if ray.is_initialized():
                actor = ray.get_actor(info["name"], namespace=info.get("namespace", NAMESPACE))
                return RayLimiter(endpoint, actor, rpm=(limits.get(endpoint) or {}).get("rpm"))
            log.warning(
                "run ledger %s named but Ray is not initialized; limits are per process here",
                info["name"],
            )
        except (ImportError, ValueError) as exc:
            log.warning(
                "run ledger %s not found (%s); limits are per process here", info.get("name"), exc
            )
    if not needs_ledger(budget, limits):
        return None
    ledger, lock, new = local_ledger(run_dir)
    with lock:
        if new:
            ledger.configure(budget, limits, spent_cost_usd, spent_requests)
        else:
            ledger.configure(budget, limits)
    return LocalLimiter(endpoint, ledger, lock)


def release_run_services(run_dir: str) -> None:
    """Drop the driver's handle of the run's ledger actor (Ray then ends it)."""
    _driver_handles.pop(ledger_name(run_dir), None)
