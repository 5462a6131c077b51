"""The Stage contract: how a stage is written.

A stage is a class with:

- ``name`` (its type, as pipelines name it), ``version`` (bump it when outputs change for the
  same inputs), and ``Params`` (a :class:`rankmill.config.StageParams` subclass; params that
  change no output, such as unit sizes, are listed in its ``not_fingerprinted``);
- ``inputs`` / ``optional_inputs``: the Arrow schemas of the tables it reads, by table name;
- ``outputs``: the Arrow schemas of the tables it writes (``rejects`` is always added);
- ``prompt_texts()``: the ``prompts/<name>.j2`` templates it renders, read on the driver,
  hashed into its fingerprint and sent to the workers, which read them with
  :meth:`Stage.prompt_text` (a worker never looks a prompt up itself, so the text it renders
  is the text that was hashed);
- ``endpoints_used()``: every LLM endpoint it calls (each is started when local,
  rate-limited, accounted, and fingerprinted by its answer-relevant settings);
- ``plan(inputs)``: split the inputs into :class:`WorkUnit` s, deterministically (same input
  and params, same units and keys), on the driver; a unit may carry a ``phase``;
- ``setup()``: build expensive state once per Ray actor (models, clients, indexes);
- ``process(unit)``: turn one unit into output tables and counters, on a Ray actor;
- ``teardown()``: release what ``setup`` built (called when the stage's actors finish).

Stage-wide steps, each optional, each run once on a Ray worker with the stage's resources and
committed and fingerprinted like a unit (a re-run skips a committed step):

- ``prepare(step)``: before any unit, with all inputs in reach (one index or one set of
  embeddings built once for every worker);
- ``aggregate(phase, step)``: after every unit of ``phase`` is committed, for each phase listed
  in ``aggregate_after`` (judge accuracies fitted on a calibration phase, then used by the
  units of the next phase);
- ``finalize(step)``: after every unit (shards and a card written once).

A step returns a :class:`StepOutput` (tables and files); units read it with
:meth:`Stage.step_table` / :meth:`Stage.step_file`, later steps with the same methods of their
:class:`StepContext`. A step table named in ``outputs`` is part of that output table for later
stages too.

The fingerprint of a stage is a hash of its type, version, fingerprinted params, rendered
prompt texts, the run seed, the settings of the endpoints it uses, its ``fingerprint_extra()``
(e.g. input file hashes) and the committed content of its upstream stages. A re-run skips every
unit and step committed under the current fingerprint; resume is running again.

Every input row ends up in an output table or in ``rejects`` with a reason.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from rankmill.config import EndpointConfig, StageParams
from rankmill.errors import ManifestError, StageError
from rankmill.hashing import content_key, table_key
from rankmill.manifest import Counters, RunDir, StagePlan
from rankmill.schemas import REJECTS

__all__ = [
    "Stage",
    "StageContext",
    "StepContext",
    "StepOutput",
    "UnitOutput",
    "WorkUnit",
    "chunk_units",
    "content_key",
    "load_prompt",
    "rejects_table",
    "table_key",
]

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"  # a source checkout's prompts/

# Set in every Ray worker that runs stage code: workers never look prompts up themselves.
WORKER_ENV = "RANKMILL_STAGE_WORKER"


def prompt_dirs() -> list[Path]:
    """Where prompt templates are looked up on the driver, first match wins:
    $RANKMILL_PROMPTS_DIR (your own templates), the checkout's prompts/, and the copy a wheel
    install puts under <prefix>/share/rankmill/prompts."""
    dirs = []
    if os.environ.get("RANKMILL_PROMPTS_DIR"):
        dirs.append(Path(os.environ["RANKMILL_PROMPTS_DIR"]).expanduser())
    dirs.append(PROMPTS_DIR)
    dirs.append(Path(sys.prefix) / "share" / "rankmill" / "prompts")
    return dirs


@dataclass
class WorkUnit:
    """One deterministic slice of a stage's work. Units of a later ``phase`` run after every
    unit of the earlier phases (and the aggregate steps between them) is committed."""

    unit_id: str
    key: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    phase: int = 0


@dataclass
class UnitOutput:
    tables: dict[str, pa.Table]
    counters: Counters = field(default_factory=Counters)


@dataclass
class StepOutput:
    """What a stage-wide step produced: tables, and files it wrote (name -> local path)."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)


@dataclass
class StageContext:
    """What a stage instance knows about its run; plain data, so it travels to Ray actors."""

    run_dir: str
    stage_name: str
    stage_type: str
    seed: int = 13
    run_name: str = "rankmill"
    base_dir: str = "."
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_refs: dict[str, str] = field(default_factory=dict)  # table -> "stage.table"
    shared: dict[str, Any] = field(default_factory=dict)  # run-wide services (limiter names...)
    budget: dict[str, Any] = field(default_factory=dict)
    workers: int = 1  # actors running this stage at once (they share endpoint concurrency)
    prompts: dict[str, str] = field(default_factory=dict)  # template name -> text (driver's)
    run_id: str = ""  # the run holding the run dir's lock ("" outside a locked run)
    # upstream stage -> its plan's fingerprint, the plan this stage's fingerprint was built from
    upstream_fps: dict[str, str] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)  # step name -> step fingerprint
    # answers only from the LLM journal: a request it lacks raises JournalMiss, nothing is sent
    journal_only: bool = False

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageContext:
        return cls(**json.loads(text))

    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    def endpoint(self, name: str) -> EndpointConfig:
        if name not in self.endpoints:
            raise KeyError(f"no endpoint {name!r}")
        return EndpointConfig.model_validate(self.endpoints[name])

    def _upstream_plan(self, stage: str) -> StagePlan:
        plan = self.rundir().read_plan(stage)
        want = self.upstream_fps.get(stage)
        if plan is None or (want is not None and plan.fingerprint != want):
            raise ManifestError(
                f"stage {self.stage_name!r}: its input stage {stage!r} changed while it ran "
                "(another run re-planned it); run the pipeline again"
            )
        return plan

    def read_input(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read a whole upstream table (for side inputs a worker needs, e.g. the corpus),
        through the upstream plan this stage's fingerprint was built from."""
        ref = self.input_refs[name]
        stage, table = ref.split(".", 1)
        return self.rundir().read_table(
            stage, table, plan=self._upstream_plan(stage), columns=columns
        )

    def iter_input(self, name: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """An upstream table one upstream unit at a time (see :meth:`read_input`)."""
        stage, table = self.input_refs[name].split(".", 1)
        return self.rundir().iter_table(
            stage, table, plan=self._upstream_plan(stage), columns=columns
        )

    def has_input(self, name: str) -> bool:
        return name in self.input_refs

    def resolve_path(self, path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())

    # -- outputs of this stage's own steps ----------------------------------------------------
    def _step_record(self, step: str) -> Any:
        fp = self.steps.get(step)
        rec = self.rundir().committed(self.stage_name, fp, step=True) if fp else None
        if rec is None:
            raise StageError(
                f"stage {self.stage_name!r}: step {step!r} has no committed output "
                f"(steps: {sorted(self.steps) or 'none'})"
            )
        return rec

    def step_table(self, step: str, table: str) -> pa.Table:
        rec = self._step_record(step)
        out = self.rundir().read_unit_table(rec, table, step=True)
        if out is None:
            raise StageError(f"stage {self.stage_name!r}: step {step!r} wrote no table {table!r}")
        return out

    def step_file(self, step: str, name: str, local_dir: str | None = None) -> str:
        """A local path to a file a step wrote (copied out of an object-store run dir)."""
        rd = self.rundir()
        rec = self._step_record(step)
        entry = rec.file(name)
        if entry is None:
            raise StageError(f"stage {self.stage_name!r}: step {step!r} wrote no file {name!r}")
        if rd.local:
            rd.read_file(rec, name)  # verifies the sha256
            return rd.path(entry.path)
        import tempfile

        target_dir = local_dir or os.path.join(tempfile.gettempdir(), "rankmill-steps")
        target = os.path.join(target_dir, entry.sha256, name)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(rd.read_file(rec, name))
            os.replace(tmp, target)
        return target


@dataclass
class StepContext:
    """What a stage-wide step sees: its stage's context, a local folder for the files it
    writes, the stage's inputs and its own committed outputs so far."""

    ctx: StageContext
    work_dir: str
    plan: StagePlan | None = None

    def read_input(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return self.ctx.read_input(name, columns)

    def iter_input(self, name: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        return self.ctx.iter_input(name, columns)

    def has_input(self, name: str) -> bool:
        return self.ctx.has_input(name)

    def read_output(self, table: str, phases: list[int] | None = None) -> pa.Table | None:
        """This stage's committed unit outputs of ``table`` (units of ``phases``, default all),
        in plan order; None when no unit wrote that table."""
        rd = self.ctx.rundir()
        plan = self.plan or rd.read_plan(self.ctx.stage_name)
        if plan is None:
            return None
        parts = []
        for i, (_, fp) in enumerate(plan.units):
            if phases is not None and plan.phase_of(i) not in phases:
                continue
            rec = rd.committed(self.ctx.stage_name, fp)
            if rec is None:
                continue
            t = rd.read_unit_table(rec, table)
            if t is not None:
                parts.append(t)
        return pa.concat_tables(parts, promote_options="default") if parts else None

    def step_table(self, step: str, table: str) -> pa.Table:
        return self.ctx.step_table(step, table)

    def step_file(self, step: str, name: str) -> str:
        return self.ctx.step_file(step, name)


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    inputs: ClassVar[dict[str, pa.Schema]] = {}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {}
    outputs: ClassVar[dict[str, pa.Schema]] = {}
    prompts: ClassVar[tuple[str, ...]] = ()
    # Phases after whose units ``aggregate`` runs.
    aggregate_after: ClassVar[tuple[int, ...]] = ()
    # Units one actor may process at once (threads sharing its setup(): its gateway keeps
    # the endpoint busy across unit boundaries). Only for stages whose process() is
    # thread-safe.
    max_units_in_flight: ClassVar[int] = 1
    # Units whose only costly part is their LLM calls: when the journal answers them, the
    # runner runs them in its own process (ctx.journal_only), without starting Ray, actors or
    # local servers; the first unit that needs a new request goes, with the rest, to actors.
    replay_in_driver: ClassVar[bool] = False

    def __init__(self, params: StageParams, ctx: StageContext):
        self.params = params
        self.ctx = ctx

    # -- declared on the driver ------------------------------------------------------------------
    @classmethod
    def all_outputs(cls) -> dict[str, pa.Schema]:
        return {**cls.outputs, "rejects": REJECTS}

    def fingerprint_extra(self) -> dict[str, Any]:
        """Anything beyond params, prompts, seed, endpoints and upstream that determines
        outputs (e.g. the content hash of input files). Runs on the driver."""
        return {}

    def endpoints_used(self) -> list[str]:
        """Names of the LLM endpoints this stage calls (local ones are started for it)."""
        names: list[str] = []
        ep = getattr(self.params, "endpoint", None)
        if isinstance(ep, str):
            names.append(ep)
        for list_name in ("endpoints", "judges"):
            for item in getattr(self.params, list_name, None) or []:
                name = item if isinstance(item, str) else getattr(item, "endpoint", None)
                if isinstance(name, str) and name not in names:
                    names.append(name)
        return names

    def prompt_texts(self) -> dict[str, str]:
        """The templates this stage renders, by name (read on the driver)."""
        return {name: load_prompt(name) for name in self.prompts}

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        """The input tables (and columns; None = all) ``plan`` needs; None = every input,
        whole. Planning reads only these, so the driver never holds what it does not use."""
        return None

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        raise NotImplementedError

    # -- on a Ray actor ------------------------------------------------------------------------
    def setup(self) -> None:
        """Build expensive state (models, clients) once per actor."""

    def process(self, unit: WorkUnit) -> UnitOutput:
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what setup() built."""

    def prompt_text(self, name: str) -> str:
        """The text of template ``name`` as the driver read and hashed it."""
        if name not in self.ctx.prompts:
            raise StageError(
                f"stage {self.ctx.stage_name!r} renders prompt {name!r}, which its "
                f"prompt_texts() does not list (it lists {sorted(self.ctx.prompts)})"
            )
        return self.ctx.prompts[name]

    def step_table(self, step: str, table: str) -> pa.Table:
        return self.ctx.step_table(step, table)

    def step_file(self, step: str, name: str) -> str:
        return self.ctx.step_file(step, name)

    # -- stage-wide steps (optional) -------------------------------------------------------------
    def prepare(self, step: StepContext) -> StepOutput | None:
        """Once, before any unit; see the module docstring."""
        return None

    def aggregate(self, phase: int, step: StepContext) -> StepOutput | None:
        """Once after every unit of ``phase`` (for phases in ``aggregate_after``)."""
        return None

    def finalize(self, step: StepContext) -> StepOutput | None:
        """Once, after every unit."""
        return None

    @classmethod
    def step_names(cls, phases: list[int]) -> list[str]:
        """The stage-wide steps this stage runs, in order, given its units' phases."""
        names = []
        if cls.prepare is not Stage.prepare:
            names.append("prepare")
        if cls.aggregate is not Stage.aggregate:
            names += [f"aggregate-{p}" for p in cls.aggregate_after]
        if cls.finalize is not Stage.finalize:
            names.append("finalize")
        return names


def load_prompt(name: str) -> str:
    """The text of prompt template ``<name>.j2`` (see :func:`prompt_dirs`). Driver only."""
    if os.environ.get(WORKER_ENV):
        raise StageError(
            f"prompt {name!r} looked up on a worker: stages read prompts with "
            "self.prompt_text(name), the driver's text, so the rendered text is the hashed one"
        )
    for d in prompt_dirs():
        path = d / f"{name}.j2"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise StageError(
        f"prompt template {name}.j2 not found in {', '.join(str(d) for d in prompt_dirs())}; "
        "set RANKMILL_PROMPTS_DIR to the folder that holds it"
    )


def chunk_units(table: pa.Table, rows_per_unit: int, name: str = "rows") -> list[WorkUnit]:
    """Split ``table`` in row order into units of at most ``rows_per_unit`` rows each.

    The split depends only on the table's content and ``rows_per_unit``, so the same input
    always gives the same units with the same keys.
    """
    if rows_per_unit < 1:
        raise ValueError("rows_per_unit must be >= 1")
    units = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_unit)):
        part = table.slice(start, rows_per_unit)
        units.append(WorkUnit(unit_id=f"{i:05d}", key=table_key(part), tables={name: part}))
    return units


def rejects_table(rows: list[dict[str, Any]], stage: str, unit_id: str) -> pa.Table:
    """Build a ``rejects`` table from dicts with reason (and query_id, doc_id, detail...)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in REJECTS}
    for r in rows:
        full = {"stage": stage, "unit_id": unit_id, **r}
        for f in REJECTS:
            v = full.get(f.name)
            if f.name == "detail" and v is not None and not isinstance(v, str):
                v = json.dumps(v, default=str)
            cols[f.name].append(v)
    return pa.table(cols, schema=REJECTS)
