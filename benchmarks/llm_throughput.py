"""Throughput and client CPU of the LLM gateway against a slow endpoint.

Claim (issue 3): against an endpoint that answers in 1 s, the gateway keeps it as busy as its
concurrency allows — requests/s at least 0.9 of concurrency/latency at concurrency 128 on a
2-core machine — and costs at most 1.5x the client CPU per request of a bare ``openai``
AsyncOpenAI client doing the same requests, measured in the same run.

The fake OpenAI server (tests/fixtures/openai_server.py) runs as a separate process, so its
CPU is not counted as the client's. Client CPU is this process's CPU time (all threads,
journal fsync thread included) over the timed batch, divided by the requests.

    python benchmarks/llm_throughput.py [--latency 1.0] [--waves 6] [--levels 32,128,512]

Prints a table, then ``summary: ratio_c32=… ratio_c128=… ratio_c512=… cpu_ms_per_request=…
cpu_ratio_vs_openai=…`` (CPU figures at concurrency 128).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import httpx2  # noqa: E402
import openai  # noqa: E402

from rankmill.config import EndpointConfig  # noqa: E402
from rankmill.llm import ChatRequest, Gateway  # noqa: E402
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


async def run_gateway(base_url: str, c: int, n: int, tag: str, run_dir: str) -> tuple[float, float]:
    ep = EndpointConfig(
        base_url=base_url, model="fake", max_concurrency=c, timeout_s=60, sampling=PARAMS
    )
    gw = Gateway(ep, run_dir=run_dir, name="bench")
    reqs = [ChatRequest(messages=_messages(tag, i)) for i in range(n)]
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await gw.chat_many(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(r.ok for r in results), "the benchmark server must not fault"
    await gw.aclose()
    return wall, cpu


async def run_bare(base_url: str, c: int, n: int, tag: str) -> tuple[float, float]:
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
                messages=_messages(tag, i),
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


def main() -> None:
    ap = argparse.ArgumentParser(description="LLM gateway throughput and CPU per request")
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--waves", type=int, default=6, help="requests = waves x concurrency")
    ap.add_argument("--levels", default="32,128,512")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    srv = spawn_server(cwd=str(REPO), latency_s=args.latency, record_arrivals=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Warm both clients up (imports, first connections) outside the timed runs.
            asyncio.run(run_gateway(srv.base_url, 8, 8, "warm", os.path.join(tmp, "warm")))
            asyncio.run(run_bare(srv.base_url, 8, 8, "warm"))
            for c in levels:
                n = c * args.waves
                gw_wall, gw_cpu = asyncio.run(
                    run_gateway(srv.base_url, c, n, f"g{c}", os.path.join(tmp, f"run{c}"))
                )
                bare_wall, bare_cpu = asyncio.run(run_bare(srv.base_url, c, n, f"b{c}"))
                limit = c / args.latency
                rows.append(
                    {
                        "c": c,
                        "n": n,
                        "limit": limit,
                        "gw_rps": n / gw_wall,
                        "gw_ratio": n / gw_wall / limit,
                        "gw_cpu_ms": 1000 * gw_cpu / n,
                        "bare_rps": n / bare_wall,
                        "bare_ratio": n / bare_wall / limit,
                        "bare_cpu_ms": 1000 * bare_cpu / n,
                    }
                )
    finally:
        srv.stop()
    print(f"latency {args.latency:g}s, {os.cpu_count()} CPUs, requests = {args.waves} x c")
    head = (
        "c",
        "requests",
        "limit r/s",
        "gateway r/s",
        "ratio",
        "gw cpu ms/req",
        "openai r/s",
        "openai ratio",
        "openai cpu ms/req",
        "cpu ratio",
    )
    print(" | ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (
            r["c"],
            r["n"],
            f"{r['limit']:.1f}",
            f"{r['gw_rps']:.1f}",
            f"{r['gw_ratio']:.3f}",
            f"{r['gw_cpu_ms']:.2f}",
            f"{r['bare_rps']:.1f}",
            f"{r['bare_ratio']:.3f}",
            f"{r['bare_cpu_ms']:.2f}",
            f"{r['gw_cpu_ms'] / r['bare_cpu_ms']:.2f}",
        )
        print(" | ".join(f"{str(x):>12}" for x in cells))
    by_c = {r["c"]: r for r in rows}
    ref = by_c.get(128) or rows[len(rows) // 2]
    parts = [f"ratio_c{c}={by_c[c]['gw_ratio']:.3f}" for c in levels]
    parts.append(f"cpu_ms_per_request={ref['gw_cpu_ms']:.2f}")
    parts.append(f"cpu_ratio_vs_openai={ref['gw_cpu_ms'] / ref['bare_cpu_ms']:.2f}")
    print("summary: " + " ".join(parts))


if __name__ == "__main__":
    main()
