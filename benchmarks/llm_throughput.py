"""Throughput and client CPU of the LLM gateway against a slow endpoint, like with like.

Claim: against an endpoint that answers in 1 s, the gateway keeps it as busy as its
concurrency allows (requests/s at least 0.9 of concurrency/latency at concurrency 128 on a
2-core machine) with its run-wide rate ledger on (a Ray actor, as in a pipeline run) and its
journal on disk, and costs at most 1.5x the client CPU per request of the same HTTP stack
without journal, retries or ledger; an answer from the journal costs a small fraction of a
request.

Side by side, in one run, at each concurrency level:

- ``gateway``: :class:`rankmill.llm.Gateway`, ``requests_per_minute`` set (10x what the level
  can reach, so it paces nothing but every request goes through the ledger), the journal on
  disk under ``--run-root`` (default: a folder in the current directory, not a tmpfs);
- ``same stack``: the gateway's own HTTP path without it: the ``openai`` client on the same
  transport (aiohttp when installed), raw-response POSTs, a semaphore;
- ``openai``: the stock ``openai`` client as a user would write it (``chat.completions.create``
  on its default httpx transport);
- ``journal hits``: the gateway's requests again from a new gateway on the same run dir, all
  answered from the journal (CPU per hit).

The fake OpenAI server (tests/fixtures/openai_server.py) runs as a separate process, so its
CPU is not the client's. Client CPU is this process's CPU time (all threads, the journal's
commit thread included) over the timed batch, divided by the requests; the ledger actor's
own CPU (another process) is not in it, its calls are counted.

    python benchmarks/llm_throughput.py [--latency 1.0] [--waves 6] [--levels 32,128,512]
        [--ledger ray|local] [--run-root DIR]

Prints a table, then ``summary: ratio_c32=… ratio_c128=… ratio_c512=… cpu_ms_per_request=…
cpu_ratio_vs_same_stack=… cpu_ratio_vs_openai=… cpu_ms_per_hit=… ledger_calls_per_request=…``
(CPU figures at concurrency 128).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import httpx2  # noqa: E402
import openai  # noqa: E402

from rankmill.config import EndpointConfig, RunConfig  # noqa: E402
from rankmill.llm import ChatRequest, Gateway  # noqa: E402
from rankmill.llm import limits as limits_mod  # noqa: E402
from tests.fixtures.openai_server import spawn_server  # noqa: E402

PARAMS = {"temperature": 0.7, "max_tokens": 16}


def _messages(tag: str, i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You judge whether a document answers a query."},
        {
            "role": "user",
            "content": f"Query: item {tag}-{i}\nDocument: text of document {i}.\nAnswer yes or no.",
        },
    ]


def _fs_type(path: str) -> str:
    """The file system type of ``path`` (from /proc/mounts; '?' elsewhere)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if path.startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def _endpoint(base_url: str, c: int, rpm: float) -> EndpointConfig:
    return EndpointConfig(
        base_url=base_url,
        model="fake",
        max_concurrency=c,
        timeout_s=60,
        sampling=PARAMS,
        requests_per_minute=rpm,
    )


async def run_gateway(
    ep: EndpointConfig, n: int, tag: str, run_dir: str, shared: dict
) -> tuple[float, float, int, int]:
    """(wall s, CPU s, journal hits, ledger calls) of one batch through a new gateway."""
    gw = Gateway(ep, run_dir=run_dir, name="bench", shared=shared)
    reqs = [ChatRequest(messages=_messages(tag, i)) for i in range(n)]
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await gw.chat_many(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(r.ok for r in results), "the benchmark server must not fault"
    calls = getattr(gw.limiter, "calls", 0)
    await gw.aclose()
    return wall, cpu, sum(r.cached for r in results), calls


async def run_same_stack(base_url: str, c: int, n: int, tag: str) -> tuple[float, float]:
    """The gateway's HTTP path alone: same client, transport, pool and raw POST."""
    limits = httpx2.Limits(max_connections=c + 8, max_keepalive_connections=c + 8)
    timeout = httpx2.Timeout(60.0, connect=30.0)
    if importlib.util.find_spec("aiohttp"):
        http = openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    else:
        http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, timeout=60, http_client=http
    )
    sem = asyncio.Semaphore(c)

    async def one(i: int) -> bytes:
        async with sem:
            resp = await client.post(
                "/chat/completions",
                body={"model": "fake", "messages": _messages(tag, i), "seed": i, **PARAMS},
                cast_to=httpx2.Response,
            )
            return resp.content

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(out)
    await client.close()
    return wall, cpu


async def run_openai(base_url: str, c: int, n: int, tag: str) -> tuple[float, float]:
    """The stock openai client as a user would write it."""
    http = openai.DefaultAsyncHttpxClient(
        limits=httpx2.Limits(max_connections=c + 8, max_keepalive_connections=c + 8)
    )
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, timeout=60, http_client=http
    )
    sem = asyncio.Semaphore(c)

    async def one(i: int) -> str | None:
        async with sem:
            r = await client.chat.completions.create(
                model="fake",
                messages=_messages(tag, i),  # type: ignore[arg-type]
                seed=i,
                **PARAMS,  # type: ignore[arg-type]
            )
            return r.choices[0].message.content

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(out)
    await client.close()
    return wall, cpu


def _ledger(kind: str, run_dir: str, ep: EndpointConfig) -> dict:
    """The run-wide ledger the gateway reserves with: the Ray actor a pipeline uses, or the
    in-process one."""
    if kind != "ray":
        return {}
    import ray

    cfg = types.SimpleNamespace(run=RunConfig(), endpoints={"bench": ep})
    return limits_mod.ensure_run_services(cfg, run_dir, ray)


def main() -> None:
    ap = argparse.ArgumentParser(description="LLM gateway throughput and CPU per request")
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--waves", type=int, default=6, help="requests = waves x concurrency")
    ap.add_argument("--levels", default="32,128,512")
    ap.add_argument("--ledger", choices=["ray", "local"], default="ray")
    ap.add_argument("--run-root", default=None, help="where the journals go (default: ./)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    os.makedirs(args.run_root or os.getcwd(), exist_ok=True)
    root = tempfile.mkdtemp(prefix=".bench-llm-", dir=args.run_root or os.getcwd())
    if args.ledger == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        ray.init(address="local", include_dashboard=False, num_cpus=2, logging_level="ERROR")
    srv = spawn_server(cwd=str(REPO), latency_s=args.latency, record_arrivals=False)
    rows = []
    try:
        # Warm every client up (imports, first connections) outside the timed runs.
        warm = _endpoint(srv.base_url, 8, 600000.0)
        warm_dir = os.path.join(root, "warm")
        asyncio.run(run_gateway(warm, 8, "warm", warm_dir, _ledger(args.ledger, warm_dir, warm)))
        asyncio.run(run_same_stack(srv.base_url, 8, 8, "warm"))
        asyncio.run(run_openai(srv.base_url, 8, 8, "warm"))
        for c in levels:
            n = c * args.waves
            limit = c / args.latency
            ep = _endpoint(srv.base_url, c, 10 * limit * 60)
            run_dir = os.path.join(root, f"run{c}")
            shared = _ledger(args.ledger, run_dir, ep)
            gw_wall, gw_cpu, _, calls = asyncio.run(run_gateway(ep, n, f"g{c}", run_dir, shared))
            hit_wall, hit_cpu, hits, _ = asyncio.run(run_gateway(ep, n, f"g{c}", run_dir, shared))
            assert hits == n, f"{hits} of {n} answers came from the journal"
            same_wall, same_cpu = asyncio.run(run_same_stack(srv.base_url, c, n, f"s{c}"))
            oa_wall, oa_cpu = asyncio.run(run_openai(srv.base_url, c, n, f"o{c}"))
            rows.append(
                {
                    "c": c,
                    "n": n,
                    "limit": limit,
                    "gw_ratio": n / gw_wall / limit,
                    "gw_cpu_ms": 1000 * gw_cpu / n,
                    "ledger_calls": calls / n,
                    "hit_cpu_ms": 1000 * hit_cpu / n,
                    "same_ratio": n / same_wall / limit,
                    "same_cpu_ms": 1000 * same_cpu / n,
                    "oa_ratio": n / oa_wall / limit,
                    "oa_cpu_ms": 1000 * oa_cpu / n,
                }
            )
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"latency {args.latency:g}s, {os.cpu_count()} CPUs, requests = {args.waves} x c, "
        f"ledger: {args.ledger}, journal on {_fs_type(os.path.abspath(root))} ({root})"
    )
    head = (
        "c",
        "requests",
        "limit r/s",
        "gw ratio",
        "gw cpu ms",
        "ledger calls/req",
        "hit cpu ms",
        "same-stack ratio",
        "same-stack cpu ms",
        "openai ratio",
        "openai cpu ms",
    )
    print(" | ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (
            r["c"],
            r["n"],
            f"{r['limit']:.1f}",
            f"{r['gw_ratio']:.3f}",
            f"{r['gw_cpu_ms']:.2f}",
            f"{r['ledger_calls']:.3f}",
            f"{r['hit_cpu_ms']:.3f}",
            f"{r['same_ratio']:.3f}",
            f"{r['same_cpu_ms']:.2f}",
            f"{r['oa_ratio']:.3f}",
            f"{r['oa_cpu_ms']:.2f}",
        )
        print(" | ".join(f"{str(x):>12}" for x in cells))
    by_c = {r["c"]: r for r in rows}
    ref = by_c.get(128) or rows[len(rows) // 2]
    parts = [f"ratio_c{c}={by_c[c]['gw_ratio']:.3f}" for c in levels]
    parts.append(f"cpu_ms_per_request={ref['gw_cpu_ms']:.2f}")
    parts.append(f"cpu_ratio_vs_same_stack={ref['gw_cpu_ms'] / ref['same_cpu_ms']:.2f}")
    parts.append(f"cpu_ratio_vs_openai={ref['gw_cpu_ms'] / ref['oa_cpu_ms']:.2f}")
    parts.append(f"cpu_ms_per_hit={ref['hit_cpu_ms']:.3f}")
    parts.append(f"ledger_calls_per_request={ref['ledger_calls']:.3f}")
    print("summary: " + " ".join(parts))


if __name__ == "__main__":
    main()
