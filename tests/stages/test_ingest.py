"""Ingest: every bad-input case gives its error (file and line) or its recorded reject."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rankmill.cli import app
from rankmill.errors import ConfigError, IngestError
from rankmill.stages.ingest import IngestParams, read_collection

DOCS = [
    {"_id": "d1", "title": "Bees", "text": "Honey bees make honey."},
    {"_id": "d2", "title": "Volcanoes", "text": "Lava flows downhill."},
    {"_id": "d3", "title": "Bread", "text": "Yeast makes dough rise."},
]
QUERIES = [{"_id": "q1", "text": "who makes honey"}, {"_id": "q2", "text": "why does dough rise"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t2\n"


def beir(
    tmp_path: Path,
    docs=DOCS,
    queries=QUERIES,
    qrels=QRELS,
    raw_corpus: bytes | None = None,
    extra_qrels: dict[str, str] | None = None,
) -> Path:
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    if raw_corpus is None:
        raw_corpus = "".join(json.dumps(x) + "\n" for x in docs).encode()
    (d / "corpus.jsonl").write_bytes(raw_corpus)
    (d / "queries.jsonl").write_text("".join(json.dumps(x) + "\n" for x in queries))
    (d / "qrels" / "test.tsv").write_text(qrels)
    for name, text in (extra_qrels or {}).items():
        (d / "qrels" / name).write_text(text)
    return d


def read(path: Path, **kw):
    return read_collection(IngestParams(source=str(path), **kw))


def reasons(coll) -> list[str]:
    return sorted(r["reason"] for r in coll.rejects)


def test_clean_beir_folder(tmp_path):
    c = read(beir(tmp_path))
    assert c.corpus.column("doc_id").to_pylist() == ["d1", "d2", "d3"]
    assert c.queries.column("source").to_pylist() == ["user", "user"]
    assert c.qrels.to_pylist() == [
        {"query_id": "q1", "doc_id": "d1", "score": 1},
        {"query_id": "q2", "doc_id": "d3", "score": 2},
    ]
    assert c.rejects == [] and c.findings == []


def test_duplicate_doc_id_rejected_or_error_with_line(tmp_path):
    docs = DOCS + [{"_id": "d2", "title": "Again", "text": "Other text."}]
    c = read(beir(tmp_path, docs=docs))
    assert reasons(c) == ["duplicate_id"] and c.corpus.num_rows == 3
    assert "corpus.jsonl:4" in c.rejects[0]["detail"]
    with pytest.raises(IngestError, match=r"corpus\.jsonl:4: duplicate_id"):
        read(beir(tmp_path / "s", docs=docs), strict=True)


def test_duplicate_query_id(tmp_path):
    c = read(beir(tmp_path, queries=QUERIES + [{"_id": "q1", "text": "again"}]))
    assert reasons(c) == ["duplicate_id"] and c.queries.num_rows == 2


def test_empty_and_whitespace_text(tmp_path):
    docs = DOCS + [{"_id": "d4", "title": "", "text": "   \t"}, {"_id": "d5", "text": ""}]
    qs = QUERIES + [{"_id": "q3", "text": " "}]
    c = read(beir(tmp_path, docs=docs, queries=qs))
    assert reasons(c) == ["empty_text"] * 3
    assert c.corpus.num_rows == 3 and c.queries.num_rows == 2
    with pytest.raises(IngestError, match=r"corpus\.jsonl:4: empty_text"):
        read(beir(tmp_path / "s", docs=docs), policies={"empty_text": "error"})


def test_invalid_utf8_names_file_and_line(tmp_path):
    raw = (json.dumps(DOCS[0]) + "\n").encode() + b'{"_id": "d9", "text": "caf\xe9"}\n'
    raw += (json.dumps(DOCS[2]) + "\n").encode()
    c = read(beir(tmp_path, raw_corpus=raw, qrels="query-id\tcorpus-id\tscore\nq2\td3\t1\n"))
    assert reasons(c) == ["invalid_utf8"]
    assert "corpus.jsonl:2" in c.rejects[0]["detail"]
    with pytest.raises(IngestError, match=r"corpus\.jsonl:2: invalid_utf8"):
        read(beir(tmp_path / "s", raw_corpus=raw), strict=True)


def test_malformed_json_is_an_error_by_default(tmp_path):
    raw = (json.dumps(DOCS[0]) + "\n").encode() + b"{not json\n"
    with pytest.raises(IngestError, match=r"corpus\.jsonl:2: malformed_row"):
        read(beir(tmp_path, raw_corpus=raw))


def test_qrels_with_unknown_query_and_doc(tmp_path):
    qrels = QRELS + "q9\td1\t1\nq1\td9\t1\n"
    c = read(beir(tmp_path, qrels=qrels))
    assert reasons(c) == ["unknown_doc", "unknown_query"]
    assert c.qrels.num_rows == 2
    with pytest.raises(IngestError, match=r"test\.tsv:4: unknown_query"):
        read(beir(tmp_path / "s", qrels=qrels), strict=True)


def test_qrels_naming_a_rejected_doc_leave_with_that_reason(tmp_path):
    docs = DOCS + [{"_id": "d4", "text": ""}]
    c = read(beir(tmp_path, docs=docs, qrels=QRELS + "q1\td4\t1\n"))
    assert reasons(c) == ["empty_text", "rejected_ref"]


def test_negative_and_non_numeric_scores(tmp_path):
    qrels = QRELS + "q1\td2\t-1\nq2\td2\tvery\nq2\td1\t1.5\n"
    c = read(beir(tmp_path, qrels=qrels))
    assert reasons(c) == ["bad_score"] * 3
    assert c.qrels.num_rows == 2
    with pytest.raises(IngestError, match=r"test\.tsv:4: bad_score"):
        read(beir(tmp_path / "s", qrels=qrels), policies={"bad_score": "error"})


def test_duplicate_judgment(tmp_path):
    c = read(beir(tmp_path, qrels=QRELS + "q1\td1\t2\n"))
    assert reasons(c) == ["duplicate_qrel"] and c.qrels.num_rows == 2


def test_query_id_equal_to_doc_id(tmp_path):
    qs = QUERIES + [{"_id": "d2", "text": "lava"}]
    c = read(beir(tmp_path, queries=qs))
    assert [f.kind for f in c.findings if f.kind == "id_collision"] == ["id_collision"]
    assert c.queries.num_rows == 3  # kept by default: tables are separate namespaces
    with pytest.raises(IngestError, match=r"queries\.jsonl:3: id_collision"):
        read(beir(tmp_path / "s", queries=qs), policies={"id_collision": "error"})
    c = read(beir(tmp_path / "r", queries=qs), policies={"id_collision": "reject"})
    assert reasons(c) == ["id_collision"] and c.queries.num_rows == 2


def test_exclusion_files_become_exclusions_not_judgments(tmp_path):
    c = read(
        beir(tmp_path, extra_qrels={"source_docs.tsv": "query-id\tcorpus-id\tscore\nq1\td2\t-1\n"})
    )
    assert c.exclusions.to_pylist() == [{"query_id": "q1", "doc_id": "d2", "reason": "source_doc"}]
    assert c.qrels.num_rows == 2 and c.rejects == []


def test_jsonl_with_column_names_and_parquet(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"pid": i, "body": t}) + "\n"
            for i, t in enumerate(["alpha text", "beta text"])
        )
    )
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"qid": ["a"], "question": ["alpha?"]}), queries)
    qrels = tmp_path / "qrels.jsonl"
    qrels.write_text(json.dumps({"qid": "a", "pid": 0, "rel": 1}) + "\n")
    cols = {
        "doc_id": "pid",
        "text": "body",
        "title": None,
        "query_id": "qid",
        "query_text": "question",
        "qrels_query_id": "qid",
        "qrels_doc_id": "pid",
        "qrels_score": "rel",
    }
    c = read_collection(
        IngestParams(source=str(corpus), queries=str(queries), qrels=[str(qrels)], columns=cols)
    )
    assert c.corpus.column("doc_id").to_pylist() == ["0", "1"]
    assert c.qrels.to_pylist() == [{"query_id": "a", "doc_id": "0", "score": 1}]


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "corpus": datasets.Dataset.from_list(DOCS),
            "queries": datasets.Dataset.from_list(QUERIES),
            "qrels": datasets.Dataset.from_list(
                [{"query-id": "q1", "corpus-id": "d1", "score": 1}]
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    c = read(tmp_path / "hf")
    assert c.corpus.num_rows == 3 and c.queries.num_rows == 2 and c.qrels.num_rows == 1


def test_missing_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read(tmp_path / "nope")


@pytest.mark.parametrize("name", ["cranfield", "cisi", "med", "adi"])
def test_real_collections_are_read_with_their_quirks(shared_data, name):
    c = read(shared_data / name)
    stats = json.loads((shared_data / name / "stats.json").read_text())
    empty = set(stats["empty_docs"])
    assert c.corpus.num_rows == stats["docs"] - len(empty)
    assert {r["row_id"] for r in c.rejects if r["reason"] == "empty_text"} == empty
    dup_groups = stats["duplicate_doc_groups"]
    dups = {f.row_id for f in c.findings if f.kind == "duplicate_text"}
    assert dups == {g[-1] for g in dup_groups}
    judged = stats["splits"]["test"]["queries_with_relevant"]
    unjudged = [f for f in c.findings if f.kind == "unjudged_query"]
    assert len(unjudged) == stats["queries"] - judged
    if name == "cranfield":
        assert c.exclusions.num_rows == 225


def test_validate_reports_cranfield_empties_and_duplicate_pair(shared_data):
    result = CliRunner().invoke(app, ["validate", str(shared_data / "cranfield")])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "corpus.jsonl:471: empty_text" in out
    assert "corpus.jsonl:995: empty_text" in out
    assert "corpus.jsonl:995: duplicate_text: same title and text as doc '471'" in out
