"""Loading a pipeline file, and resolving it once into the stages a run executes.

::

    cfg = load_pipeline("pipelines/quickstart.yaml", ["stages.mine.num_negatives=8"])
    for rs in resolve(cfg):          # ResolvedStage: class, params, wiring, prompts, endpoints
        ...

:func:`resolve` is the one place that walks a pipeline: it finds each stage's class, wires its
inputs to earlier stages' outputs, reads its prompt texts, and computes the part of its
fingerprint that the config determines (:attr:`ResolvedStage.config_fp`). The runner, and
``rankmill status`` through the records it wrote, share it; a stage's full fingerprint adds its
upstream stages' committed content (:func:`stage_fingerprint`).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rankmill.config import (
    EndpointConfig,
    PipelineConfig,
    StageParams,
    _format_errors,
    parse_override,
    set_dotted,
)
from rankmill.errors import ConfigError, StageError
from rankmill.hashing import file_sha256, stable_hash
from rankmill.manifest import fingerprint
from rankmill.stage import Stage, StageContext
from rankmill.stages import stage_class


# -- loading -------------------------------------------------------------------------------------
def validate_pipeline(raw: dict[str, Any], base_dir: str = ".") -> PipelineConfig:
    """Validate a raw mapping into a :class:`PipelineConfig`, stage params included."""
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline file must be a YAML mapping with run, endpoints, stages")
    raw = copy.deepcopy(raw)
    raw.setdefault("base_dir", base_dir)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError("stages: a pipeline needs a non-empty mapping of stage name -> params")
    stages: dict[str, StageParams] = {}
    errors: list[str] = []
    for name, params in stages_raw.items():
        params = {} if params is None else params
        if not isinstance(params, dict):
            errors.append(f"  stages.{name}: expected a mapping of params, got {params!r}")
            continue
        kind = params.get("uses") or name
        try:
            cls = stage_class(kind)
        except KeyError as exc:
            errors.append(f"  stages.{name}: {exc.args[0]}")
            continue
        try:
            stages[name] = cls.Params.model_validate(params)
        except ValidationError as exc:
            errors.append(_format_errors(exc, f"stages.{name}"))
    rest = {k: v for k, v in raw.items() if k != "stages"}
    try:
        cfg = PipelineConfig.model_validate({**rest, "stages": {}})
    except ValidationError as exc:
        errors.append(_format_errors(exc))
        cfg = None
    if errors:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(errors))
    assert cfg is not None
    # Assign after validation so each stage keeps its own Params subclass.
    object.__setattr__(cfg, "stages", stages)
    _check_references(cfg)
    return cfg


def _check_references(cfg: PipelineConfig) -> None:
    errors = []
    for name, params in cfg.stages.items():
        endpoint = getattr(params, "endpoint", None)
        if isinstance(endpoint, str) and endpoint not in cfg.endpoints:
            errors.append(
                f"  stages.{name}.endpoint: no endpoint named {endpoint!r} "
                f"(endpoints: {', '.join(cfg.endpoints) or 'none'})"
            )
        for ep_list_name in ("endpoints", "judges"):
            eps = getattr(params, ep_list_name, None)
            if isinstance(eps, list):
                for i, ep in enumerate(eps):
                    ep_name = ep if isinstance(ep, str) else getattr(ep, "endpoint", None)
                    if isinstance(ep_name, str) and ep_name not in cfg.endpoints:
                        errors.append(
                            f"  stages.{name}.{ep_list_name}.{i}: no endpoint named {ep_name!r}"
                        )
    if errors:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(errors))


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML, apply ``--set`` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline file must be a YAML mapping")
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    base_dir = str(path.resolve().parent)
    return validate_pipeline(raw, base_dir=base_dir)


def dump_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as plain data (stage params with their own models)."""
    out = cfg.model_dump(mode="json", exclude={"stages"})
    out["stages"] = {n: p.model_dump(mode="json") for n, p in cfg.stages.items()}
    return out


# -- endpoint identity -------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _model_file_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def endpoint_answer_identity(ep: EndpointConfig) -> dict[str, Any]:
    """The settings of an endpoint that can change its answers (not its limits, prices or
    timeouts): model, address, default sampling and, for a local server, the model file's
    hash and context size. The API key is never part of it."""
    ident: dict[str, Any] = {"model": ep.model, "sampling": ep.sampling}
    if ep.local:
        path = ep.model_path
        if path is None:
            try:
                from rankmill.llm.local import default_model_path

                path = default_model_path()
            except Exception:  # not installed: the run will say so when it starts the server
                path = None
        if path and os.path.isfile(path):
            st = os.stat(path)
            ident["model_file"] = _model_file_hash(
                os.path.abspath(path), st.st_size, st.st_mtime_ns
            )
        else:
            ident["model_file"] = path
        ident["n_ctx"] = ep.n_ctx
    else:
        ident["base_url"] = (ep.base_url or "").rstrip("/")
    return ident


# -- resolution --------------------------------------------------------------------------------
@dataclass
class ResolvedStage:
    """One stage of a pipeline, resolved: what the runner plans, runs and fingerprints."""

    name: str
    cls: type[Stage]
    params: StageParams
    refs: dict[str, str]  # input table -> "stage.table"
    prompts: dict[str, str]  # template name -> text, read once on the driver
    endpoints: list[str]
    config_fp: str  # everything but the upstream content
    upstream_stages: list[str] = field(default_factory=list)

    @property
    def stage_type(self) -> str:
        return self.params.uses or self.name


def _wire(cfg: PipelineConfig) -> dict[str, dict[str, str]]:
    produced: dict[str, str] = {}  # table -> latest stage providing it
    wiring: dict[str, dict[str, str]] = {}
    for name, params in cfg.stages.items():
        cls = stage_class(cfg.stage_type(name))
        refs: dict[str, str] = {}
        for table in list(cls.inputs) + list(cls.optional_inputs):
            if table in params.inputs:
                ref = params.inputs[table]
                src, _, tname = ref.partition(".")
                if src not in wiring or not tname:
                    raise StageError(
                        f"stages.{name}.inputs.{table}: {ref!r} must name an earlier stage's "
                        "table as 'stage.table'"
                    )
                refs[table] = ref
            elif table in produced:
                refs[table] = f"{produced[table]}.{table}"
            elif table in cls.inputs:
                raise StageError(
                    f"stage {name!r} needs a {table!r} table but no earlier stage writes one; "
                    f"add a stage that does before it, or set stages.{name}.inputs.{table}"
                )
        unknown = set(params.inputs) - set(cls.inputs) - set(cls.optional_inputs)
        if unknown:
            raise StageError(
                f"stages.{name}.inputs: {sorted(unknown)} are not inputs of this stage "
                f"(it reads {sorted(list(cls.inputs) + list(cls.optional_inputs))})"
            )
        wiring[name] = refs
        for table in cls.all_outputs():
            if table != "rejects":
                produced[table] = name
    return wiring


def base_context(
    cfg: PipelineConfig, name: str, refs: dict[str, str], run_dir: str = "."
) -> StageContext:
    return StageContext(
        run_dir=run_dir,
        stage_name=name,
        stage_type=cfg.stage_type(name),
        seed=cfg.run.seed,
        run_name=cfg.run.name,
        base_dir=cfg.base_dir,
        endpoints={n: ep.model_dump(mode="json") for n, ep in cfg.endpoints.items()},
        input_refs=dict(refs),
        budget=cfg.run.budget.model_dump(mode="json"),
        workers=cfg.stages[name].workers,
    )


def resolve(cfg: PipelineConfig) -> list[ResolvedStage]:
    """Resolve every stage once (see the module docstring)."""
    out = []
    for name, refs in _wire(cfg).items():
        params = cfg.stages[name]
        cls = stage_class(cfg.stage_type(name))
        stage = cls(params, base_context(cfg, name, refs))
        prompts = stage.prompt_texts()
        endpoints = stage.endpoints_used()
        p = params.model_dump(mode="json", exclude=set(params.not_fingerprinted))
        config_fp = fingerprint(
            cls.name or cfg.stage_type(name),
            cls.version,
            p,
            prompts,
            {t: ref for t, ref in sorted(refs.items())},
            stage.fingerprint_extra(),
            seed=cfg.run.seed,
            endpoints={
                e: endpoint_answer_identity(cfg.endpoints[e])
                for e in endpoints
                if e in cfg.endpoints
            },
        )
        upstream = sorted({ref.split(".", 1)[0] for ref in refs.values()})
        out.append(ResolvedStage(name, cls, params, refs, prompts, endpoints, config_fp, upstream))
    return out


def stage_fingerprint(rs: ResolvedStage, upstream_digests: dict[str, str]) -> str:
    """A stage's full fingerprint: its config part and its upstream stages' content."""
    return stable_hash({"config": rs.config_fp, "upstream": upstream_digests})
