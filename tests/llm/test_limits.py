"""Rate limits and the budget: the ledger's arithmetic, in-process limits, the run-wide Ray
ledger across two workers, and a budget stop that resumes when the limit is raised."""

from __future__ import annotations

import types

import pytest

from rankmill.config import EndpointConfig, RunConfig
from rankmill.errors import BudgetExceeded
from rankmill.llm import ChatRequest
from rankmill.llm import limits as limits_mod
from rankmill.llm.limits import RunLedger
from rankmill.pipeline import validate_pipeline
from tests.llm.conftest import user


def test_ledger_spaces_requests_evenly():
    led = RunLedger()
    led.configure(None, {"e": {"rpm": 60.0, "tpm": None}})
    waits = [led.reserve("e", 10, 0.0, now=100.0)[0] for _ in range(4)]
    assert waits == [0.0, 1.0, 2.0, 3.0]
    assert led.reserve("e", 10, 0.0, now=110.0)[0] == 0.0  # idle time is not banked


def test_ledger_token_bucket_and_settle():
    led = RunLedger()
    led.configure(None, {"e": {"rpm": None, "tpm": 600.0}})  # 10 tokens/s, bucket of 100
    assert led.reserve("e", 100, 0.0, now=0.0)[0] == 0.0
    wait, _ = led.reserve("e", 50, 0.0, now=0.0)
    assert wait == pytest.approx(5.0)
    led.settle("e", 50, 10, 0.0, 0.0, sent=True)  # used far less than estimated: refund
    assert led.reserve("e", 40, 0.0, now=0.0)[0] == pytest.approx(5.0)


def test_ledger_budget_refuses_before_crossing():
    led = RunLedger()
    led.configure(
        {"max_cost_usd": 1.0, "max_requests": 3}, {}, spent_cost_usd=0.5, spent_requests=1
    )
    assert led.reserve("e", 0, 0.4, 0.0)[0] == 0.0
    wait, why = led.reserve("e", 0, 0.2, 0.0)  # 0.5 + 0.4 in flight + 0.2 > 1.0
    assert wait < 0 and "max_cost_usd" in why
    led.settle("e", 0, 0, 0.4, 0.1, sent=True)  # it really cost 0.1
    assert led.reserve("e", 0, 0.2, 0.0)[0] == 0.0  # 3 requests now: 1 + 1 + this one
    wait, why = led.reserve("e", 0, 0.0, 0.0)
    assert wait < 0 and "max_requests" in why


def test_ledger_grants_blocks_spaced_run_wide():
    led = RunLedger()
    led.configure(None, {"e": {"rpm": 60.0, "tpm": None}})
    assert led.grant("e", 4, 10, 0.0, now=100.0) == (4, 0.0, 1.0, "")
    # the next block (another worker's) starts where this one ends
    assert led.grant("e", 2, 10, 0.0, now=100.5) == (2, 3.5, 1.0, "")
    assert led.reserve("e", 10, 0.0, now=100.5)[0] == pytest.approx(5.5)


def test_ledger_grants_what_the_budget_has_left_then_refuses():
    led = RunLedger()
    led.configure({"max_requests": 10, "max_cost_usd": 1.0}, {})
    assert led.grant("e", 4, 0, 0.05, now=0.0)[0] == 4
    assert led.grant("e", 8, 0, 0.05, now=0.0)[0] == 6  # max_requests: 10 - 4 reserved
    granted, _, _, why = led.grant("e", 1, 0, 0.05, now=0.0)
    assert granted == 0 and "max_requests" in why
    # a batch settlement: 10 released, 7 were sent for $0.07, 3 not sent
    led.settle_many("e", 10, 0.5, 7, 0.07, 0)
    assert (led.spent_requests, led.reserved_requests) == (7, 0)
    assert led.spent_cost_usd == pytest.approx(0.07) and led.reserved_cost_usd == 0.0
    assert led.grant("e", 8, 0, 0.4, now=0.0)[0] == 2  # $0.93 left: two of $0.40
    granted, _, _, why = led.grant("e", 1, 0, 0.4, now=0.0)
    assert granted == 0 and "max_cost_usd" in why


def test_ledger_block_waits_for_its_tokens():
    led = RunLedger()
    led.configure(None, {"e": {"rpm": None, "tpm": 600.0}})  # 10 tokens/s, bucket of 100
    assert led.grant("e", 5, 20, 0.0, now=0.0)[:2] == (5, 0.0)
    granted, delay, spacing, _ = led.grant("e", 3, 20, 0.0, now=0.0)
    assert (granted, spacing) == (3, 0.0) and delay == pytest.approx(6.0)
    led.settle_many("e", 3, 0.0, 0, 0.0, 60)  # not sent: its tokens come back
    assert led.grant("e", 1, 20, 0.0, now=0.0)[1] == pytest.approx(2.0)


def test_rpm_limit_in_process(server, make_gw):
    gw = make_gw(requests_per_minute=600.0, max_concurrency=16)  # 10/s
    gw.chat_many_sync([ChatRequest(messages=user(f"q{i}")) for i in range(11)])
    t = sorted(a for a, _ in server.stats()["arrivals"])
    assert t[-1] - t[0] >= 0.95


def test_budget_stops_before_crossing_and_resumes_when_raised(server, make_gw, tmp_path):
    run_dir = str(tmp_path / "run")
    reqs = [ChatRequest(messages=user(f"q{i}")) for i in range(8)]
    gw = make_gw(run_dir=run_dir, gw_kw={"budget": {"max_requests": 5}}, max_concurrency=2)
    with pytest.raises(BudgetExceeded) as info:
        gw.chat_many_sync(reqs)
    assert "max_requests=5" in str(info.value) and "run again" in str(info.value)
    assert server.stats()["requests"] == 5
    # A new process (fresh in-process ledger) counts what the journal says was paid.
    limits_mod._local_ledgers.clear()
    again = make_gw(run_dir=run_dir, gw_kw={"budget": {"max_requests": 5}})
    with pytest.raises(BudgetExceeded):
        again.chat_many_sync(reqs)
    assert server.stats()["requests"] == 5
    limits_mod._local_ledgers.clear()
    raised = make_gw(run_dir=run_dir, gw_kw={"budget": {"max_requests": 8}})
    results = raised.chat_many_sync(reqs)
    assert all(r.ok for r in results) and sum(r.cached for r in results) == 5
    assert server.stats()["requests"] == 8  # each request paid once
    limits_mod._local_ledgers.clear()


def test_cost_budget_uses_prices(server, make_gw, tmp_path):
    # $1 per 1000 tokens; each request is estimated at prompt/3 + max_tokens(=10) tokens
    gw = make_gw(
        run_dir=str(tmp_path / "r"),
        price_input_per_mtok=1000.0,
        price_output_per_mtok=1000.0,
        max_concurrency=1,
        gw_kw={"budget": {"max_cost_usd": 0.06}},
    )
    reqs = [ChatRequest(messages=user(f"q{i}"), params={"max_tokens": 10}) for i in range(20)]
    with pytest.raises(BudgetExceeded, match="max_cost_usd"):
        gw.chat_many_sync(reqs)
    c = gw.counters()
    assert 0 < c["cost_usd"] <= 0.06
    assert c["cost_usd"] == pytest.approx(
        (c["prompt_tokens"] + c["completion_tokens"]) * 1000.0 / 1e6
    )
    limits_mod._local_ledgers.clear()


@pytest.mark.slow
def test_rpm_limit_holds_across_two_ray_workers(ray_session, server, tmp_path):
    ray = ray_session
    from rankmill.stage import StageContext

    rpm = 240.0  # 4 requests/s for the whole run
    ep = EndpointConfig(
        base_url=server.base_url, model="fake", requests_per_minute=rpm, max_concurrency=8
    )
    cfg = types.SimpleNamespace(run=RunConfig(), endpoints={"fake": ep})
    run_dir = str(tmp_path / "run")
    shared = limits_mod.ensure_run_services(cfg, run_dir, ray)
    assert limits_mod.LEDGER_KEY in shared
    ctx = StageContext(
        run_dir=run_dir,
        stage_name="calls",
        stage_type="calls",
        endpoints={"fake": ep.model_dump(mode="json")},
        shared=shared,
    )

    @ray.remote(num_cpus=0)
    class Caller:
        def run(self, ctx_json: str, tag: str, n: int) -> tuple[int, str]:
            from rankmill.llm import ChatRequest, Gateway
            from rankmill.stage import StageContext

            gw = Gateway.from_context(StageContext.from_json(ctx_json), "fake")
            rs = gw.chat_many_sync(
                [
                    ChatRequest(messages=[{"role": "user", "content": f"{tag} {i}"}])
                    for i in range(n)
                ]
            )
            kind = type(gw.limiter).__name__
            gw.close()
            return sum(r.ok for r in rs), kind

    workers = [Caller.remote() for _ in range(2)]
    out = ray.get([w.run.remote(ctx.to_json(), f"w{i}", 12) for i, w in enumerate(workers)])
    assert out == [(12, "RayLimiter"), (12, "RayLimiter")]
    t = sorted(a for a, _ in server.stats()["arrivals"])
    assert len(t) == 24
    # 24 requests at 4/s take >= 23 * 0.25 s; per-worker limits would allow 8/s (~2.9 s).
    assert t[-1] - t[0] >= 23 * 0.25 * 0.9
    for start in t:  # no 1 s window sees more than its share (+1 for the window's edge)
        assert sum(1 for x in t if start <= x < start + 1.0) <= 5


@pytest.mark.slow
def test_ray_ledger_is_called_per_block_and_holds_the_budget(ray_session, server, tmp_path):
    ray = ray_session
    from rankmill.stage import StageContext

    ep = EndpointConfig(
        base_url=server.base_url, model="fake", requests_per_minute=60000.0, max_concurrency=32
    )
    run_dir = str(tmp_path / "run")

    def ctx_for(budget: dict) -> StageContext:
        cfg = types.SimpleNamespace(run=RunConfig(budget=budget), endpoints={"fake": ep})
        shared = limits_mod.ensure_run_services(cfg, run_dir, ray)
        return StageContext(
            run_dir=run_dir,
            stage_name="calls",
            stage_type="calls",
            endpoints={"fake": ep.model_dump(mode="json")},
            shared=shared,
            budget=budget,
        )

    @ray.remote(num_cpus=0)
    class Caller:
        def run(self, ctx_json: str, tag: str, n: int) -> tuple[int, int, str]:
            from rankmill.llm import ChatRequest, Gateway
            from rankmill.stage import StageContext

            gw = Gateway.from_context(StageContext.from_json(ctx_json), "fake")
            reqs = [
                ChatRequest(messages=[{"role": "user", "content": f"{tag} {i}"}]) for i in range(n)
            ]
            try:
                rs = gw.chat_many_sync(reqs)
                outcome = "ok"
            except Exception as exc:  # the budget stop, raised in the worker
                rs, outcome = [], type(exc).__name__
            calls = gw.limiter.calls
            gw.close()
            return sum(r.ok for r in rs), calls, outcome

    # No budget to speak of: 300 requests cost a handful of ledger calls, not 300.
    ctx = ctx_for({"max_requests": 100000})
    ok, calls, outcome = ray.get(Caller.remote().run.remote(ctx.to_json(), "solo", 300))
    assert (ok, outcome) == (300, "ok")
    assert calls <= 300 // limits_mod.RayLimiter.MAX_BLOCK + 12
    # Two workers against 30 requests left: never crossed, however the blocks fall.
    server.reset()
    ctx = ctx_for({"max_requests": 330})
    workers = [Caller.remote() for _ in range(2)]
    out = ray.get([w.run.remote(ctx.to_json(), f"w{i}", 24) for i, w in enumerate(workers)])
    assert server.stats()["requests"] <= 30
    assert "BudgetExceeded" in {o for _, _, o in out}


@pytest.mark.slow
def test_runner_budget_stop_and_resume(ray_session, server, tmp_path):
    from rankmill.manifest import RunDir
    from rankmill.runner import Runner

    def cfg(max_requests: int):
        return validate_pipeline(
            {
                "run": {"name": "budget", "budget": {"max_requests": max_requests}},
                "endpoints": {
                    "fake": {"base_url": server.base_url, "model": "fake", "max_concurrency": 4}
                },
                "stages": {
                    "calls": {
                        "uses": "tests.fixtures.llm_stages:CallStage",
                        "endpoint": "fake",
                        "n_rows": 40,
                        "rows_per_unit": 10,
                    }
                },
            }
        )

    run_dir = str(tmp_path / "run")
    with pytest.raises(BudgetExceeded):
        Runner(cfg(25), run_dir).run()
    assert server.stats()["requests"] <= 25
    Runner(cfg(40), run_dir).run()
    assert server.stats()["requests"] == 40  # nothing paid twice
    rd = RunDir(run_dir)
    answers = rd.read_table("calls", "answers")
    assert sorted(answers.column("row_id").to_pylist()) == [f"row-{i:05d}" for i in range(40)]
    plan, recs = rd.stage_status("calls")
    assert sum(r.counters.llm_calls + r.counters.llm_cached for r in recs) == 40
    assert any(k.startswith("calls:") for r in recs for k in r.counters.extra)


def test_endpoint_concurrency_is_shared_by_a_stages_workers(tmp_path):
    from rankmill.llm import Gateway
    from rankmill.stage import StageContext

    ep = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrency": 8}
    # Rounded down: together the workers never exceed the endpoint's limit (the runner starts
    # at most max_concurrency workers for a stage).
    for workers, share in [(1, 8), (3, 2), (8, 1)]:
        ctx = StageContext(
            run_dir=str(tmp_path),
            stage_name="label",
            stage_type="label",
            endpoints={"e": ep},
            workers=workers,
        )
        gw = Gateway.from_context(ctx, "e")
        try:
            assert gw.endpoint.max_concurrency == share
            assert workers * share <= 8
        finally:
            gw.close()
