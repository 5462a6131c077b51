"""The ``ingest`` stage: read a collection, check it, and write normalized tables.

Sources (``format``):

- ``beir``: a folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/*.tsv``;
- ``jsonl`` / ``parquet``: files named by ``corpus``, ``queries``, ``qrels``, with column
  names mapped by ``columns`` (qrels may also be a TSV);
- ``hf``: a local ``datasets`` folder written by ``save_to_disk``: a DatasetDict with
  ``corpus``/``queries``/``qrels`` splits, or a folder holding one saved Dataset per table;
- ``auto`` (default) picks one of these from what the folder holds.

Outputs ``corpus``, ``queries``, ``qrels``, ``exclusions`` (pairs that must never be used as
positives or negatives, e.g. Cranfield's ``qrels/source_docs.tsv``) and ``findings`` (every
problem found, with file, line and what was done about it).

Every check has a policy: ``error`` stops with a message naming the file and line,
``reject`` drops the row into ``rejects`` with the reason, ``keep`` keeps it and records the
finding. :func:`read_collection` is the check logic alone; ``rankmill validate`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from rankmill.config import Model, StageParams
from rankmill.errors import ConfigError, IngestError
from rankmill.manifest import Counters
from rankmill.schemas import CORPUS, EXCLUSIONS, QRELS, QUERIES
from rankmill.stage import Stage, UnitOutput, WorkUnit, rejects_table

log = logging.getLogger(__name__)

Policy = Literal["error", "reject", "keep"]

FINDINGS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("table", pa.string()),
        pa.field("row_id", pa.string()),
        pa.field("file", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("action", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

# Checks, what each finds, and the default policy.
CHECKS: dict[str, str] = {
    "malformed_row": "a line that is not a JSON object, or a row missing its id or text column",
    "invalid_utf8": "a line that is not valid UTF-8",
    "empty_text": "a document or query whose text is empty or only whitespace",
    "duplicate_id": "an id seen before in the same table (the first one is kept)",
    "duplicate_text": "a document whose text equals an earlier document's (different id)",
    "unknown_query": "a judgment naming a query id that is not in the queries",
    "unknown_doc": "a judgment naming a document id that is not in the corpus",
    "rejected_ref": "a judgment naming a query or document that was rejected",
    "bad_score": "a judgment score that is not an integer, or is negative",
    "duplicate_qrel": "the same (query, document) judged twice (the first one is kept)",
    "id_collision": "a query id equal to a document id (matters when ids share one namespace)",
    "unjudged_query": "a query with no relevant judgment (kept: synthetic data may use it)",
}


class Columns(Model):
    """Column names of the source files, for jsonl/parquet/hf sources."""

    doc_id: str = Field("_id", description="Corpus id column.")
    title: str | None = Field("title", description="Corpus title column (None: no titles).")
    text: str = Field("text", description="Corpus text column.")
    query_id: str = Field("_id", description="Queries id column.")
    query_text: str = Field("text", description="Queries text column.")
    qrels_query_id: str = Field("query-id", description="Qrels query id column.")
    qrels_doc_id: str = Field("corpus-id", description="Qrels document id column.")
    qrels_score: str = Field("score", description="Qrels score column.")


class Policies(Model):
    """What to do with each finding: error (stop, naming file and line), reject (drop the row
    with the reason) or keep (keep the row, record the finding)."""

    malformed_row: Policy = Field("error", description=CHECKS["malformed_row"])
    invalid_utf8: Policy = Field("reject", description=CHECKS["invalid_utf8"])
    empty_text: Policy = Field("reject", description=CHECKS["empty_text"])
    duplicate_id: Policy = Field("reject", description=CHECKS["duplicate_id"])
    duplicate_text: Policy = Field("keep", description=CHECKS["duplicate_text"])
    unknown_query: Policy = Field("reject", description=CHECKS["unknown_query"])
    unknown_doc: Policy = Field("reject", description=CHECKS["unknown_doc"])
    rejected_ref: Policy = Field("reject", description=CHECKS["rejected_ref"])
    bad_score: Policy = Field("reject", description=CHECKS["bad_score"])
    duplicate_qrel: Policy = Field("reject", description=CHECKS["duplicate_qrel"])
    id_collision: Policy = Field("keep", description=CHECKS["id_collision"])
    unjudged_query: Policy = Field("keep", description=CHECKS["unjudged_query"])


class IngestParams(StageParams):
    not_fingerprinted: ClassVar[frozenset[str]] = StageParams.not_fingerprinted | {
        "max_findings_logged"
    }

    source: str = Field(..., description="Folder (beir, hf) or corpus file (jsonl, parquet).")
    format: Literal["auto", "beir", "jsonl", "parquet", "hf"] = Field(
        "auto", description="Source format; auto detects beir and hf folders."
    )
    queries: str | None = Field(
        None, description="Queries file for jsonl/parquet sources (relative to the pipeline)."
    )
    qrels: list[str] = Field(
        default_factory=list,
        description="Qrels files for jsonl/parquet sources (tsv, jsonl or parquet).",
    )
    qrels_splits: list[str] | None = Field(
        None,
        description="BEIR qrels splits to read (e.g. [train]); default: every qrels/*.tsv "
        "that is not an exclusion file.",
    )
    exclusion_files: list[str] = Field(
        default_factory=lambda: ["source_docs.tsv"],
        description="Qrels files (by name) whose pairs are exclusions: documents never to be "
        "used as negatives or ordinary positives for that query.",
    )
    columns: Columns = Field(default_factory=Columns, description="Source column names.")
    policies: Policies = Field(default_factory=Policies, description="What each check does.")
    strict: bool = Field(
        False, description="Make every check an error (overrides policies except 'keep' ones)."
    )
    max_findings_logged: int = Field(20, ge=0, description="Findings listed in the log.")


@dataclass
class Finding:
    kind: str
    table: str
    row_id: str | None
    file: str | None
    line: int | None
    detail: str
    action: str = ""

    def where(self) -> str:
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        return self.file or self.table


@dataclass
class Collection:
    """What :func:`read_collection` read, and everything it found on the way."""

    corpus: pa.Table
    queries: pa.Table
    qrels: pa.Table
    exclusions: pa.Table
    findings: list[Finding] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def findings_table(self) -> pa.Table:
        cols: dict[str, list[Any]] = {f.name: [] for f in FINDINGS}
        for f in self.findings:
            for name in cols:
                cols[name].append(getattr(f, name))
        return pa.table(cols, schema=FINDINGS)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for f in self.findings:
            out[f.kind] += 1
        return dict(out)


# -- reading rows -----------------------------------------------------------------------------
@dataclass
class _Row:
    data: dict[str, Any]
    file: str
    line: int  # 1-based line, or row number for columnar sources


def _lines(path: Path, sink: _Sink, table: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of a text file's non-blank lines, decoded strictly: a line
    that is not UTF-8 is a finding, not a crash and not a silent replacement character."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                detail = f"byte {exc.start}: {exc.reason}"
                sink.find("invalid_utf8", table, None, str(path), lineno, detail)


def _jsonl_rows(path: Path, sink: _Sink, table: str) -> list[_Row]:
    rows = []
    for lineno, text in _lines(path, sink, table):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            sink.find("malformed_row", table, None, str(path), lineno, f"not JSON: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            sink.find("malformed_row", table, None, str(path), lineno, "not a JSON object")
            continue
        rows.append(_Row(obj, str(path), lineno))
    return rows


def _tsv_rows(path: Path, sink: _Sink, table: str, cols: Columns) -> list[_Row]:
    rows = []
    header: list[str] | None = None
    for lineno, text in _lines(path, sink, table):
        parts = text.split("\t")
        if header is None:
            if cols.qrels_query_id in parts or "query-id" in parts or "query_id" in parts:
                header = parts
                continue
            header = [cols.qrels_query_id, cols.qrels_doc_id, cols.qrels_score]
            if len(parts) == 4:  # TREC qrels: qid iteration docid rel
                header = [cols.qrels_query_id, "iteration", cols.qrels_doc_id, cols.qrels_score]
        if len(parts) != len(header):
            sink.find(
                "malformed_row",
                table,
                None,
                str(path),
                lineno,
                f"expected {len(header)} tab-separated fields, got {len(parts)}",
            )
            continue
        rows.append(_Row(dict(zip(header, parts, strict=False)), str(path), lineno))
    return rows


def _columnar_rows(table_data: pa.Table, name: str) -> list[_Row]:
    return [_Row(r, name, i + 1) for i, r in enumerate(table_data.to_pylist())]


def _read_any(path: Path, sink: _Sink, table: str, cols: Columns) -> list[_Row]:
    suffix = path.name.lower()
    if suffix.endswith(".jsonl") or suffix.endswith(".json"):
        return _jsonl_rows(path, sink, table)
    if suffix.endswith(".parquet"):
        return _columnar_rows(pq.read_table(path), str(path))
    if suffix.endswith(".tsv") or suffix.endswith(".txt"):
        return _tsv_rows(path, sink, table, cols)
    raise ConfigError(f"{path}: unsupported file type (use .jsonl, .parquet or .tsv)")


class _Sink:
    """Collects findings and applies the policy of each."""

    def __init__(self, policies: Policies, strict: bool, stage: str = "ingest"):
        self.policies = policies
        self.strict = strict
        self.stage = stage
        self.findings: list[Finding] = []
        self.rejects: list[dict[str, Any]] = []

    def policy(self, kind: str) -> str:
        p = getattr(self.policies, kind)
        if self.strict and p == "reject":
            return "error"
        return p

    def find(
        self,
        kind: str,
        table: str,
        row_id: str | None,
        file: str | None,
        line: int | None,
        detail: str,
        *,
        query_id: str | None = None,
        doc_id: str | None = None,
        add_reject: bool = True,
    ) -> str:
        """Record a finding; returns the action taken ('reject' or 'keep')."""
        action = self.policy(kind)
        f = Finding(kind, table, row_id, file, line, detail, action)
        self.findings.append(f)
        # A row leaves once: later findings on an already rejected row are recorded only.
        if action == "reject" and add_reject:
            self.rejects.append(
                {
                    "table": table,
                    "row_id": row_id if row_id is not None else f"{Path(file or '').name}:{line}",
                    "query_id": query_id,
                    "doc_id": doc_id,
                    "reason": kind,
                    "detail": f"{f.where()}: {detail}",
                }
            )
        return action

    def at(
        self, row: _Row, kind: str, table: str, row_id: str | None, detail: str, **kw: Any
    ) -> str:
        """:meth:`find` for a finding on ``row``, located at its file and line."""
        return self.find(kind, table, row_id, row.file, row.line, detail, **kw)

    def raise_errors(self) -> None:
        errors = [f for f in self.findings if f.action == "error"]
        if not errors:
            return
        lines = [f"  {f.where()}: {f.kind}: {f.detail}" for f in errors[:20]]
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        kinds = sorted({f.kind for f in errors})
        tolerate = ", ".join(f"--set stages.{self.stage}.policies.{k}=reject" for k in kinds)
        if self.strict:
            tolerate += f" --set stages.{self.stage}.strict=false"
        raise IngestError(
            f"{self.stage} found {len(errors)} problem(s) that stop the run:\n"
            + "\n".join(lines)
            + more
            + f"\nFix the data, or drop such rows into the rejects table with {tolerate}"
        )


def _str_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    return s or None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


# -- locating files -----------------------------------------------------------------------------
@dataclass
class _Files:
    corpus: Any
    queries: Any | None
    qrels: list[Any]
    exclusions: list[Any]


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return "beir"
        if (path / "dataset_dict.json").is_file() or (
            path / "corpus" / "dataset_info.json"
        ).is_file():
            return "hf"
        raise ConfigError(
            f"{path}: cannot tell the format (no corpus.jsonl, no save_to_disk dataset); set "
            "stages.ingest.format"
        )
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ConfigError(f"{path}: cannot tell the format; set stages.ingest.format")


def _locate(params: IngestParams, source: Path, resolve: Any) -> tuple[str, _Files]:
    if not source.exists():
        raise ConfigError(f"stages.ingest.source: {source} does not exist")
    fmt = params.format if params.format != "auto" else detect_format(source)
    excl = set(params.exclusion_files)
    if fmt == "beir":
        qdir = source / "qrels"
        tsvs = sorted(qdir.glob("*.tsv")) if qdir.is_dir() else []
        if params.qrels_splits is not None:
            wanted = {f"{s}.tsv" for s in params.qrels_splits}
            missing = wanted - {p.name for p in tsvs}
            if missing:
                raise ConfigError(
                    f"stages.ingest.qrels_splits: {sorted(missing)} not in {qdir} "
                    f"(found {[p.name for p in tsvs]})"
                )
            qrels = [p for p in tsvs if p.name in wanted]
        else:
            qrels = [p for p in tsvs if p.name not in excl]
        queries = source / "queries.jsonl"
        return fmt, _Files(
            corpus=source / "corpus.jsonl",
            queries=queries if queries.is_file() else None,
            qrels=qrels,
            exclusions=[p for p in tsvs if p.name in excl],
        )
    if fmt in ("jsonl", "parquet"):
        qrels = [Path(resolve(q)) for q in params.qrels]
        return fmt, _Files(
            corpus=source,
            queries=Path(resolve(params.queries)) if params.queries else None,
            qrels=[q for q in qrels if q.name not in excl],
            exclusions=[q for q in qrels if q.name in excl],
        )
    return fmt, _Files(corpus=source, queries=None, qrels=[], exclusions=[])


def _hf_tables(source: Path) -> dict[str, pa.Table]:
    import datasets

    out: dict[str, pa.Table] = {}
    if (source / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(source))
        for name in dd:
            out[name] = dd[name].data.table
    else:
        for name in ("corpus", "queries", "qrels"):
            if (source / name).is_dir():
                out[name] = datasets.load_from_disk(str(source / name)).data.table
    if "corpus" not in out:
        raise ConfigError(f"{source}: a save_to_disk dataset needs a 'corpus' split or folder")
    return out


def file_hashes(params: IngestParams, resolve: Any) -> dict[str, str]:
    """sha256 of every file the ingest would read (its input fingerprint)."""
    source = Path(resolve(params.source))
    _, files = _locate(params, source, resolve)
    paths: list[Path] = []
    if source.is_dir() and (params.format == "hf" or detect_format(source) == "hf"):
        paths = sorted(p for p in source.rglob("*") if p.is_file())
    else:
        paths = [files.corpus] + ([files.queries] if files.queries else [])
        paths += list(files.qrels) + list(files.exclusions)
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[str(p)] = h.hexdigest()
    return out


# -- the checks -------------------------------------------------------------------------------
def read_collection(
    params: IngestParams, resolve: Any = lambda p: p, stage: str = "ingest"
) -> Collection:
    """Read and check a collection; raises IngestError for findings whose policy is error
    (its message names the pipeline's ``stage`` in the settings that would tolerate them)."""
    source = Path(resolve(params.source))
    fmt, files = _locate(params, source, resolve)
    cols = params.columns
    sink = _Sink(params.policies, params.strict, stage)

    if fmt == "hf":
        hf = _hf_tables(source)
        corpus_rows = _columnar_rows(hf["corpus"], f"{source}[corpus]")
        query_rows = _columnar_rows(hf["queries"], f"{source}[queries]") if "queries" in hf else []
        qrel_rows = _columnar_rows(hf["qrels"], f"{source}[qrels]") if "qrels" in hf else []
        excl_rows: list[_Row] = []
        read_files = [str(source)]
    else:
        corpus_rows = _read_any(Path(files.corpus), sink, "corpus", cols)
        query_rows = _read_any(Path(files.queries), sink, "queries", cols) if files.queries else []
        qrel_rows = [r for p in files.qrels for r in _read_any(Path(p), sink, "qrels", cols)]
        excl_rows = [r for p in files.exclusions for r in _read_any(Path(p), sink, "qrels", cols)]
        read_files = [str(p) for p in [files.corpus, files.queries, *files.qrels] if p]

    # corpus
    doc_ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen_docs: dict[str, int] = {}
    seen_text: dict[str, str] = {}
    rejected_docs: set[str] = set()
    for r in corpus_rows:
        did = _str_id(r.data.get(cols.doc_id))
        if did is None or cols.text not in r.data:
            missing = cols.doc_id if did is None else cols.text
            sink.at(r, "malformed_row", "corpus", None, f"missing {missing!r}")
            continue
        text = _text(r.data.get(cols.text))
        title = _text(r.data.get(cols.title)) if cols.title else ""
        if did in seen_docs:
            act = sink.at(
                r,
                "duplicate_id",
                "corpus",
                did,
                f"doc id {did!r} first seen on line {seen_docs[did]}",
                doc_id=did,
            )
            if act == "reject":
                continue
        rejected = False
        norm = " ".join((title + " " + text).split()).lower()
        if norm in seen_text and seen_text[norm] != did:
            first = seen_text[norm]
            act = sink.at(
                r,
                "duplicate_text",
                "corpus",
                did,
                f"same title and text as doc {first!r}" + ("" if norm else " (both empty)"),
                doc_id=did,
            )
            rejected = act == "reject"
        if not text.strip():
            act = sink.at(
                r,
                "empty_text",
                "corpus",
                did,
                "empty document text" + (f" (title: {title[:60]!r})" if title.strip() else ""),
                doc_id=did,
                add_reject=not rejected,
            )
            rejected = rejected or act == "reject"
        seen_text.setdefault(norm, did)
        seen_docs.setdefault(did, r.line)
        if rejected:
            rejected_docs.add(did)
            continue
        doc_ids.append(did)
        titles.append(title)
        texts.append(text)
    kept_docs = set(doc_ids)

    # queries
    q_ids: list[str] = []
    q_texts: list[str] = []
    seen_q: dict[str, int] = {}
    rejected_q: set[str] = set()
    collisions: list[str] = []
    for r in query_rows:
        qid = _str_id(r.data.get(cols.query_id))
        if qid is None or cols.query_text not in r.data:
            missing = cols.query_id if qid is None else cols.query_text
            sink.at(r, "malformed_row", "queries", None, f"missing {missing!r}")
            continue
        text = _text(r.data.get(cols.query_text))
        if qid in seen_q:
            act = sink.at(
                r,
                "duplicate_id",
                "queries",
                qid,
                f"query id {qid!r} first seen on line {seen_q[qid]}",
                query_id=qid,
            )
            if act == "reject":
                continue
        if not text.strip():
            act = sink.at(r, "empty_text", "queries", qid, "empty query text", query_id=qid)
            if act == "reject":
                rejected_q.add(qid)
                seen_q.setdefault(qid, r.line)
                continue
        if qid in kept_docs:
            collisions.append(qid)
            if sink.policy("id_collision") != "keep":
                act = sink.at(
                    r,
                    "id_collision",
                    "queries",
                    qid,
                    f"query id {qid!r} is also a document id",
                    query_id=qid,
                )
                if act == "reject":
                    continue
        seen_q.setdefault(qid, r.line)
        q_ids.append(qid)
        q_texts.append(text)
    kept_q = set(q_ids)
    if collisions and sink.policy("id_collision") == "keep":
        # Usual in BEIR data (both numbered from 1); one summary finding, not one per query.
        sink.find(
            "id_collision",
            "queries",
            None,
            None,
            None,
            f"{len(collisions)} query ids are also document ids "
            f"(e.g. {', '.join(repr(c) for c in collisions[:3])}); harmless unless the ids "
            "end up in one namespace",
        )

    # qrels and exclusions
    def pairs(rows: list[_Row], table: str, allow_negative: bool) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        seen: dict[tuple[str, str], int] = {}
        for r in rows:
            qid = _str_id(r.data.get(cols.qrels_query_id))
            did = _str_id(r.data.get(cols.qrels_doc_id))
            if qid is None or did is None:
                sink.at(r, "malformed_row", table, None, "missing query or document id")
                continue
            row_id = f"{qid}:{did}"
            raw_score = r.data.get(cols.qrels_score, 1 if table == "exclusions" else None)
            try:
                score_f = float(raw_score)  # type: ignore[arg-type]
                ok = score_f.is_integer() and (allow_negative or score_f >= 0)
            except (TypeError, ValueError):
                ok, score_f = False, float("nan")
            if not ok:
                act = sink.at(
                    r,
                    "bad_score",
                    table,
                    row_id,
                    f"score {raw_score!r} is not a non-negative integer",
                    query_id=qid,
                    doc_id=did,
                )
                if act == "reject":
                    continue
                score_f = 0.0 if math.isnan(score_f) else score_f
            if qid in rejected_q or did in rejected_docs:
                what = f"query {qid!r}" if qid in rejected_q else f"document {did!r}"
                act = sink.at(
                    r,
                    "rejected_ref",
                    table,
                    row_id,
                    f"{what} was rejected",
                    query_id=qid,
                    doc_id=did,
                )
                if act == "reject":
                    continue
            elif qid not in kept_q and query_rows:
                act = sink.at(
                    r,
                    "unknown_query",
                    table,
                    row_id,
                    f"query id {qid!r} is not in the queries",
                    query_id=qid,
                    doc_id=did,
                )
                if act == "reject":
                    continue
            elif did not in kept_docs:
                act = sink.at(
                    r,
                    "unknown_doc",
                    table,
                    row_id,
                    f"document id {did!r} is not in the corpus",
                    query_id=qid,
                    doc_id=did,
                )
                if act == "reject":
                    continue
            key = (qid, did)
            if key in seen:
                act = sink.at(
                    r,
                    "duplicate_qrel",
                    table,
                    row_id,
                    f"({qid}, {did}) first judged on line {seen[key]}",
                    query_id=qid,
                    doc_id=did,
                )
                if act == "reject":
                    continue
            seen.setdefault(key, r.line)
            out.append((qid, did, int(score_f)))
        return out

    qrels = pairs(qrel_rows, "qrels", allow_negative=False)
    excl = pairs(excl_rows, "exclusions", allow_negative=True)

    judged = {q for q, _, s in qrels if s > 0}
    if qrel_rows:
        for qid in q_ids:
            if qid not in judged:
                sink.find(
                    "unjudged_query",
                    "queries",
                    qid,
                    None,
                    None,
                    "no relevant judgment",
                    query_id=qid,
                )

    sink.raise_errors()
    return Collection(
        corpus=pa.table({"doc_id": doc_ids, "title": titles, "text": texts}, schema=CORPUS),
        queries=pa.table(
            {
                "query_id": q_ids,
                "text": q_texts,
                "source": ["user"] * len(q_ids),
                "source_doc_id": [None] * len(q_ids),
            },
            schema=QUERIES,
        ),
        qrels=pa.table(
            {
                "query_id": [q for q, _, _ in qrels],
                "doc_id": [d for _, d, _ in qrels],
                "score": [s for _, _, s in qrels],
            },
            schema=QRELS,
        ),
        exclusions=pa.table(
            {
                "query_id": [q for q, _, _ in excl],
                "doc_id": [d for _, d, _ in excl],
                "reason": ["source_doc"] * len(excl),
            },
            schema=EXCLUSIONS,
        ),
        findings=sink.findings,
        rejects=sink.rejects,
        files=read_files,
    )


class IngestStage(Stage):
    """Reads a collection into ``corpus``, ``queries``, ``qrels`` and ``exclusions``."""

    name = "ingest"
    version = "1"
    Params = IngestParams
    outputs: ClassVar[dict[str, pa.Schema]] = {
        "corpus": CORPUS,
        "queries": QUERIES,
        "qrels": QRELS,
        "exclusions": EXCLUSIONS,
        "findings": FINDINGS,
    }
    params: IngestParams

    def fingerprint_extra(self) -> dict[str, Any]:
        hashes = file_hashes(self.params, self.ctx.resolve_path)
        # Paths do not change outputs; contents do.
        return {"files": sorted(hashes.values())}

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        # One unit; the file hashes are already in the stage fingerprint (no second pass).
        return [WorkUnit("00000", "collection")]

    def process(self, unit: WorkUnit) -> UnitOutput:
        coll = read_collection(self.params, self.ctx.resolve_path, self.ctx.stage_name)
        for f in coll.findings[: self.params.max_findings_logged]:
            log.warning("ingest: %s: %s: %s (%s)", f.where(), f.kind, f.detail, f.action)
        counters = Counters(
            rows_in=coll.corpus.num_rows
            + coll.queries.num_rows
            + coll.qrels.num_rows
            + len(coll.rejects),
            rows_out=coll.corpus.num_rows
            + coll.queries.num_rows
            + coll.qrels.num_rows
            + coll.exclusions.num_rows,
        )
        for kind, n in coll.counts().items():
            counters.extra[f"finding:{kind}"] = float(n)
        return UnitOutput(
            {
                "corpus": coll.corpus,
                "queries": coll.queries,
                "qrels": coll.qrels,
                "exclusions": coll.exclusions,
                "findings": coll.findings_table(),
                "rejects": rejects_table(coll.rejects, self.ctx.stage_name, unit.unit_id),
            },
            counters,
        )
