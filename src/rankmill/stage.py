"""The Stage contract.

A stage is a class with:

- ``name`` (its type, as pipelines name it), ``version`` (bump it when outputs change for the
  same inputs), and ``Params`` (a :class:`rankmill.config.StageParams` subclass);
- ``inputs`` / ``optional_inputs``: the Arrow schemas of the tables it reads, by table name;
- ``outputs``: the Arrow schemas of the tables it writes (``rejects`` is always added);
- ``prompts``: the names of the ``prompts/<name>.j2`` templates it renders (hashed into its
  fingerprint, so editing a prompt re-runs the stage);
- ``plan(inputs)``: split the inputs into :class:`WorkUnit` s, deterministically (same input
  and params, same units and keys), on the driver;
- ``setup()``: build expensive state once per Ray actor (models, clients, indexes);
- ``process(unit)``: turn one unit into output tables and counters, on a Ray actor.

Every input row ends up in an output table or in ``rejects`` with a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from rankmill.config import EndpointConfig, StageParams
from rankmill.manifest import Counters, RunDir
from rankmill.schemas import REJECTS

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"  # a source checkout's prompts/


def prompt_dirs() -> list[Path]:
    """Where prompt templates are looked up, first match wins: $RANKMILL_PROMPTS_DIR (your
    own templates), the checkout's prompts/, and the copy a wheel install puts under
    <prefix>/share/rankmill/prompts."""
    dirs = []
    if os.environ.get("RANKMILL_PROMPTS_DIR"):
        dirs.append(Path(os.environ["RANKMILL_PROMPTS_DIR"]).expanduser())
    dirs.append(PROMPTS_DIR)
    dirs.append(Path(sys.prefix) / "share" / "rankmill" / "prompts")
    return dirs


@dataclass
class WorkUnit:
    """One deterministic slice of a stage's work."""

    unit_id: str
    key: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitOutput:
    tables: dict[str, pa.Table]
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

    def read_input(self, name: str) -> pa.Table:
        """Read a whole upstream table (for side inputs a worker needs, e.g. the corpus)."""
        ref = self.input_refs[name]
        stage, table = ref.split(".", 1)
        return self.rundir().read_table(stage, table)

    def has_input(self, name: str) -> bool:
        return name in self.input_refs

    def resolve_path(self, path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    inputs: ClassVar[dict[str, pa.Schema]] = {}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {}
    outputs: ClassVar[dict[str, pa.Schema]] = {}
    prompts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: StageParams, ctx: StageContext):
        self.params = params
        self.ctx = ctx

    # -- declared on the driver ------------------------------------------------------------------
    @classmethod
    def all_outputs(cls) -> dict[str, pa.Schema]:
        return {**cls.outputs, "rejects": REJECTS}

    def fingerprint_extra(self) -> dict[str, Any]:
        """Anything beyond params, prompts and upstream that determines outputs (e.g. the
        content hash of input files). Runs on the driver."""
        return {}

    def endpoints_used(self) -> list[str]:
        """Names of the LLM endpoints this stage calls (local ones are started for it)."""
        names: list[str] = []
        ep = getattr(self.params, "endpoint", None)
        if isinstance(ep, str):
            names.append(ep)
        return names

    def prompt_texts(self) -> dict[str, str]:
        return {name: load_prompt(name) for name in self.prompts}

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        raise NotImplementedError

    # -- on a Ray actor ------------------------------------------------------------------------
    def setup(self) -> None:
        """Build expensive state (models, clients) once per actor."""

    def process(self, unit: WorkUnit) -> UnitOutput:
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what setup() built."""


def load_prompt(name: str) -> str:
    """The text of prompt template ``<name>.j2`` (see :func:`prompt_dirs`)."""
    for d in prompt_dirs():
        path = d / f"{name}.j2"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    from rankmill.errors import StageError

    raise StageError(
        f"prompt template {name}.j2 not found in {', '.join(str(d) for d in prompt_dirs())}; "
        "set RANKMILL_PROMPTS_DIR to the folder that holds it"
    )


def content_key(*parts: Any) -> str:
    """A stable hash of plain values (lists of ids, dicts)."""
    data = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def table_key(table: pa.Table) -> str:
    """A stable hash of a table's content (schema and values, not its memory layout)."""
    h = hashlib.sha256()
    h.update(str(table.schema).encode())
    for batch in table.combine_chunks().to_batches(max_chunksize=4096):
        for col in batch.columns:
            h.update(json.dumps(col.to_pylist(), default=str, ensure_ascii=False).encode())
    return h.hexdigest()


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
