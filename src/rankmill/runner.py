"""Plans work units, skips committed ones, and runs the rest on Ray.

Use :class:`Runner` (the CLI does)::

    cfg = load_pipeline("pipelines/quickstart.yaml")
    Runner(cfg, "runs/quickstart").run()

For each stage in order the runner computes the stage's fingerprint (stage type, version,
params, prompt texts, upstream fingerprints, and the stage's own extra, e.g. input file
hashes), reads its inputs from committed upstream units, plans its work units, writes the
plan, and sends only the units without a matching commit record to a Ray Data actor pool.
Each unit commits itself on the actor (data first, record last), so a crash loses at most
the units in flight. Ray is started only when there is work to do: a finished run re-run
starts nothing.

Ray runs on loopback by default; ``ray_address`` (or ``RAY_ADDRESS``, or ``run.ray.address``)
connects to an existing cluster instead, whose nodes must share the run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rankmill.config import PipelineConfig, dump_pipeline
from rankmill.errors import BudgetExceeded, ManifestError, StageError, UnitFailed
from rankmill.manifest import Counters, RunDir, StagePlan, fingerprint, unit_fingerprint
from rankmill.stage import Stage, StageContext, UnitOutput, WorkUnit
from rankmill.stages import stage_class

log = logging.getLogger(__name__)

Event = Callable[..., None]

# Ray's switch for clusters of several machines; off, every node takes 127.0.0.1.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# -- unit (de)serialization ---------------------------------------------------------------------
def _table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def encode_unit(unit: WorkUnit, unit_fp: str) -> dict[str, Any]:
    return {
        "unit_id": unit.unit_id,
        "unit_fp": unit_fp,
        "meta": json.dumps(unit.meta, sort_keys=True),
        "tables": json.dumps({k: _table_to_bytes(v).hex() for k, v in unit.tables.items()}),
    }


def decode_unit(row: dict[str, Any], key: str = "") -> WorkUnit:
    tables = {k: _table_from_bytes(bytes.fromhex(v)) for k, v in json.loads(row["tables"]).items()}
    return WorkUnit(unit_id=row["unit_id"], key=key, tables=tables, meta=json.loads(row["meta"]))


def conform(stage: Stage, name: str, table: pa.Table) -> pa.Table:
    """Check a stage's output table against its declared schema and cast it to it."""
    schemas = stage.all_outputs()
    if name not in schemas:
        raise StageError(
            f"stage {stage.ctx.stage_name!r} wrote table {name!r} that it does not declare "
            f"(declared: {sorted(schemas)})"
        )
    schema = schemas[name]
    if table.schema.equals(schema):
        return table
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise StageError(
            f"stage {stage.ctx.stage_name!r} table {name!r}: columns do not match its schema "
            f"(missing {missing}, unexpected {extra})"
        )
    return table.select(schema.names).cast(schema)


def execute_unit(stage: Stage, rd: RunDir, unit: WorkUnit, unit_fp: str) -> Counters:
    """Process one unit and commit it. Used by the Ray actors, and directly in tests."""
    t0 = time.perf_counter()
    out: UnitOutput = stage.process(unit)
    if not isinstance(out, UnitOutput):
        raise StageError(f"stage {stage.ctx.stage_name!r}: process() must return UnitOutput")
    tables = {k: conform(stage, k, v) for k, v in out.tables.items()}
    tables.setdefault("rejects", stage.all_outputs()["rejects"].empty_table())
    counters = out.counters
    if not counters.rejects and tables["rejects"].num_rows:
        for reason in tables["rejects"].column("reason").to_pylist():
            counters.reject(reason)
    if not counters.rows_out:
        counters.rows_out = sum(t.num_rows for k, t in tables.items() if k != "rejects")
    if not counters.rows_in:
        counters.rows_in = sum(t.num_rows for t in unit.tables.values())
    counters.seconds = round(time.perf_counter() - t0, 4)
    rd.commit_unit(stage.ctx.stage_name, unit.unit_id, unit_fp, tables, counters)
    return counters


class UnitWorker:
    """A Ray Data actor: builds its stage once, then processes and commits units."""

    def __init__(
        self, stage_type: str, params_json: str, ctx_json: str, log_level: int = logging.WARNING
    ):
        # Workers log at the driver's level (Ray forwards their output to the driver).
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        # Some libraries set their own loggers to DEBUG on import; the handlers filter too.
        for handler in logging.getLogger().handlers:
            handler.setLevel(log_level)
        logging.getLogger("rankmill").setLevel(log_level)
        quiet = log_level > logging.INFO
        if quiet:
            # Model-loading progress bars, once per actor; read when the libraries load.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TQDM_DISABLE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        cls = stage_class(stage_type)
        params = cls.Params.model_validate_json(params_json)
        ctx = StageContext.from_json(ctx_json)
        self.stage: Stage = cls(params, ctx)
        self.rd = ctx.rundir()
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        results: dict[str, list[Any]] = {
            "unit_id": [],
            "ok": [],
            "error": [],
            "error_type": [],
            "counters": [],
        }
        for row in batch.to_pylist():
            unit = decode_unit(row)
            results["unit_id"].append(unit.unit_id)
            try:
                counters = execute_unit(self.stage, self.rd, unit, row["unit_fp"])
                results["ok"].append(True)
                results["error"].append("")
                results["error_type"].append("")
                results["counters"].append(json.dumps(counters.__dict__))
            except Exception as exc:  # a failed unit must not take the others down
                log.error("unit %s failed:\n%s", unit.unit_id, traceback.format_exc())
                results["ok"].append(False)
                results["error"].append(f"{type(exc).__name__}: {exc}")
                results["error_type"].append(type(exc).__name__)
                results["counters"].append("{}")
        return pa.table(results)


# -- the runner ---------------------------------------------------------------------------------
@dataclass
class StageOutcome:
    name: str
    units_total: int = 0
    units_skipped: int = 0
    units_run: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunResult:
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def units_run(self) -> int:
        return sum(s.units_run for s in self.stages)


class Runner:
    """Runs a pipeline's stages into a run directory, resuming from what is committed."""

    def __init__(
        self,
        cfg: PipelineConfig,
        run_dir: str,
        ray_address: str | None = None,
        on_event: Event | None = None,
    ):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS") or cfg.run.ray.address
        self.on_event = on_event or (lambda *a, **k: None)
        self._ray_started_here = False
        self._services: dict[str, Any] = {}  # endpoint name -> running local server
        self._endpoint_urls: dict[str, str] = {}
        self._shared: dict[str, Any] = {}

    # -- wiring and fingerprints -------------------------------------------------------------------
    def wiring(self) -> dict[str, dict[str, str]]:
        """For each stage: input table -> 'stage.table' of the stage that provides it."""
        produced: dict[str, str] = {}  # table -> latest stage providing it
        wiring: dict[str, dict[str, str]] = {}
        for name, params in self.cfg.stages.items():
            cls = stage_class(self.cfg.stage_type(name))
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

    def _context(self, name: str, refs: dict[str, str]) -> StageContext:
        endpoints = {}
        for ep_name, ep in self.cfg.endpoints.items():
            d = ep.model_dump(mode="json")
            if ep_name in self._endpoint_urls:
                d["base_url"] = self._endpoint_urls[ep_name]
            endpoints[ep_name] = d
        return StageContext(
            run_dir=self.rd.uri,
            stage_name=name,
            stage_type=self.cfg.stage_type(name),
            seed=self.cfg.run.seed,
            run_name=self.cfg.run.name,
            base_dir=self.cfg.base_dir,
            endpoints=endpoints,
            input_refs=refs,
            shared=dict(self._shared),
            budget=self.cfg.run.budget.model_dump(mode="json"),
            workers=self.cfg.stages[name].workers,
        )

    def fingerprints(self, wiring: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
        wiring = wiring or self.wiring()
        fps: dict[str, str] = {}
        for name, params in self.cfg.stages.items():
            cls = stage_class(self.cfg.stage_type(name))
            stage = cls(params, self._context(name, wiring[name]))
            upstream = {t: fps[ref.split(".", 1)[0]] + ":" + ref for t, ref in wiring[name].items()}
            # Worker placement and the like do not change outputs (wiring is in `upstream`).
            p = params.model_dump(mode="json", exclude=set(params.not_fingerprinted))
            fps[name] = fingerprint(
                cls.name or name,
                cls.version,
                p,
                stage.prompt_texts(),
                upstream,
                stage.fingerprint_extra(),
            )
        return fps

    # -- running ---------------------------------------------------------------------------------
    def run(self, until: str | None = None, only: str | None = None) -> RunResult:
        names = list(self.cfg.stages)
        for opt, val in (("--until", until), ("--only", only)):
            if val is not None and val not in names:
                raise StageError(f"{opt} {val}: no such stage (stages: {', '.join(names)})")
        wiring = self.wiring()
        fps = self.fingerprints(wiring)
        if only is not None:
            todo = [only]
            for ref in wiring[only].values():
                up = ref.split(".", 1)[0]
                if not self.rd.is_complete(up, fps[up]):
                    raise StageError(
                        f"--only {only}: its input stage {up!r} is not complete with the current "
                        f"config; run without --only (or with --until {up}) first"
                    )
        else:
            todo = names[: names.index(until) + 1] if until else names
        self.rd.mkdirs(self.rd.root)
        self.rd.write_pipeline(dump_pipeline(self.cfg) | {"fingerprints": fps})
        result = RunResult()
        try:
            for name in todo:
                outcome = self._run_stage(name, wiring[name], fps[name])
                result.stages.append(outcome)
                if outcome.failures:
                    budget = {k: v for k, v in outcome.failures.items() if "BudgetExceeded" in v}
                    if budget:
                        raise BudgetExceeded(
                            f"stage {name!r} stopped at the run's budget "
                            f"({next(iter(budget.values()))}); committed work is kept. Raise "
                            "run.budget.max_cost_usd / max_requests and run again to resume."
                        )
                    raise UnitFailed(name, outcome.failures)
        finally:
            self.close()
        return result

    def _run_stage(self, name: str, refs: dict[str, str], stage_fp: str) -> StageOutcome:
        t0 = time.perf_counter()
        params = self.cfg.stages[name]
        cls = stage_class(self.cfg.stage_type(name))
        outcome = StageOutcome(name)
        # Skip planning entirely when the stage finished with this fingerprint.
        plan = self.rd.read_plan(name)
        if plan is not None and plan.fingerprint == stage_fp and self.rd.is_complete(name):
            outcome.units_total = outcome.units_skipped = len(plan.units)
            self.on_event("stage_skipped", stage=name, units=len(plan.units))
            return outcome
        inputs = {}
        for table, ref in refs.items():
            src, tname = ref.split(".", 1)
            schema = {**cls.inputs, **cls.optional_inputs}[table]
            try:
                inputs[table] = self.rd.read_table(src, tname)
            except ManifestError as exc:
                raise StageError(f"stage {name!r} cannot read its input {table!r}: {exc}") from exc
            missing = [f.name for f in schema if f.name not in inputs[table].column_names]
            if missing:
                raise StageError(
                    f"stage {name!r}: input {table!r} from {ref} lacks columns {missing}"
                )
        stage = cls(params, self._context(name, refs))
        units = stage.plan(inputs)
        ids = [u.unit_id for u in units]
        if len(set(ids)) != len(ids):
            raise StageError(f"stage {name!r} planned duplicate unit ids")
        unit_fps = [unit_fingerprint(stage_fp, u.key) for u in units]
        self.rd.write_plan(
            StagePlan(
                stage=name,
                stage_type=self.cfg.stage_type(name),
                fingerprint=stage_fp,
                units=list(zip(ids, unit_fps, strict=False)),
                outputs=sorted(cls.all_outputs()),
                upstream=refs,
            )
        )
        pending = [
            (u, fp)
            for u, fp in zip(units, unit_fps, strict=False)
            if not self.rd.committed(name, u.unit_id, fp)
        ]
        outcome.units_total = len(units)
        outcome.units_skipped = len(units) - len(pending)
        self.on_event("stage_start", stage=name, total=len(units), done=outcome.units_skipped)
        if pending:
            self._start_services(stage)
            stage.ctx = self._context(name, refs)  # now with local endpoint URLs
            outcome.failures = self._run_units(stage, params, pending)
            outcome.units_run = len(pending) - len(outcome.failures)
        outcome.seconds = time.perf_counter() - t0
        self.rd.write_atomic(
            self.rd.path("stages", name, "last_run.json"),
            json.dumps(
                {
                    "fingerprint": stage_fp,
                    "wall_seconds": round(outcome.seconds, 3),
                    "units_run": outcome.units_run,
                    "units_skipped": outcome.units_skipped,
                    "failures": outcome.failures,
                    "finished_at": time.time(),
                }
            ).encode(),
        )
        self.on_event("stage_end", stage=name, failures=len(outcome.failures))
        return outcome

    def _run_units(
        self, stage: Stage, params: Any, pending: list[tuple[WorkUnit, str]]
    ) -> dict[str, str]:
        ray = self._ray()
        from ray.data import ActorPoolStrategy

        ctx = stage.ctx
        rows = [encode_unit(u, fp) for u, fp in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        size = max(1, min(params.workers, len(rows)))
        ds = ds.map_batches(
            UnitWorker,
            fn_constructor_kwargs={
                "stage_type": ctx.stage_type,
                "params_json": params.model_dump_json(),
                "ctx_json": ctx.to_json(),
                "log_level": logging.getLogger("rankmill").getEffectiveLevel(),
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=size),
            num_cpus=params.worker_cpus,
            num_gpus=params.worker_gpus or None,
        )
        if not log.isEnabledFor(logging.INFO):
            # Ray Data reports every dataset it runs (its logging is set up on first use, so
            # this goes after the dataset exists); the CLI shows its own progress.
            for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
                logging.getLogger(name).setLevel(logging.ERROR)
        failures: dict[str, str] = {}
        try:
            for batch in ds.iter_batches(batch_size=1, batch_format="pyarrow"):
                for r in batch.to_pylist():
                    if not r["ok"]:
                        failures[r["unit_id"]] = r["error"]
                    self.on_event(
                        "unit_done",
                        stage=ctx.stage_name,
                        unit_id=r["unit_id"],
                        ok=r["ok"],
                        error=r["error"],
                    )
        except Exception as exc:
            raise StageError(
                f"stage {ctx.stage_name!r} could not run on Ray: {type(exc).__name__}: "
                f"{_short(str(exc))}. Committed units are kept; fix the cause and run again."
            ) from exc
        return dict(sorted(failures.items()))

    # -- services ------------------------------------------------------------------------------
    def _ray(self) -> Any:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        if not self.ray_address:
            # A private Ray binds to loopback, not the machine's address: nothing of it is
            # reachable from the network. Read when ray is first imported.
            os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "logging_level": logging.WARNING,
                "configure_logging": True,
                # Plug-in stages named 'module:Class' must import on the workers too.
                "runtime_env": {"env_vars": {"PYTHONPATH": _pythonpath()}},
            }
            if self.ray_address:
                ray.init(address=self.ray_address, **kwargs)
            else:
                ray_cfg = self.cfg.run.ray
                if ray_cfg.num_cpus:
                    kwargs["num_cpus"] = ray_cfg.num_cpus
                if ray_cfg.object_store_memory_mb:
                    kwargs["object_store_memory"] = ray_cfg.object_store_memory_mb * 2**20
                ray.init(address="local", **kwargs)
            self._ray_started_here = True
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
        return ray

    def _start_services(self, stage: Stage) -> None:
        for ep_name in stage.endpoints_used():
            ep = self.cfg.endpoints.get(ep_name)
            if ep is None or not ep.local or ep_name in self._services:
                continue
            from rankmill.llm.local import start_local_server

            self.on_event("service_start", name=ep_name)
            server = start_local_server(ep, log_dir=self.rd.path("logs"))
            self._services[ep_name] = server
            self._endpoint_urls[ep_name] = server.base_url
        if stage.endpoints_used():
            # Run-wide LLM rate limits and budget live in one named Ray actor per run.
            from rankmill.llm.limits import ensure_run_services

            self._shared.update(ensure_run_services(self.cfg, self.rd.uri, self._ray()))

    def close(self) -> None:
        for name, server in list(self._services.items()):
            with contextlib.suppress(Exception):
                server.stop()
            self._services.pop(name, None)
        self._endpoint_urls.clear()
        if self._ray_started_here:
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
            self._ray_started_here = False


def _pythonpath() -> str:
    """The working directory and PYTHONPATH of the driver, for the workers: plug-in stages
    named 'module:Class' must import there too. Installed packages come from each node's own
    environment."""
    parts = [os.getcwd()]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        parts = existing.split(os.pathsep) + parts
    seen: list[str] = []
    for p in parts:
        if p and p not in seen:
            seen.append(p)
    return os.pathsep.join(seen)


def _short(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."
