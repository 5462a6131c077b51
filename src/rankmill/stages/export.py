"""The ``export`` stage: training views as Parquet shards, one folder per view.

Each unit builds one view (:mod:`rankmill.views`) from the run's tables and commits it as
shards; the ``finalize`` step writes them as files named the way the Hub and ``datasets``
expect, ``<view>/<split>-00000-of-00002.parquet``, plus ``flagembedding/<split>.jsonl`` (the
JSONL FlagEmbedding reads), ``<view>/disk/`` (``datasets.load_from_disk``) when
``save_to_disk`` is on, and ``manifest.json`` (rows and sha256 of every file). Views the run
has no tables for (listwise SFT without a listwise teacher, reasoning views without
reasoning) are listed in the ``views`` table with the reason they were skipped.

::

    stages:
      export:
        validation_fraction: 0.1
        num_negatives: 4            # n of the n-tuple views
        views: [n-tuple, pointwise, flagembedding]   # default: every view

Read what it wrote with :func:`export_files` (``rankmill publish`` and ``rankmill report``
do), or look under ``<run-dir>/stages/export/files/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from rankmill.config import StageParams
from rankmill.manifest import Counters, RunDir
from rankmill.schemas import CORPUS, LABELS, NEGATIVES, QRELS, QUERIES
from rankmill.stage import Stage, StepContext, StepOutput, UnitOutput, WorkUnit, content_key
from rankmill.views import (
    VIEW_NAMES,
    ViewInputs,
    ViewOptions,
    build_views,
)

# One committed shard of a view: its Parquet bytes, produced by a unit, written by finalize.
VIEW_SHARDS = pa.schema(
    [
        pa.field("view", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("num_shards", pa.int32(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("parquet", pa.large_binary(), nullable=False),
    ]
)

# What became of each view: built (rows per split) or skipped (and why).
VIEWS = pa.schema(
    [
        pa.field("view", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "built" | "skipped"
        pa.field("reason", pa.string()),
        pa.field("train_rows", pa.int64()),
        pa.field("validation_rows", pa.int64()),
        pa.field("columns", pa.list_(pa.string())),
    ]
)

# Every file finalize wrote, with its rows and sha256 (also as manifest.json).
FILES = pa.schema(
    [
        pa.field("view", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("path", pa.string(), nullable=False),  # relative: <view>/<split>-....parquet
        pa.field("format", pa.string(), nullable=False),  # parquet | jsonl | disk
        pa.field("rows", pa.int64()),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
    ]
)

# Tables of later stages that views use when they are there (only their key is checked here;
# the columns a view needs are checked when it is built, and a view that lacks them is
# skipped with the reason).
KEYED = pa.schema([pa.field("query_id", pa.string())])
# teacher and judge tables a view can use: input name -> ViewInputs field
LATER_TABLES = {
    "judgments": "judgments",  # judge ensemble soft labels
    "relabels": "relabels",  # negatives the judges found relevant
    "consensus": "consensus",  # pointwise teacher: one label (and kept reasoning) per pair
    "reasoning": "reasoning",  # pointwise teacher reasoning per sample
    "windows": "windows",  # listwise teacher windows with reasoning
    "rankings": "rankings",  # listwise teacher final rankings
}


class ExportParams(StageParams):
    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted

    views: list[str] | None = Field(
        None, description=f"Views to write (default: every one: {', '.join(VIEW_NAMES)})."
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of queries in the validation split (by query)."
    )
    num_negatives: int | None = Field(
        None, ge=1, description="n of the n-tuple views (default: the fewest any query has)."
    )
    query_prompt: str = Field("", description="FlagEmbedding's `prompt` for the query side.")
    rows_per_shard: int = Field(50_000, ge=1, description="Rows per Parquet shard.")
    listwise_max_passages: int = Field(20, ge=2, description="Passages per listwise example.")
    listwise_doc_chars: int = Field(300, ge=20, description="Characters per listwise passage.")
    save_to_disk: bool = Field(
        False, description="Also write each view as a DatasetDict for datasets.load_from_disk."
    )

    @field_validator("views")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            unknown = [x for x in v if x not in VIEW_NAMES]
            if unknown:
                raise ValueError(f"unknown views {unknown}; known: {', '.join(VIEW_NAMES)}")
        return v


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.parquet"


class ExportStage(Stage):
    name = "export"
    version = "1"
    Params = ExportParams
    inputs: ClassVar[dict[str, pa.Schema]] = {"corpus": CORPUS, "queries": QUERIES}
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {
        "qrels": QRELS,
        "negatives": NEGATIVES,
        "labels": LABELS,
        **{name: KEYED for name in LATER_TABLES},
    }
    outputs: ClassVar[dict[str, pa.Schema]] = {
        "view_shards": VIEW_SHARDS,
        "views": VIEWS,
        "files": FILES,
    }

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        return {}  # units read what they need themselves

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        names = self.params.views or list(VIEW_NAMES)
        return [
            WorkUnit(unit_id=f"{i:05d}-{v}", key=content_key("view", v), meta={"view": v})
            for i, v in enumerate(names)
        ]

    def _inputs(self) -> ViewInputs:
        def opt(name: str) -> pa.Table | None:
            return self.ctx.read_input(name) if self.ctx.has_input(name) else None

        return ViewInputs(
            corpus=self.ctx.read_input("corpus"),
            queries=self.ctx.read_input("queries"),
            qrels=opt("qrels"),
            negatives=opt("negatives"),
            labels=opt("labels"),
            **{field: opt(name) for name, field in LATER_TABLES.items()},
        )

    def _options(self, view: str) -> ViewOptions:
        p = self.params
        return ViewOptions(
            seed=self.ctx.seed,
            validation_fraction=p.validation_fraction,
            num_negatives=p.num_negatives,
            query_prompt=p.query_prompt,
            listwise_max_passages=p.listwise_max_passages,
            listwise_doc_chars=p.listwise_doc_chars,
            views=(view,),
        )

    def process(self, unit: WorkUnit) -> UnitOutput:
        view = unit.meta["view"]
        built, skipped = build_views(self._inputs(), self._options(view))
        counters = Counters()
        shards: dict[str, list[Any]] = {f.name: [] for f in VIEW_SHARDS}
        if view in skipped:
            info = {"view": view, "status": "skipped", "reason": skipped[view]}
            counters.extra["views_skipped"] = 1.0  # not a row: a view this run cannot build
        else:
            splits = built[view]
            info = {
                "view": view,
                "status": "built",
                "train_rows": splits.get("train", pa.table({})).num_rows,
                "validation_rows": splits["validation"].num_rows if "validation" in splits else 0,
                "columns": splits["train"].column_names,
            }
            for split, table in splits.items():
                if table.num_rows == 0:
                    continue  # an empty Parquet file breaks datasets' reader: no file at all
                step = self.params.rows_per_shard
                n = max(1, -(-table.num_rows // step))
                for i in range(n):
                    part = table.slice(i * step, step)
                    for k, v in (
                        ("view", view),
                        ("split", split),
                        ("shard", i),
                        ("num_shards", n),
                        ("rows", part.num_rows),
                        ("parquet", _parquet_bytes(part)),
                    ):
                        shards[k].append(v)
                counters.rows_out += table.num_rows
        return UnitOutput(
            tables={
                "view_shards": pa.table(shards, schema=VIEW_SHARDS),
                "views": pa.Table.from_pylist([info], schema=VIEWS),
            },
            counters=counters,
        )

    def finalize(self, step: StepContext) -> StepOutput:
        shards = step.read_output("view_shards")
        views = step.read_output("views")
        files: dict[str, str] = {}
        rows: list[dict[str, Any]] = []

        def add(rel: str, data: bytes, view: str, split: str | None, fmt: str, n: int | None):
            path = os.path.join(step.work_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            files[rel] = path
            rows.append(
                {
                    "view": view,
                    "split": split,
                    "path": rel,
                    "format": fmt,
                    "rows": n,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                }
            )

        by_view: dict[str, dict[str, list[pa.Table]]] = {}
        for r in shards.to_pylist() if shards is not None else []:
            rel = f"{r['view']}/{shard_name(r['split'], r['shard'], r['num_shards'])}"
            add(rel, r["parquet"], r["view"], r["split"], "parquet", r["rows"])
            table = pq.read_table(pa.BufferReader(r["parquet"]))
            by_view.setdefault(r["view"], {}).setdefault(r["split"], []).append(table)
        for split, parts in by_view.get("flagembedding", {}).items():
            table = pa.concat_tables(parts)
            lines = [json.dumps(row, ensure_ascii=False) for row in table.to_pylist()]
            data = ("\n".join(lines) + "\n").encode() if lines else b""
            add(f"flagembedding/{split}.jsonl", data, "flagembedding", split, "jsonl", len(lines))
        if self.params.save_to_disk:
            for view, splits in by_view.items():
                self._save_to_disk(step.work_dir, view, splits, add)
        manifest = {
            "views": views.to_pylist() if views is not None else [],
            "files": rows,
        }
        add(
            "manifest.json",
            json.dumps(manifest, indent=1, sort_keys=True).encode(),
            "manifest",
            None,
            "json",
            None,
        )
        rows.pop()  # manifest.json does not list itself
        counters = Counters(rows_out=len(rows))
        return StepOutput(
            tables={"files": pa.Table.from_pylist(rows, schema=FILES)},
            files=files,
            counters=counters,
        )

    @staticmethod
    def _save_to_disk(work_dir: str, view: str, splits: dict[str, list[pa.Table]], add) -> None:
        import tempfile

        import datasets

        datasets.disable_progress_bars()
        dd = datasets.DatasetDict(
            {s: datasets.Dataset(pa.concat_tables(parts)) for s, parts in splits.items()}
        )
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            dd.save_to_disk(tmp)
            for root, _, names in os.walk(tmp):
                for name in sorted(names):
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                    with open(full, "rb") as f:
                        data = f.read()
                    split = rel.split("/", 1)[0] if "/" in rel else None
                    add(f"{view}/disk/{rel}", data, view, split, "disk", None)


def export_files(run_dir: str, stage: str = "export") -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files an export stage's finalize step committed, verified
    against their sha256: ``(manifest, {relative path: bytes})``."""
    from rankmill.errors import ManifestError

    rd = RunDir(run_dir)
    plan = rd.read_plan(stage)
    if plan is None or not rd.is_complete(stage):
        raise ManifestError(
            f"{run_dir}: stage {stage!r} is not complete; run the pipeline with an export stage"
        )
    fp = dict(plan.steps).get("finalize")
    rec = rd.committed(stage, fp, step=True) if fp else None
    if rec is None:
        raise ManifestError(f"{run_dir}: stage {stage!r} has no committed finalize step")
    manifest = json.loads(rd.read_file(rec, "manifest.json"))
    data = {f["path"]: rd.read_file(rec, f["path"]) for f in manifest["files"]}
    return manifest, data


def export_dir(run_dir: str, stage: str = "export") -> str:
    """The local folder holding an export's files (``<view>/<split>-*.parquet``,
    ``manifest.json``) as committed, for ``datasets.load_dataset("parquet", ...)``."""
    from rankmill.errors import ManifestError

    rd = RunDir(run_dir)
    if not rd.local:
        raise ManifestError(f"{run_dir} is not local: read its files with export_files()")
    plan = rd.read_plan(stage)
    fp = dict(plan.steps).get("finalize") if plan else None
    rec = rd.committed(stage, fp, step=True) if fp else None
    entry = rec.file("manifest.json") if rec else None
    if entry is None:
        raise ManifestError(f"{run_dir}: stage {stage!r} has no committed export")
    rd.read_file(rec, "manifest.json")  # verifies it
    return os.path.dirname(rd.path(entry.path))
