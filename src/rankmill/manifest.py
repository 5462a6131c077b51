"""Commit records and fingerprints: what makes a run directory trustworthy and resumable.

A run directory looks like this (paths through ``pyarrow.fs``, so it may live on object
storage)::

    pipeline.json                          the resolved config and fingerprints of the latest run
    lock, lock.json, lock.heartbeat        the run lock (see :mod:`rankmill.lock`)
    stages/<stage>/plan.json               the stage's fingerprint, work units and steps
    stages/<stage>/units/<unit_fp>.json    a unit's commit record, written last
    stages/<stage>/steps/<step_fp>.json    a stage-wide step's commit record
    stages/<stage>/data/<table>/<unit_id>.<token>.parquet   unit and step outputs
    stages/<stage>/files/<step>.<token>/<name>               files a step wrote
    llm/                                   the LLM response journal

A unit is committed when a record named by its unit fingerprint exists (a unit fingerprint is
derived from the stage fingerprint and the unit's content key, so a record can only ever be
read for the work it was written for). Data files are written and fsynced first; the record
is written to a temporary name, fsynced and moved into place, and its folder fsynced, so a
reader sees a whole record or none. Data files are only ever read through records: a file no
record names (left by a crash) is garbage, never data. Every record carries the sha256 of its
files, checked on every read; a file that fails is :class:`~rankmill.errors.CorruptData`, and
the runner recomputes its unit.

Each record also carries a content digest per output table: an order- and
partition-independent hash of its rows (a sum of per-row hashes). The digests of a stage's
records add up to the stage's content digest, which is what a downstream stage's
fingerprint holds as its upstream identity: re-splitting a stage into other units leaves it
unchanged, a recomputed unit with other content changes it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rankmill.errors import CorruptData, ManifestError
from rankmill.hashing import bytes_sha256, file_sha256, stable_hash

RECORD_FORMAT = 2
_MASK = (1 << 64) - 1


def fingerprint(
    stage: str,
    version: str,
    params: dict[str, Any],
    prompts: dict[str, str],
    upstream: dict[str, str],
    extra: dict[str, Any] | None = None,
    seed: int | None = None,
    endpoints: dict[str, Any] | None = None,
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
            "seed": seed,
            "endpoints": endpoints or {},
        }
    )


def unit_fingerprint(stage_fp: str, unit_key: str) -> str:
    return stable_hash({"stage": stage_fp, "unit": unit_key})


def step_fingerprint(stage_fp: str, step: str, before: list[str]) -> str:
    """A step's fingerprint: its stage's, its name, and the unit fingerprints it follows."""
    return stable_hash({"stage": stage_fp, "step": step, "after": before})


# -- content digests ---------------------------------------------------------------------------
def rows_digest(table: pa.Table) -> tuple[str, int]:
    """(hex sum of per-row hashes mod 2**64, rows): the same for the same multiset of rows,
    however they are ordered or split into units. ``unit_id`` columns (where a row was made,
    not what it is) are left out."""
    cols = [c for c in table.column_names if c != "unit_id"]
    total = 0
    if table.num_rows and cols:
        try:
            import orjson

            dumps = orjson.dumps
        except ImportError:  # pragma: no cover
            dumps = lambda v: json.dumps(v, default=str).encode()  # noqa: E731
        sub = table.select(cols)
        for batch in sub.to_batches(max_chunksize=8192):
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for row in zip(*columns, strict=True):
                h = hashlib.blake2b(dumps(row, default=str), digest_size=8).digest()
                total = (total + int.from_bytes(h, "big")) & _MASK
    return f"{total:016x}", table.num_rows


def combine_digests(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Add up per-table digests of several records: {table: [hex sum, rows]}."""
    out: dict[str, list[Any]] = {}
    for part in parts:
        for table, (hexsum, rows) in part.items():
            acc = out.setdefault(table, ["0" * 16, 0])
            acc[0] = f"{(int(acc[0], 16) + int(hexsum, 16)) & _MASK:016x}"
            acc[1] += int(rows)
    return out


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
    table: str  # an output table, or "file:<name>" for a file a step wrote
    path: str  # relative to the run dir; "" for a table without rows, held in the record
    rows: int
    sha256: str
    schema: str = ""  # a table without rows: its Arrow schema (IPC, base64)

    def empty_table(self) -> pa.Table:
        """The table of an entry that holds no file (no rows)."""
        import pyarrow.ipc as ipc

        return ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema))).empty_table()


@dataclass
class UnitRecord:
    stage: str
    unit_id: str  # the unit's id, or "step:<name>" for a stage-wide step
    fingerprint: str
    files: list[FileEntry]
    counters: Counters
    content: dict[str, list[Any]] = field(default_factory=dict)  # table -> [hex sum, rows]
    run_id: str = ""
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        d = json.loads(text)
        return cls(
            stage=d["stage"],
            unit_id=d["unit_id"],
            fingerprint=d["fingerprint"],
            files=[FileEntry(**f) for f in d["files"]],
            counters=Counters.from_dict(d["counters"]),
            content={k: list(v) for k, v in (d.get("content") or {}).items()},
            run_id=d.get("run_id", ""),
            format=d.get("format", 1),
        )

    def file(self, name: str) -> FileEntry | None:
        for f in self.files:
            if f.table == f"file:{name}":
                return f
        return None


@dataclass
class StagePlan:
    stage: str
    stage_type: str
    fingerprint: str
    units: list[tuple[str, str]]  # (unit_id, unit fingerprint), in order
    outputs: list[str]
    upstream: dict[str, str] = field(default_factory=dict)  # input table -> "stage.table"
    phases: list[int] = field(default_factory=list)  # phase of each unit (empty: all 0)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step name, step fp), in order
    upstream_digests: dict[str, str] = field(default_factory=dict)  # stage -> content digest

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StagePlan:
        d = json.loads(text)
        d["units"] = [tuple(u) for u in d["units"]]
        d["steps"] = [tuple(s) for s in d.get("steps", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def phase_of(self, i: int) -> int:
        return self.phases[i] if self.phases else 0


class RunDir:
    """Reads and writes a run directory through a ``pyarrow.fs`` filesystem."""

    def __init__(self, uri: str):
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri if "://" in uri else self.root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def stage_dir(self, stage: str) -> str:
        return self.path("stages", stage)

    def mkdirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # -- durable writes --------------------------------------------------------------------------
    def _fsync_path(self, path: str, directory: bool = False) -> None:
        if not self.local:
            return  # an object store's PUT is durable when it returns
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_durable(self, path: str, data: bytes) -> None:
        """Write a new file and make it durable (fsync) before returning."""
        parent = path.rsplit("/", 1)[0]
        self.mkdirs(parent)
        if self.local:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` so that readers see all of it or nothing, durably:
        temp file + fsync, rename, fsync of the folder."""
        parent = path.rsplit("/", 1)[0]
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.write_durable(tmp, data)
        self.fs.move(tmp, path)
        self._fsync_path(parent, directory=True)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_text(self, path: str) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def _read_json(self, path: str, what: str, fix: str) -> Any:
        text = self.read_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ManifestError(
                f"{path}: {what} is torn or not JSON ({exc.msg} at line {exc.lineno}); {fix}"
            ) from None

    # -- pipeline --------------------------------------------------------------------------------
    def write_pipeline(self, cfg: dict[str, Any]) -> None:
        self.write_atomic(self.path("pipeline.json"), json.dumps(cfg, indent=1).encode())

    def read_pipeline(self) -> dict[str, Any] | None:
        d = self._read_json(
            self.path("pipeline.json"),
            "the run's pipeline record",
            "run the pipeline again to rewrite it (committed work is kept)",
        )
        if d is not None and not isinstance(d, dict):
            raise ManifestError(f"{self.path('pipeline.json')}: not a pipeline record")
        return d

    # -- plans -----------------------------------------------------------------------------------
    def plan_path(self, stage: str) -> str:
        return self.path("stages", stage, "plan.json")

    def write_plan(self, plan: StagePlan) -> None:
        self.write_atomic(self.plan_path(plan.stage), plan.to_json().encode())

    def read_plan(self, stage: str) -> StagePlan | None:
        d = self._read_json(
            self.plan_path(stage),
            f"stage {stage!r}'s plan",
            "run the pipeline again: the stage is re-planned and its committed units are kept",
        )
        if d is None:
            return None
        try:
            return StagePlan.from_json(json.dumps(d))
        except (KeyError, TypeError) as exc:
            raise ManifestError(
                f"{self.plan_path(stage)}: not a stage plan ({exc}); run the pipeline again: "
                "the stage is re-planned and its committed units are kept"
            ) from None

    # -- records ---------------------------------------------------------------------------------
    def record_path(self, stage: str, unit_fp: str, step: bool = False) -> str:
        return self.path("stages", stage, "steps" if step else "units", f"{unit_fp}.json")

    def read_record(self, stage: str, unit_fp: str, step: bool = False) -> UnitRecord | None:
        path = self.record_path(stage, unit_fp, step)
        text = self.read_text(path)
        if text is None:
            return None
        try:
            rec = UnitRecord.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(
                f"{path}: commit record is corrupt ({exc})", stage=stage, unit_fp=unit_fp
            ) from None
        if rec.fingerprint != unit_fp:
            raise CorruptData(
                f"{path}: record names fingerprint {rec.fingerprint[:12]}, not its own",
                stage=stage,
                unit_fp=unit_fp,
            )
        return rec

    def committed(self, stage: str, unit_fp: str, step: bool = False) -> UnitRecord | None:
        """The record committed for this unit (or step) fingerprint; None when there is none
        (a corrupt record counts as none: the unit is recomputed)."""
        try:
            return self.read_record(stage, unit_fp, step)
        except CorruptData:
            return None

    def committed_fps(self, stage: str, step: bool = False) -> set[str]:
        """Fingerprints with a record in the stage's units (or steps) folder: one listing
        instead of a read per unit. A record listed here may still turn out corrupt when it
        is read; the reader then raises :class:`CorruptData`."""
        folder = self.path("stages", stage, "steps" if step else "units")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except FileNotFoundError:
            return set()
        return {
            i.base_name[: -len(".json")]
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".json")
        }

    def quarantine(self, stage: str, unit_fp: str, step: bool = False) -> None:
        """Move a record whose data failed verification aside, so its unit is recomputed."""
        path = self.record_path(stage, unit_fp, step)
        if self.exists(path):
            self.fs.move(path, f"{path}.corrupt-{uuid.uuid4().hex[:8]}")

    def commit_unit(
        self,
        stage: str,
        unit_id: str,
        unit_fp: str,
        tables: dict[str, pa.Table],
        counters: Counters,
        files: dict[str, str] | None = None,
        step: bool = False,
        run_id: str = "",
    ) -> UnitRecord:
        """Write a unit's (or step's) tables and files under fresh names, durably, then its
        record last (the commit)."""
        token = uuid.uuid4().hex[:12]
        entries = []
        content: dict[str, list[Any]] = {}
        safe_id = unit_id.replace(":", "-")
        for table_name in sorted(tables):
            table = tables[table_name]
            if table.num_rows == 0:
                # No rows: the schema goes in the record, no file to write, sync and read.
                schema = base64.b64encode(table.schema.serialize().to_pybytes()).decode()
                entries.append(FileEntry(table_name, "", 0, "", schema))
                if table_name != "rejects":
                    content[table_name] = list(rows_digest(table))
                continue
            rel = f"stages/{stage}/data/{table_name}/{safe_id}.{token}.parquet"
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd", row_group_size=65536)
            data = buf.getvalue()
            self.write_durable(self.path(rel), data)
            entries.append(FileEntry(table_name, rel, table.num_rows, bytes_sha256(data)))
            if table_name != "rejects":
                content[table_name] = list(rows_digest(table))
        for name, local_path in sorted((files or {}).items()):
            rel = f"stages/{stage}/files/{safe_id}.{token}/{name}"
            with open(local_path, "rb") as f:
                data = f.read()
            self.write_durable(self.path(rel), data)
            entries.append(FileEntry(f"file:{name}", rel, 0, bytes_sha256(data)))
        if self.local and entries:
            for d in {self.path(e.path).rsplit("/", 1)[0] for e in entries if e.path}:
                self._fsync_path(d, directory=True)
        rec = UnitRecord(stage, unit_id, unit_fp, entries, counters, content, run_id)
        path = self.record_path(stage, unit_fp, step)
        self.mkdirs(path.rsplit("/", 1)[0])
        self.write_atomic(path, rec.to_json().encode())
        return rec

    def _verified_bytes(self, rec: UnitRecord, f: FileEntry, step: bool = False) -> bytes:
        data = self.read_bytes(self.path(f.path))
        if data is None or bytes_sha256(data) != f.sha256:
            why = "is missing" if data is None else "does not match its commit record (sha256)"
            raise CorruptData(
                f"{f.path} {why}; run the pipeline again to recompute that unit",
                stage=rec.stage,
                unit_fp=("step:" if step else "") + rec.fingerprint,
            )
        return data

    def read_unit_table(
        self,
        rec: UnitRecord,
        table: str,
        verify: bool = True,
        columns: list[str] | None = None,
        step: bool = False,
    ) -> pa.Table | None:
        for f in rec.files:
            if f.table != table:
                continue
            if not f.path:
                empty = f.empty_table()
                return empty.select(columns) if columns is not None else empty
            if columns is not None and self.local:
                # Some columns of a local file: verify it in chunks, then read only those
                # columns, so that reading ids never holds the whole file (texts) in memory.
                path = self.path(f.path)
                if verify and (not os.path.exists(path) or file_sha256(path) != f.sha256):
                    self._verified_bytes(rec, f, step)  # raises CorruptData, saying why
                with pa.OSFile(path) as fh:
                    return pq.read_table(fh, columns=columns)
            if verify:
                data = self._verified_bytes(rec, f, step)
            else:
                data = self.read_bytes(self.path(f.path)) or b""
            return pq.read_table(pa.BufferReader(data), columns=columns)
        return None

    def read_file(self, rec: UnitRecord, name: str, step: bool = True) -> bytes:
        f = rec.file(name)
        if f is None:
            raise ManifestError(f"{rec.stage} {rec.unit_id} wrote no file {name!r}")
        return self._verified_bytes(rec, f, step)

    def _records(self, stage: str, plan: StagePlan) -> list[tuple[UnitRecord, bool]]:
        """Every record of a complete plan, units in plan order then steps; raises when one
        is missing."""
        out = []
        for unit_id, unit_fp in plan.units:
            rec = self.committed(stage, unit_fp)
            if rec is None:
                raise ManifestError(
                    f"stage {stage!r} unit {unit_id} is not committed: the stage is incomplete; "
                    "run the pipeline again to finish it"
                )
            out.append((rec, False))
        for step, step_fp in plan.steps:
            rec = self.committed(stage, step_fp, step=True)
            if rec is None:
                raise ManifestError(
                    f"stage {stage!r} step {step!r} is not committed: the stage is incomplete; "
                    "run the pipeline again to finish it"
                )
            out.append((rec, True))
        return out

    def read_table(
        self,
        stage: str,
        table: str,
        schema: pa.Schema | None = None,
        plan: StagePlan | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Concatenate a committed stage table over its units (plan order), then its steps.

        ``plan`` pins the plan to read through (the runner passes the one a downstream
        fingerprint was built from); by default the one on disk.
        """
        plan = plan or self.read_plan(stage)
        if plan is None:
            raise ManifestError(f"stage {stage!r} has no plan in {self.uri}: run it first")
        if table not in plan.outputs:
            raise ManifestError(
                f"stage {stage!r} has no output table {table!r} (it has {plan.outputs})"
            )
        parts = list(self.iter_table(stage, table, plan, columns))
        if not parts:
            if schema is None:
                raise ManifestError(f"stage {stage!r} table {table!r} has no rows and no schema")
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        if schema is not None and not columns:
            parts = [p.cast(schema) if p.schema != schema else p for p in parts]
        return pa.concat_tables(parts, promote_options="default")

    def iter_table(
        self, stage: str, table: str, plan: StagePlan, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """A committed stage table one unit (then step) at a time, in plan order: a reader
        that keeps only some of the rows holds one unit's worth at once."""
        for rec, is_step in self._records(stage, plan):
            f = next((f for f in rec.files if f.table == table), None)
            if f is not None and f.path and self.local:
                # A local file: verified in chunks, then read a row group at a time.
                path = self.path(f.path)
                if not os.path.exists(path) or file_sha256(path) != f.sha256:
                    self._verified_bytes(rec, f, is_step)  # raises CorruptData, saying why
                with pa.OSFile(path) as fh:
                    pf = pq.ParquetFile(fh)
                    for i in range(pf.num_row_groups):
                        yield pf.read_row_group(i, columns=columns)
                continue
            t = self.read_unit_table(rec, table, columns=columns, step=is_step)
            if t is not None:
                yield t

    def content_digest(self, stage: str, plan: StagePlan | None = None) -> str:
        """The committed content of a complete stage: its tables' row digests added up over
        units and steps (see the module docstring)."""
        plan = plan or self.read_plan(stage)
        if plan is None:
            raise ManifestError(f"stage {stage!r} has no plan in {self.uri}: run it first")
        recs = self._records(stage, plan)
        return stable_hash(
            {"stage": plan.fingerprint, "content": combine_digests([r.content for r, _ in recs])}
        )

    def stage_status(self, stage: str) -> tuple[StagePlan | None, list[UnitRecord | None]]:
        plan = self.read_plan(stage)
        if plan is None:
            return None, []
        return plan, [self.committed(stage, fp) for _, fp in plan.units]

    def step_records(self, stage: str, plan: StagePlan) -> list[UnitRecord | None]:
        return [self.committed(stage, fp, step=True) for _, fp in plan.steps]

    def is_complete(self, stage: str, stage_fp: str | None = None) -> bool:
        plan = self.read_plan(stage)
        if plan is None or (stage_fp is not None and plan.fingerprint != stage_fp):
            return False
        units = self.committed_fps(stage)
        steps = self.committed_fps(stage, step=True) if plan.steps else set()
        return all(fp in units for _, fp in plan.units) and all(fp in steps for _, fp in plan.steps)

    def check_unchanged(self, stage: str, plan: StagePlan) -> None:
        """Raise :class:`CorruptData` for the first committed file of a complete stage whose
        content no longer matches its record. Files whose size and modification time are as
        when they were last verified are not read again (a cache in the stage's folder), so a
        re-run of a finished pipeline stays cheap while a changed file is always caught."""
        cache_path = self.path("stages", stage, "verified.json")
        try:
            cache = json.loads(self.read_text(cache_path) or "{}")
        except ValueError:
            cache = {}
        infos = {
            i.path: i
            for i in self.fs.get_file_info(
                pafs.FileSelector(self.path("stages", stage), recursive=True, allow_not_found=True)
            )
            if i.type == pafs.FileType.File
        }
        fresh: dict[str, Any] = {}
        changed = False
        pairs = [(fp, False) for _, fp in plan.units] + [(fp, True) for _, fp in plan.steps]
        for fp, is_step in pairs:
            rec = self.read_record(stage, fp, is_step)
            if rec is None:
                continue
            for f in rec.files:
                if not f.path:
                    continue
                info = infos.get(self.path(f.path))
                stamp = [
                    f.sha256,
                    info.size if info else -1,
                    info.mtime_ns if info and info.mtime_ns is not None else -1,
                ]
                if cache.get(f.path) != stamp or info is None:
                    self._verified_bytes(rec, f, is_step)
                    changed = True
                fresh[f.path] = stamp
        if changed or set(cache) != set(fresh):
            self.write_atomic(cache_path, json.dumps(fresh).encode())

    def verify_stage(self, stage: str) -> list[str]:
        """Check every committed file of a stage against its record; the problems found."""
        plan = self.read_plan(stage)
        if plan is None:
            return []
        problems = []
        pairs = [(fp, False) for _, fp in plan.units] + [(fp, True) for _, fp in plan.steps]
        for fp, is_step in pairs:
            try:
                rec = self.read_record(stage, fp, is_step)
            except CorruptData as exc:
                problems.append(str(exc))
                continue
            if rec is None:
                continue
            for f in rec.files:
                if not f.path:
                    continue
                try:
                    self._verified_bytes(rec, f, is_step)
                except CorruptData as exc:
                    problems.append(str(exc))
        return problems
