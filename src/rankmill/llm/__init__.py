"""The gateway to OpenAI-compatible LLM endpoints: client, journal, limits, local server.

Stages use :class:`Gateway` (see :mod:`rankmill.llm.client`)::

    from rankmill.llm import ChatRequest, Gateway

    gw = Gateway.from_context(ctx, "teacher")
    results = gw.chat_many_sync([ChatRequest(messages=[{"role": "user", "content": "..."}])])

The runner calls :func:`rankmill.llm.limits.ensure_run_services` before a stage that uses an
endpoint, so rate limits and the budget hold run-wide across Ray workers.
"""

from __future__ import annotations

from typing import Any

# Imported lazily, so that `rankmill.llm.local` (used by the runner) does not load openai.
_EXPORTS = {
    "ChatRequest": "rankmill.llm.client",
    "ChatResult": "rankmill.llm.client",
    "Gateway": "rankmill.llm.client",
    "derive_seed": "rankmill.llm.client",
    "endpoint_identity": "rankmill.llm.client",
    "parse_completion": "rankmill.llm.client",
    "request_key": "rankmill.llm.client",
    "ensure_run_services": "rankmill.llm.limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rankmill.llm' has no attribute {name!r}")
