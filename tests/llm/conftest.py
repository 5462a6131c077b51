"""Fixtures of the gateway tests: one fake OpenAI server per module, reset before each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rankmill.config import EndpointConfig
from rankmill.llm import Gateway
from tests.fixtures.openai_server import FakeOpenAIServer, Script


@pytest.fixture(scope="module")
def _module_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture()
def server(_module_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The module's fake server with a fresh script and empty stats."""
    _module_server.state.script = Script()
    _module_server.state.rng.seed(0)
    _module_server.reset()
    return _module_server


@pytest.fixture()
def make_gw(server: FakeOpenAIServer, tmp_path) -> Iterator[Callable[..., Gateway]]:
    """Build gateways on the fake server and a per-test run dir; closed at the end."""
    built: list[Gateway] = []

    def make(run_dir: str | None = None, gw_kw: dict[str, Any] | None = None, **ep_kw: Any):
        ep = {
            "base_url": server.base_url,
            "model": "fake",
            "max_concurrency": 16,
            "timeout_s": 2.0,
            "max_attempts": 5,
            "max_retry_time_s": 30.0,
            **ep_kw,
        }
        kw = {"backoff_base_s": 0.01, "backoff_max_s": 0.2, **(gw_kw or {})}
        gw = Gateway(EndpointConfig(**ep), run_dir=run_dir or str(tmp_path / "run"), **kw)
        built.append(gw)
        return gw

    yield make
    for gw in built:
        gw.close()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
