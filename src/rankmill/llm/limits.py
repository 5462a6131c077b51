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
``StageContext.shared``); workers find it by name. Without Ray (plain unit tests, direct use)
the gateway falls back to an in-process ledger, one per run directory.

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
        if self.max_requests is not None:
            if self.spent_requests + self.reserved_requests + 1 > self.max_requests:
                return -1.0, (
                    f"run.budget.max_requests={self.max_requests} reached "
                    f"({self.spent_requests} requests paid, {self.reserved_requests} in flight)"
                )
        if self.max_cost_usd is not None:
            projected = self.spent_cost_usd + self.reserved_cost_usd + cost_usd
            if projected > self.max_cost_usd + 1e-12:
                return -1.0, (
                    f"run.budget.max_cost_usd={self.max_cost_usd:g} would be crossed "
                    f"(${self.spent_cost_usd:.4f} spent, ${self.reserved_cost_usd:.4f} in flight, "
                    f"next request up to ${cost_usd:.4f})"
                )
        self.reserved_requests += 1
        self.reserved_cost_usd += cost_usd
        pace = self.paces.get(endpoint)
        if pace is None:
            return 0.0, ""
        start = now
        if pace.rpm:
            start = max(start, pace.next_slot)
            pace.next_slot = start + 60.0 / pace.rpm
        if pace.tpm:
            rate = pace.tpm / 60.0
            cap = _capacity(pace.tpm)
            if pace.tokens_at == 0.0:
                pace.tokens_at = now
            pace.tokens = min(cap, pace.tokens + (now - pace.tokens_at) * rate)
            pace.tokens_at = now
            pace.tokens -= tokens
            if pace.tokens < 0:
                start = max(start, now - pace.tokens / rate)
        return max(0.0, start - now), ""

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
        self.reserved_requests = max(0, self.reserved_requests - 1)
        self.reserved_cost_usd = max(0.0, self.reserved_cost_usd - est_cost)
        if sent:
            self.spent_requests += 1
            self.spent_cost_usd += cost_usd
        pace = self.paces.get(endpoint)
        if pace is not None and pace.tpm:
            pace.tokens += est_tokens - (tokens if sent else 0)

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
    """The run-wide ledger in a named Ray actor."""

    def __init__(self, endpoint: str, actor: Any):
        super().__init__(endpoint)
        self.actor = actor

    async def reserve(self, tokens: int, cost_usd: float) -> None:
        wait, why = await self.actor.reserve.remote(self.endpoint, tokens, cost_usd)
        if wait < 0:
            raise BudgetExceeded(_budget_message(why))
        if wait > 0:
            await asyncio.sleep(wait)

    def settle(
        self, est_tokens: int, tokens: int, est_cost: float, cost_usd: float, sent: bool
    ) -> None:
        # Fire and forget: the answer is not needed, and an actor call costs CPU to await.
        self.actor.settle.remote(self.endpoint, est_tokens, tokens, est_cost, cost_usd, sent)


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
    digest = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
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
    from rankmill.llm.journal import journal_dir, scan

    budget = cfg.run.budget.model_dump(mode="json")
    limits = endpoint_limits(cfg.endpoints)
    if not needs_ledger(budget, limits):
        return {}
    if ray is None:
        import ray as ray_module

        ray = ray_module
    if not ray.is_initialized():
        return {}
    _, totals = scan(journal_dir(run_dir))
    name = ledger_name(run_dir)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(_LedgerActor)
    actor = actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(actor.configure.remote(budget, limits, totals.cost_usd, totals.requests))
    # A named actor without a handle is garbage-collected; the driver keeps one for the run.
    _driver_handles[name] = actor
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
                return RayLimiter(endpoint, actor)
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
