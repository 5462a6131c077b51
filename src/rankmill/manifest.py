"""Commit records and fingerprints: what makes a run directory trustworthy and resumable.

A run directory looks like this (paths through ``pyarrow.fs``, so it may live on object
storage)::

    pipeline.json                         the resolved config of the latest run
    stages/<stage>/plan.json              the stage's fingerprint and its work units
    stages/<stage>/units/<unit_id>.json   a unit's commit record, written last
    stages/<stage>/data/<table>/<unit_id>.<token>.parquet   unit outputs
    llm/                                  the LLM response journal

A unit is committed when its record exists and names the current fingerprint. Records are
written to a temporary name and moved into place, so a reader sees a whole record or none.
Data files are only ever read through records: a file no record names (left by a crash) is
garbage, never data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rankmill.config import stable_hash
from rankmill.errors import ManifestError

RECORD_FORMAT = 1


def fingerprint(
    stage: str,
    version: str,
    params: dict[str, Any],
    prompts: dict[str, str],
    upstream: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> str:
    """Hash of everything that determines a stage's outputs."""
    return stable_hash(
        {
            "stage": stage,
            "version": version,
            "params": params,
            "prompts": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in prompts.items()},
            "upstream": upstream,
            "extra": extra or {},
        }
    )


def unit_fingerprint(stage_fp: str, unit_key: str) -> str:
    return stable_hash({"stage": stage_fp, "unit": unit_key})


@dataclass
class Counters:
    """What a unit did, summed per stage by ``rankmill status``."""

    rows_in: int = 0
    rows_out: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    llm_calls: int = 0
    llm_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + n

    def add(self, other: Counters) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        for k, v in other.rejects.items():
            self.rejects[k] = self.rejects.get(k, 0) + v
        self.llm_calls += other.llm_calls
        self.llm_cached += other.llm_cached
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.seconds += other.seconds
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class FileEntry:
    table: str
    path: str  # relative to the run dir
    rows: int
    sha256: str


@dataclass
class UnitRecord:
    stage: str
    unit_id: str
    fingerprint: str
    files: list[FileEntry]
    counters: Counters
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        d = json.loads(text)
        return cls(
            stage=d["stage"],
            unit_id=d["unit_id"],
            fingerprint=d["fingerprint"],
            files=[FileEntry(**f) for f in d["files"]],
            counters=Counters.from_dict(d["counters"]),
            format=d.get("format", RECORD_FORMAT),
        )


@dataclass
class StagePlan:
    stage: str
    stage_type: str
    fingerprint: str
    units: list[tuple[str, str]]  # (unit_id, unit fingerprint), in order
    outputs: list[str]
    upstream: dict[str, str] = field(default_factory=dict)  # input table -> "stage.table"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StagePlan:
        d = json.loads(text)
        d["units"] = [tuple(u) for u in d["units"]]
        return cls(**d)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunDir:
    """Reads and writes a run directory through a ``pyarrow.fs`` filesystem."""

    def __init__(self, uri: str):
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri if "://" in uri else self.root

    # -- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def stage_dir(self, stage: str) -> str:
        return self.path("stages", stage)

    def mkdirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # -- atomic small files --------------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` so that readers see all of it or nothing."""
        parent = path.rsplit("/", 1)[0]
        self.mkdirs(parent)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        if isinstance(self.fs, pafs.LocalFileSystem):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.fs.move(tmp, path)
        if isinstance(self.fs, pafs.LocalFileSystem):
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read_text(self, path: str) -> str | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None

    # -- pipeline --------------------------------------------------------------------------------
    def write_pipeline(self, cfg: dict[str, Any]) -> None:
        self.write_atomic(self.path("pipeline.json"), json.dumps(cfg, indent=1).encode())

    def read_pipeline(self) -> dict[str, Any] | None:
        text = self.read_text(self.path("pipeline.json"))
        return json.loads(text) if text else None

    # -- plans -----------------------------------------------------------------------------------
    def write_plan(self, plan: StagePlan) -> None:
        self.write_atomic(self.path("stages", plan.stage, "plan.json"), plan.to_json().encode())

    def read_plan(self, stage: str) -> StagePlan | None:
        text = self.read_text(self.path("stages", stage, "plan.json"))
        return StagePlan.from_json(text) if text else None

    # -- unit records ----------------------------------------------------------------------------
    def record_path(self, stage: str, unit_id: str) -> str:
        return self.path("stages", stage, "units", f"{unit_id}.json")

    def read_record(self, stage: str, unit_id: str) -> UnitRecord | None:
        text = self.read_text(self.record_path(stage, unit_id))
        if text is None:
            return None
        try:
            return UnitRecord.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(
                f"{self.record_path(stage, unit_id)} is corrupt ({exc}); delete it to recompute "
                "that unit"
            ) from exc

    def committed(self, stage: str, unit_id: str, unit_fp: str) -> UnitRecord | None:
        rec = self.read_record(stage, unit_id)
        if rec is not None and rec.fingerprint == unit_fp:
            return rec
        return None

    def commit_unit(
        self,
        stage: str,
        unit_id: str,
        unit_fp: str,
        tables: dict[str, pa.Table],
        counters: Counters,
    ) -> UnitRecord:
        """Write a unit's tables under fresh names, then its record last (the commit)."""
        token = uuid.uuid4().hex[:12]
        files = []
        for table_name in sorted(tables):
            table = tables[table_name]
            rel = f"stages/{stage}/data/{table_name}/{unit_id}.{token}.parquet"
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            data = buf.getvalue()
            full = self.path(rel)
            self.mkdirs(full.rsplit("/", 1)[0])
            with self.fs.open_output_stream(full) as out:
                out.write(data)
            files.append(FileEntry(table_name, rel, table.num_rows, _sha256(data)))
        rec = UnitRecord(stage, unit_id, unit_fp, files, counters)
        self.write_atomic(self.record_path(stage, unit_id), rec.to_json().encode())
        return rec

    def read_unit_table(self, rec: UnitRecord, table: str, verify: bool = True) -> pa.Table | None:
        for f in rec.files:
            if f.table != table:
                continue
            with self.fs.open_input_stream(self.path(f.path)) as src:
                data = src.read()
            if verify and _sha256(data) != f.sha256:
                raise ManifestError(
                    f"{f.path}: content does not match its commit record (sha256); the run dir "
                    f"was modified. Delete {self.record_path(rec.stage, rec.unit_id)} to recompute."
                )
            return pq.read_table(pa.BufferReader(data))
        return None

    def read_table(self, stage: str, table: str, schema: pa.Schema | None = None) -> pa.Table:
        """Concatenate a committed stage table over its units, in plan order."""
        plan = self.read_plan(stage)
        if plan is None:
            raise ManifestError(f"stage {stage!r} has no plan in {self.uri}: run it first")
        if table not in plan.outputs:
            raise ManifestError(
                f"stage {stage!r} has no output table {table!r} (it has {plan.outputs})"
            )
        parts = []
        for unit_id, unit_fp in plan.units:
            rec = self.committed(stage, unit_id, unit_fp)
            if rec is None:
                raise ManifestError(
                    f"stage {stage!r} unit {unit_id} is not committed: the stage is incomplete; "
                    "run the pipeline again to finish it"
                )
            t = self.read_unit_table(rec, table)
            if t is not None:
                parts.append(t)
        if not parts:
            if schema is None:
                raise ManifestError(f"stage {stage!r} table {table!r} has no rows and no schema")
            return schema.empty_table()
        if schema is not None:
            parts = [p.cast(schema) if p.schema != schema else p for p in parts]
        return pa.concat_tables(parts)

    def stage_status(self, stage: str) -> tuple[StagePlan | None, list[UnitRecord | None]]:
        plan = self.read_plan(stage)
        if plan is None:
            return None, []
        return plan, [self.committed(stage, u, fp) for u, fp in plan.units]

    def is_complete(self, stage: str, stage_fp: str | None = None) -> bool:
        plan, recs = self.stage_status(stage)
        if plan is None or (stage_fp is not None and plan.fingerprint != stage_fp):
            return False
        return all(r is not None for r in recs)
