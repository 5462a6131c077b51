"""Documents by reference: the file a stage's prepare step writes, and lookups by id."""

from __future__ import annotations

import pyarrow as pa

from rankmill.docstore import DocStore, write_docs


def test_the_first_row_of_each_doc_id_is_kept_and_looked_up_in_order(tmp_path):
    corpus = pa.table(
        {
            "doc_id": ["d1", "d2", "d1", "d3"],
            "title": ["T1", None, "again", "T3"],
            "text": ["one", "two", "one again", "three"],
        }
    )
    path = str(tmp_path / "docs.arrow")
    assert write_docs(corpus, path) == 3
    opened: list[str] = []

    def where() -> str:
        opened.append(path)
        return path

    store = DocStore(where)
    assert opened == []  # nothing is mapped before a text is needed
    assert store.lookup(["d3", "d9", "d1", "d2"]) == [
        ("T3", "three"),
        None,  # not in the corpus
        ("T1", "one"),  # the first row of a repeated doc_id
        (None, "two"),
    ]
    assert store.lookup(["d9"]) == [None]
    assert opened == [path]  # mapped once


def test_only_the_documents_named_are_written(tmp_path):
    corpus = pa.table({"doc_id": ["a", "b", "a", "c"], "text": ["x", "y", "x2", "z"]})
    path = str(tmp_path / "docs.arrow")
    assert write_docs(corpus, path, only=["c", "a", "a", "nope"]) == 2
    assert DocStore(lambda: path).lookup(["a", "b", "c"]) == [(None, "x"), None, (None, "z")]


def test_fill_sets_the_texts_of_rows_without_one(tmp_path):
    path = str(tmp_path / "docs.arrow")
    write_docs(pa.table({"doc_id": ["a", "b"], "title": ["A", None], "text": ["x", "y"]}), path)
    rows = [
        {"doc_id": "a", "doc_title": None, "doc_text": None},
        {"doc_id": "b", "doc_title": "kept", "doc_text": "own text"},  # carries its text
        {"doc_id": "zz", "doc_title": None, "doc_text": None},  # unknown: stays None
    ]
    DocStore(lambda: path).fill(rows)
    assert [(r["doc_title"], r["doc_text"]) for r in rows] == [
        ("A", "x"),
        ("kept", "own text"),
        (None, None),
    ]


def test_documents_by_position_in_file_order(tmp_path):
    corpus = pa.table({"doc_id": ["c", "a", "c", "b"], "text": ["z", "x", "z2", "y"]})
    path = str(tmp_path / "docs.arrow")
    assert write_docs(corpus, path, only=["a", "b", "c"]) == 3
    store = DocStore(lambda: path)
    assert [d["doc_id"] for d in store.rows(0, 9)] == ["c", "a", "b"]  # corpus order, first rows
    assert store.rows(1, 2) == [{"doc_id": "a", "title": None, "text": "x"}]
    assert store.rows(2, 4) == [{"doc_id": "b", "title": None, "text": "y"}]  # past the end
    assert store.rows(3, 5) == []


def test_a_corpus_without_titles(tmp_path):
    path = str(tmp_path / "docs.arrow")
    write_docs(pa.table({"doc_id": ["a"], "text": ["x"]}), path)
    assert DocStore(lambda: path).lookup(["a"]) == [(None, "x")]


def test_the_judge_stage_plans_from_document_ids():
    from rankmill.stages.judge import JudgeStage, build_judge_pairs

    wanted = JudgeStage.plan_inputs(None)  # type: ignore[arg-type]
    assert wanted is not None and wanted["corpus"] == ["doc_id"]
    ids = pa.table({"doc_id": ["d1", "d2"]})
    queries = pa.table({"query_id": ["q1"], "text": ["question"]})
    negs = pa.table({"query_id": ["q1"], "positive_ids": [["d1"]], "negative_ids": [["d2"]]})
    rows = build_judge_pairs(ids, queries, negatives=negs)
    assert [(r["doc_id"], r["role"], r["doc_text"]) for r in rows] == [
        ("d1", "positive", None),
        ("d2", "negative", None),
    ]
    assert rows[0]["query_text"] == "question"
