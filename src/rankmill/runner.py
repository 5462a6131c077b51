"""Plans work units, skips committed ones, and runs the rest on Ray.

Use :class:`Runner` (the CLI does)::

    cfg = load_pipeline("pipelines/quickstart.yaml")
    Runner(cfg, "runs/quickstart").run()

The runner takes the run directory's lock (:mod:`rankmill.lock`: one writer per run dir),
resolves the pipeline once (:func:`rankmill.pipeline.resolve`), and for each stage in order:
computes its fingerprint from its config part and the committed content of its upstream stages,
reads the inputs its ``plan`` needs through exactly those upstream plans, plans its work units,
writes the plan, and runs what is not committed under that fingerprint — the ``prepare`` step,
each phase's units, the ``aggregate`` steps between phases, the ``finalize`` step — on a pool of
Ray actors (:class:`StageActor`). Each unit commits itself on its actor (data first, record
last), so a crash loses at most the units in flight. Ray is started only when there is work:
a finished run re-run starts nothing.

Failures are told apart by type: a unit that raised is a unit failure (the others go on; the
stage stops after its phase with :class:`~rankmill.errors.UnitFailed`); an error whose class is
``fatal`` (a wrong key, a budget stop, ...) stops the stage at once, and its actors with it; a
committed file that fails its checksum (:class:`~rankmill.errors.CorruptData`) sends the
runner back to recompute that unit.

Ray runs on loopback by default; ``ray_address`` (or ``RAY_ADDRESS``, or ``run.ray.address``)
connects to an existing cluster instead, whose nodes must share the run directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rankmill.config import PipelineConfig
from rankmill.errors import (
    BudgetExceeded,
    CorruptData,
    JournalMiss,
    ManifestError,
    RankmillError,
    StageError,
    UnitFailed,
)
from rankmill.lock import RunLock, Watchdog, holds_lock
from rankmill.manifest import (
    Counters,
    RunDir,
    StagePlan,
    step_fingerprint,
    unit_fingerprint,
)
from rankmill.pipeline import (
    ResolvedStage,
    base_context,
    dump_pipeline,
    resolve,
    stage_fingerprint,
)
from rankmill.stage import (
    WORKER_ENV,
    Stage,
    StageContext,
    StepContext,
    StepOutput,
    UnitOutput,
    WorkUnit,
)
from rankmill.stages import stage_class

log = logging.getLogger(__name__)

Event = Callable[..., None]

# Ray's switch for clusters of several machines; off, every node takes 127.0.0.1.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
MAX_CORRUPT_RETRIES = 8


class Superseded(RankmillError):
    """This run no longer holds the run dir's lock: its unit must not commit."""

    fatal = True


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
    if not holds_lock(rd, stage.ctx.run_id):
        raise Superseded(
            f"stage {stage.ctx.stage_name!r} unit {unit.unit_id}: another run took over "
            f"{rd.uri}; this one stops without committing"
        )
    rd.commit_unit(
        stage.ctx.stage_name, unit.unit_id, unit_fp, tables, counters, run_id=stage.ctx.run_id
    )
    return counters


def execute_step(stage: Stage, rd: RunDir, step: str, step_fp: str, plan: StagePlan) -> Counters:
    """Run one stage-wide step and commit its output like a unit's."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"rankmill-{step}-") as work_dir:
        sctx = StepContext(ctx=stage.ctx, work_dir=work_dir, plan=plan)
        if step == "prepare":
            out = stage.prepare(sctx)
        elif step == "finalize":
            out = stage.finalize(sctx)
        elif step.startswith("aggregate-"):
            out = stage.aggregate(int(step.split("-", 1)[1]), sctx)
        else:
            raise StageError(f"unknown step {step!r}")
        out = out or StepOutput()
        if not isinstance(out, StepOutput):
            raise StageError(
                f"stage {stage.ctx.stage_name!r}: {step} must return a StepOutput or None"
            )
        tables = {}
        for k, v in out.tables.items():
            tables[k] = conform(stage, k, v) if k in stage.all_outputs() else v
        for name, path in out.files.items():
            if not os.path.isfile(path):
                raise StageError(
                    f"stage {stage.ctx.stage_name!r}: {step} names file {name!r} at {path}, "
                    "which does not exist"
                )
        counters = out.counters
        counters.seconds = round(time.perf_counter() - t0, 4)
        if not holds_lock(rd, stage.ctx.run_id):
            raise Superseded(f"stage {stage.ctx.stage_name!r} {step}: another run took over")
        rd.commit_unit(
            stage.ctx.stage_name,
            f"step:{step}",
            step_fp,
            tables,
            counters,
            files=out.files,
            step=True,
            run_id=stage.ctx.run_id,
        )
    return counters


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (its type decides what the runner
    does), else a StageError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return StageError(f"{type(exc).__name__}: {exc}")


class StageActor:
    """A Ray actor: builds its stage once (on first use), then processes and commits units
    and runs stage-wide steps. Exits by itself when its run has gone (:class:`Watchdog`)."""

    def __init__(
        self, stage_type: str, params_json: str, ctx_json: str, log_level: int = logging.WARNING
    ):
        os.environ[WORKER_ENV] = "1"
        # Workers log at the driver's level (Ray forwards their output to the driver).
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        for handler in logging.getLogger().handlers:
            handler.setLevel(log_level)
        logging.getLogger("rankmill").setLevel(log_level)
        if log_level > logging.INFO:
            # Model-loading progress bars, once per actor; read when the libraries load.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TQDM_DISABLE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        cls = stage_class(stage_type)
        params = cls.Params.model_validate_json(params_json)
        ctx = StageContext.from_json(ctx_json)
        self.stage: Stage = cls(params, ctx)
        self.rd = ctx.rundir()
        self._setup_lock = threading.Lock()
        self._ready = False
        self._watchdog = Watchdog(self.rd, ctx.run_id, on_gone=self._gone).start()

    @staticmethod
    def _gone(why: str) -> None:
        log.warning("worker exits: %s", why)
        os._exit(1)

    def ping(self) -> bool:
        return True

    def _ensure_setup(self) -> None:
        with self._setup_lock:
            if not self._ready:
                self.stage.setup()
                self._ready = True

    def process(self, unit: WorkUnit, unit_fp: str) -> dict[str, Any]:
        try:
            self._ensure_setup()
            counters = execute_unit(self.stage, self.rd, unit, unit_fp)
            return {"ok": True, "counters": counters.__dict__}
        except Exception as exc:  # a failed unit must not take the others down
            if not getattr(exc, "fatal", False):
                log.error("unit %s failed:\n%s", unit.unit_id, traceback.format_exc())
            return {"ok": False, "exc": _portable(exc)}

    def run_step(self, step: str, step_fp: str, plan_json: str) -> dict[str, Any]:
        try:
            counters = execute_step(
                self.stage, self.rd, step, step_fp, StagePlan.from_json(plan_json)
            )
            return {"ok": True, "counters": counters.__dict__}
        except Exception as exc:
            if not getattr(exc, "fatal", False):
                log.error("step %s failed:\n%s", step, traceback.format_exc())
            return {"ok": False, "exc": _portable(exc)}

    def teardown(self) -> None:
        if self._ready:
            self.stage.teardown()
            self._ready = False
        self._watchdog.stop()


# -- the runner ---------------------------------------------------------------------------------
@dataclass
class StageOutcome:
    name: str
    units_total: int = 0
    units_skipped: int = 0
    units_run: int = 0
    units_replayed: int = 0  # of units_run: answered by the LLM journal in the driver
    steps_run: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunResult:
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def units_run(self) -> int:
        return sum(s.units_run for s in self.stages)

    @property
    def units_replayed(self) -> int:
        return sum(s.units_replayed for s in self.stages)


class _Restart(Exception):
    """Internal: a committed upstream unit failed its checksum; re-run from that stage."""

    def __init__(self, stage: str):
        self.stage = stage


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
        self._resolved: list[ResolvedStage] | None = None
        self._lock: RunLock | None = None
        self._actors: list[Any] = []
        # Set by the CLI: SIGTERM unwinds the run like Ctrl-C. Re-installed after Ray starts,
        # whose driver installs handlers of its own (one of them aborts the process).
        self.sigterm_handler: Any = None

    # -- resolution ------------------------------------------------------------------------------
    def resolved(self) -> list[ResolvedStage]:
        if self._resolved is None:
            self._resolved = resolve(self.cfg)
        return self._resolved

    def fingerprints(self) -> dict[str, str]:
        """Each stage's config fingerprint (its full fingerprint adds upstream content)."""
        return {rs.name: rs.config_fp for rs in self.resolved()}

    def _context(self, rs: ResolvedStage, upstream_fps: dict[str, str]) -> StageContext:
        ctx = base_context(self.cfg, rs.name, rs.refs, self.rd.uri)
        for ep_name, url in self._endpoint_urls.items():
            ctx.endpoints[ep_name]["base_url"] = url
        ctx.shared = dict(self._shared)
        ctx.prompts = dict(rs.prompts)
        ctx.run_id = self._lock.run_id if self._lock else ""
        ctx.upstream_fps = dict(upstream_fps)
        return ctx

    # -- running ---------------------------------------------------------------------------------
    def run(self, until: str | None = None, only: str | None = None) -> RunResult:
        names = list(self.cfg.stages)
        for opt, val in (("--until", until), ("--only", only)):
            if val is not None and val not in names:
                raise StageError(f"{opt} {val}: no such stage (stages: {', '.join(names)})")
        resolved = {rs.name: rs for rs in self.resolved()}
        if only is not None:
            todo = [only]
        else:
            todo = names[: names.index(until) + 1] if until else names
        result = RunResult()
        self._lock = RunLock(self.rd).acquire()
        try:
            fps: dict[str, str] = {}
            self._write_pipeline(fps)
            restarts = 0
            i = 0
            if only is not None:
                for up in resolved[only].upstream_stages:
                    plan = self._complete_plan(up)
                    if plan is None:
                        raise StageError(
                            f"--only {only}: its input stage {up!r} is not complete; run "
                            f"without --only (or with --until {up}) first"
                        )
            self._refuse_local_on_cluster([resolved[n] for n in todo])
            while i < len(todo):
                name = todo[i]
                try:
                    outcome = self._run_stage(resolved[name], fps)
                except _Restart as r:
                    restarts += 1
                    if restarts > MAX_CORRUPT_RETRIES or r.stage not in todo:
                        raise StageError(
                            f"stage {r.stage!r} keeps failing its checksums after recomputing; "
                            "check the storage of the run dir"
                        ) from None
                    i = todo.index(r.stage)
                    result.stages = [s for s in result.stages if s.name in todo[:i]]
                    continue
                result.stages.append(outcome)
                i += 1
        finally:
            self.close()
        return result

    def _write_pipeline(self, fps: dict[str, str]) -> None:
        old = {}
        with contextlib.suppress(ManifestError):
            old = (self.rd.read_pipeline() or {}).get("fingerprints", {})
        merged = {n: fps.get(n, old.get(n, "")) for n in self.cfg.stages}
        self.rd.write_pipeline(dump_pipeline(self.cfg) | {"fingerprints": merged})

    def _complete_plan(self, stage: str) -> StagePlan | None:
        try:
            plan = self.rd.read_plan(stage)
        except ManifestError:
            return None
        if plan is None or not self.rd.is_complete(stage, plan.fingerprint):
            return None
        return plan

    def _upstream(self, rs: ResolvedStage) -> tuple[dict[str, StagePlan], dict[str, str]]:
        plans: dict[str, StagePlan] = {}
        digests: dict[str, str] = {}
        for up in rs.upstream_stages:
            plan = self._complete_plan(up)
            if plan is None:
                raise StageError(
                    f"stage {rs.name!r}: its input stage {up!r} is not complete; run the "
                    "pipeline without --only"
                )
            plans[up] = plan
            digests[up] = self.rd.content_digest(up, plan)
        return plans, digests

    def _read_plan_for_run(self, name: str) -> StagePlan | None:
        try:
            return self.rd.read_plan(name)
        except ManifestError as exc:
            log.warning("%s; re-planning the stage", exc)
            return None

    def _run_stage(self, rs: ResolvedStage, fps: dict[str, str]) -> StageOutcome:
        t0 = time.perf_counter()
        name = rs.name
        outcome = StageOutcome(name)
        up_plans, up_digests = self._upstream(rs)
        stage_fp = stage_fingerprint(rs, up_digests)
        plan = self._read_plan_for_run(name)
        if plan is not None and plan.fingerprint == stage_fp and self.rd.is_complete(name):
            try:
                self.rd.check_unchanged(name, plan)
            except CorruptData as exc:
                self._quarantine(exc)
                raise _Restart(name) from None
            fps[name] = stage_fp
            self._write_pipeline(fps)
            outcome.units_total = outcome.units_skipped = len(plan.units)
            self.on_event("stage_skipped", stage=name, units=len(plan.units))
            return outcome

        upstream_fps = {s: p.fingerprint for s, p in up_plans.items()}
        ctx = self._context(rs, upstream_fps)
        stage = rs.cls(rs.params, ctx)
        # Ray takes seconds to start (once per run): start it while the stage plans, unless
        # the journal may answer the whole stage here (replay_in_driver).
        replay = rs.cls.replay_in_driver and not self._ray_started_here
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rankmill-plan") as ex:
            planning = ex.submit(self._plan_units, rs, stage, up_plans)
            if not replay:
                self._ray()
            units = planning.result()
        ids = [u.unit_id for u in units]
        if len(set(ids)) != len(ids):
            raise StageError(f"stage {name!r} planned duplicate unit ids")
        unit_fps = [unit_fingerprint(stage_fp, u.key) for u in units]
        phases = sorted({u.phase for u in units}) or [0]
        step_names = rs.cls.step_names(phases)
        steps: list[tuple[str, str]] = []
        for step in step_names:
            if step == "prepare":
                before: list[str] = []
            elif step == "finalize":
                before = list(unit_fps)
            else:
                p = int(step.split("-", 1)[1])
                before = [fp for u, fp in zip(units, unit_fps, strict=True) if u.phase <= p]
            steps.append((step, step_fingerprint(stage_fp, step, before)))
        plan = StagePlan(
            stage=name,
            stage_type=rs.stage_type,
            fingerprint=stage_fp,
            units=list(zip(ids, unit_fps, strict=True)),
            outputs=sorted(rs.cls.all_outputs()),
            upstream=dict(rs.refs),
            phases=[u.phase for u in units] if len(phases) > 1 or phases != [0] else [],
            steps=steps,
            upstream_digests=up_digests,
        )
        self.rd.write_plan(plan)
        fps[name] = stage_fp
        self._write_pipeline(fps)
        ctx.steps = dict(steps)

        have = self.rd.committed_fps(name)
        have_steps = self.rd.committed_fps(name, step=True) if steps else set()
        pending = [(u, fp) for u, fp in zip(units, unit_fps, strict=True) if fp not in have]
        pending_steps = [(s, fp) for s, fp in steps if fp not in have_steps]
        outcome.units_total = len(units)
        outcome.units_skipped = len(units) - len(pending)
        self.on_event("stage_start", stage=name, total=len(units), done=outcome.units_skipped)
        if (pending or pending_steps) and replay:
            pending, pending_steps = self._replay(
                rs, plan, upstream_fps, pending, pending_steps, outcome
            )
        if pending or pending_steps:
            self._start_services(rs)
            ctx = self._context(rs, upstream_fps)
            ctx.steps = dict(steps)
            stage.ctx = ctx
            try:
                self._execute(rs, stage, plan, units, unit_fps, pending, pending_steps, outcome)
            finally:
                self._stop_actors()
        outcome.seconds = time.perf_counter() - t0
        self.rd.write_atomic(
            self.rd.path("stages", name, "last_run.json"),
            _json(
                {
                    "fingerprint": stage_fp,
                    "wall_seconds": round(outcome.seconds, 3),
                    "units_run": outcome.units_run,
                    "units_skipped": outcome.units_skipped,
                    "steps_run": outcome.steps_run,
                    "failures": outcome.failures,
                    "finished_at": time.time(),
                }
            ),
        )
        self.on_event("stage_end", stage=name, failures=len(outcome.failures))
        return outcome

    def _plan_units(
        self, rs: ResolvedStage, stage: Stage, up_plans: dict[str, StagePlan]
    ) -> list[WorkUnit]:
        wanted = stage.plan_inputs()
        schemas = {**rs.cls.inputs, **rs.cls.optional_inputs}
        inputs: dict[str, pa.Table] = {}
        for table, ref in rs.refs.items():
            if wanted is not None and table not in wanted:
                continue
            columns = wanted.get(table) if wanted is not None else None
            src, tname = ref.split(".", 1)
            try:
                inputs[table] = self.rd.read_table(src, tname, plan=up_plans[src], columns=columns)
            except CorruptData as exc:
                self._quarantine(exc)
                raise _Restart(exc.stage or src) from None
            except ManifestError as exc:
                raise StageError(
                    f"stage {rs.name!r} cannot read its input {table!r}: {exc}"
                ) from exc
            need = columns if columns is not None else [f.name for f in schemas[table]]
            missing = [c for c in need if c not in inputs[table].column_names]
            if missing:
                raise StageError(
                    f"stage {rs.name!r}: input {table!r} from {ref} lacks columns {missing}"
                )
        return stage.plan(inputs)

    def _quarantine(self, exc: CorruptData) -> None:
        fp = exc.unit_fp
        is_step = fp.startswith("step:")
        fp = fp.removeprefix("step:")
        log.warning("%s: recomputing it", exc)
        self.on_event("corrupt", stage=exc.stage, detail=str(exc))
        if exc.stage and fp:
            self.rd.quarantine(exc.stage, fp, step=is_step)

    # -- executing units and steps on actors ---------------------------------------------------
    def _execute(
        self,
        rs: ResolvedStage,
        stage: Stage,
        plan: StagePlan,
        units: list[WorkUnit],
        unit_fps: list[str],
        pending: list[tuple[WorkUnit, str]],
        pending_steps: list[tuple[str, str]],
        outcome: StageOutcome,
    ) -> None:
        ray = self._ray()
        params = rs.params
        ctx = stage.ctx
        in_flight = max(1, int(rs.cls.max_units_in_flight))
        pool_size = max(1, min(params.workers, len(pending) or 1))
        # An endpoint's concurrency is split over the stage's actors: never more actors than
        # the smallest endpoint allows in flight.
        limits = [self.cfg.endpoints[e].max_concurrency for e in rs.endpoints]
        if limits and pool_size > min(limits):
            log.warning(
                "stage %s: %d workers but its endpoint allows %d requests in flight; using %d",
                rs.name,
                pool_size,
                min(limits),
                min(limits),
            )
            pool_size = min(limits)
        ctx.workers = pool_size
        remote_opts: dict[str, Any] = {
            "num_cpus": params.worker_cpus,
            "num_gpus": params.worker_gpus or None,
        }
        if in_flight > 1:
            remote_opts["max_concurrency"] = in_flight
        actor_cls = ray.remote(StageActor).options(**remote_opts)
        ctor = (
            ctx.stage_type,
            params.model_dump_json(),
            ctx.to_json(),
            logging.getLogger("rankmill").getEffectiveLevel(),
        )
        self._actors = [actor_cls.remote(*ctor) for _ in range(pool_size)]
        plan_json = plan.to_json()
        pending_fps = {fp for _, fp in pending}
        step_fp = dict(pending_steps)

        def run_step(step: str) -> None:
            if step not in step_fp:
                return
            self.on_event("step_start", stage=rs.name, step=step)
            res = ray.get(self._actors[0].run_step.remote(step, step_fp[step], plan_json))
            if not res["ok"]:
                self._raise(rs.name, res["exc"], f"{step} step")
            outcome.steps_run += 1
            self.on_event("step_done", stage=rs.name, step=step)

        run_step("prepare")
        phases = sorted({u.phase for u in units}) or [0]
        for phase in phases:
            todo = [
                (u, fp)
                for u, fp in zip(units, unit_fps, strict=True)
                if u.phase == phase and fp in pending_fps
            ]
            self._run_units(rs, todo, in_flight, outcome)
            if outcome.failures:
                raise UnitFailed(rs.name, outcome.failures)
            if phase in rs.cls.aggregate_after:
                run_step(f"aggregate-{phase}")
        run_step("finalize")

    def _replay(
        self,
        rs: ResolvedStage,
        plan: StagePlan,
        upstream_fps: dict[str, str],
        pending: list[tuple[WorkUnit, str]],
        pending_steps: list[tuple[str, str]],
        outcome: StageOutcome,
    ) -> tuple[list[tuple[WorkUnit, str]], list[tuple[str, str]]]:
        """Run in this process, in plan order, what the LLM journal answers: the prepare step,
        then units until the first that needs a request the journal lacks (it raises before
        sending, and commits nothing), then the finalize step if every unit is done. Returns
        what is left for the actors."""
        if any(s.startswith("aggregate-") for s, _ in pending_steps):
            return pending, pending_steps
        ctx = self._context(rs, upstream_fps)
        ctx.steps = dict(plan.steps)
        ctx.journal_only = True
        stage = rs.cls(rs.params, ctx)
        steps = dict(pending_steps)
        done: set[str] = set()
        try:
            if "prepare" in steps:
                self.on_event("step_start", stage=rs.name, step="prepare")
                execute_step(stage, self.rd, "prepare", steps["prepare"], plan)
                outcome.steps_run += 1
                done.add("prepare")
                self.on_event("step_done", stage=rs.name, step="prepare")
            stage.setup()
            try:
                self._replay_units(rs, stage, pending, done, outcome)
                if "finalize" in steps and all(fp in done for _, fp in pending):
                    self.on_event("step_start", stage=rs.name, step="finalize")
                    execute_step(stage, self.rd, "finalize", steps["finalize"], plan)
                    outcome.steps_run += 1
                    done.add("finalize")
                    self.on_event("step_done", stage=rs.name, step="finalize")
            finally:
                stage.teardown()
        except Superseded:
            raise
        except CorruptData as exc:
            self._quarantine(exc)
            raise _Restart(exc.stage or rs.name) from None
        except Exception as exc:  # the actors run it again and report it properly
            log.debug("stage %s: replay here stopped: %s", rs.name, exc)
        if done:
            log.info("stage %s: %d units answered by the LLM journal here", rs.name, len(done))
        return (
            [(u, fp) for u, fp in pending if fp not in done],
            [(s, fp) for s, fp in pending_steps if s not in done],
        )

    def _replay_units(
        self,
        rs: ResolvedStage,
        stage: Stage,
        pending: list[tuple[WorkUnit, str]],
        done: set[str],
        outcome: StageOutcome,
    ) -> None:
        """Units in plan order, as many at once as the stage allows an actor (one committing
        while the next is read from the journal), until the first one that needs a request
        the journal lacks; the units already under way finish."""
        width = max(1, int(rs.cls.max_units_in_flight))
        queue = list(reversed(pending))
        running: dict[concurrent.futures.Future[Counters], tuple[WorkUnit, str]] = {}
        stop: BaseException | None = None
        pool = concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="rankmill-replay")
        with pool as ex:
            while queue or running:
                while queue and stop is None and len(running) < width:
                    unit, fp = queue.pop()
                    running[ex.submit(execute_unit, stage, self.rd, unit, fp)] = (unit, fp)
                if not running:
                    break
                finished, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for fut in finished:
                    unit, fp = running.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        stop = stop or exc
                        continue
                    done.add(fp)
                    outcome.units_run += 1
                    outcome.units_replayed += 1
                    self.on_event("unit_done", stage=rs.name, unit_id=unit.unit_id, ok=True)
        if stop is not None and not isinstance(stop, JournalMiss):
            raise stop

    def _run_units(
        self,
        rs: ResolvedStage,
        todo: list[tuple[WorkUnit, str]],
        in_flight: int,
        outcome: StageOutcome,
    ) -> None:
        import ray

        queue = list(reversed(todo))
        load = [0] * len(self._actors)
        running: dict[Any, tuple[int, WorkUnit]] = {}
        fatal: BaseException | None = None
        while queue or running:
            while queue and fatal is None:
                idx = min(range(len(load)), key=load.__getitem__)
                if load[idx] >= in_flight:
                    break
                unit, fp = queue.pop()
                ref = self._actors[idx].process.remote(unit, fp)
                running[ref] = (idx, unit)
                load[idx] += 1
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                idx, unit = running.pop(ref)
                load[idx] -= 1
                try:
                    res = ray.get(ref)
                except Exception as exc:  # the actor died (killed, out of memory, ...)
                    res = {"ok": False, "exc": StageError(f"worker died: {_short(str(exc))}")}
                if res["ok"]:
                    outcome.units_run += 1
                    self.on_event("unit_done", stage=rs.name, unit_id=unit.unit_id, ok=True)
                    continue
                exc = res["exc"]
                if isinstance(exc, CorruptData):
                    # an input the unit read failed its checksum: recompute that upstream unit
                    self._quarantine(exc)
                    raise _Restart(exc.stage or rs.name)
                if getattr(exc, "fatal", False):
                    fatal = fatal or exc
                    # Stop everything now: no worker sends another request.
                    self._stop_actors(graceful=False)
                    running.clear()
                    break
                outcome.failures[unit.unit_id] = f"{type(exc).__name__}: {exc}"
                self.on_event(
                    "unit_done",
                    stage=rs.name,
                    unit_id=unit.unit_id,
                    ok=False,
                    error=outcome.failures[unit.unit_id],
                )
        if fatal is not None:
            self._raise(rs.name, fatal, "a unit")
        outcome.failures = dict(sorted(outcome.failures.items()))

    def _raise(self, stage: str, exc: BaseException, where: str) -> None:
        if isinstance(exc, BudgetExceeded):
            raise BudgetExceeded(
                f"stage {stage!r} stopped at the run's budget ({exc}); committed work is kept. "
                "Raise run.budget.max_cost_usd / max_requests and run again to resume."
            )
        if isinstance(exc, RankmillError) and exc.fatal:
            raise exc
        raise StageError(f"stage {stage!r}: {where} failed: {type(exc).__name__}: {exc}")

    def _stop_actors(self, graceful: bool = True) -> None:
        if not self._actors:
            return
        import ray

        if graceful:
            with contextlib.suppress(Exception):
                ray.get([a.teardown.remote() for a in self._actors], timeout=30)
        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self._actors = []

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
            }
            # Plug-in stages named 'module:Class' must import on the workers too.
            if self.ray_address:
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _pythonpath()}}
                ray.init(address=self.ray_address, **kwargs)
            else:
                ray_cfg = self.cfg.run.ray
                if ray_cfg.num_cpus:
                    kwargs["num_cpus"] = ray_cfg.num_cpus
                if ray_cfg.object_store_memory_mb:
                    kwargs["object_store_memory"] = ray_cfg.object_store_memory_mb * 2**20
                # A private Ray's workers inherit the environment its processes start with: no
                # runtime environment to set up per worker (about a second per actor start).
                with _environ(PYTHONPATH=_pythonpath()):
                    ray.init(address="local", **kwargs)
            self._ray_started_here = True
            if self.sigterm_handler is not None:
                import signal
                import threading

                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, self.sigterm_handler)
        return ray

    def _refuse_local_on_cluster(self, stages: list[ResolvedStage]) -> None:
        """A local endpoint's server listens on the driver's loopback, out of reach of workers
        on other nodes: refuse it on a multi-node cluster (a private Ray is one node)."""
        local_eps = sorted(
            {
                e
                for rs in stages
                for e in rs.endpoints
                if getattr(self.cfg.endpoints.get(e), "local", False)
            }
        )
        if not local_eps or not self.ray_address:
            return
        from rankmill.llm.local import refuse_multi_node

        nodes = self._ray().nodes()
        for ep_name in local_eps:
            refuse_multi_node(ep_name, nodes)

    def _start_services(self, rs: ResolvedStage) -> None:
        # Again per stage: an autoscaling cluster may have grown since the run started.
        self._refuse_local_on_cluster([rs])
        for ep_name in rs.endpoints:
            ep = self.cfg.endpoints.get(ep_name)
            if ep is None or not ep.local or ep_name in self._services:
                continue
            from rankmill.llm.local import start_local_server

            self.on_event("service_start", name=ep_name)
            server = start_local_server(ep, log_dir=self.rd.path("logs"))
            self._services[ep_name] = server
            self._endpoint_urls[ep_name] = server.base_url
        if rs.endpoints:
            # Run-wide LLM rate limits and budget live in one named Ray actor per run.
            from rankmill.llm.limits import ensure_run_services

            self._shared.update(ensure_run_services(self.cfg, self.rd.uri, self._ray()))

    def close(self) -> None:
        self._stop_actors(graceful=False)
        for name, server in list(self._services.items()):
            with contextlib.suppress(Exception):
                server.stop()
            self._services.pop(name, None)
        self._endpoint_urls.clear()
        if self._ray_started_here:
            import ray

            # A private Ray's processes are this process's children; its agents can outlive
            # ray.shutdown() by many seconds, so whatever is left is ended here.
            children = _children()
            with contextlib.suppress(Exception):
                ray.shutdown()
            _reap(children)
            self._ray_started_here = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _children() -> list[Any]:
    """This process's Ray processes (raylet, GCS, agents, workers), not its other children
    (a local LLM server, a test's fake server)."""
    try:
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if cmd.startswith("ray::") or "/ray/" in cmd or "site-packages/ray" in cmd:
                    out.append(p)
        return out
    except Exception:
        return []


def _reap(procs: list[Any], grace_s: float = 3.0) -> None:
    """Terminate what is left of ``procs`` (then kill it after ``grace_s``)."""
    if not procs:
        return
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
