"""Training views built from plain Arrow tables: shapes, ids, scores, splits, skips."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from rankmill.views import (
    VIEW_NAMES,
    ViewOptions,
    build_views,
    listwise_messages,
    split_of,
)
from tests.fixtures.export_data import make_inputs


def _all(view: dict[str, pa.Table]) -> pa.Table:
    return pa.concat_tables(view.values())


def test_every_view_without_teacher_tables_skips_those_that_need_them_with_a_reason():
    views, skipped = build_views(make_inputs(), ViewOptions(seed=1))
    assert set(skipped) == {"listwise-sft", "listwise-sft-reasoning", "pointwise-reasoning"}
    assert "rank" in skipped["listwise-sft"]
    assert "reasoning" in skipped["pointwise-reasoning"]
    assert set(views) | set(skipped) == set(VIEW_NAMES)


def test_views_with_teacher_and_judge_tables_include_reasoning_and_soft_labels():
    views, skipped = build_views(make_inputs(with_teacher=True), ViewOptions(seed=1))
    assert skipped == {}
    pw = _all(views["pointwise-reasoning"]).to_pylist()
    assert pw and all(r["reasoning"] for r in pw)
    # judgments replace labels' P(yes) as soft labels
    soft = {
        (r["query_id"], r["doc_id"]): r["soft_label"] for r in _all(views["pointwise"]).to_pylist()
    }
    assert soft[("q-solar", "d-solar-0")] == pytest.approx(0.95)
    assert soft[("q-solar", "d-tides-1")] == pytest.approx(0.1)
    # pairs without a soft label keep their hard label as soft label
    assert soft[("q-solar", "d-solar-1")] == 1.0


def test_n_tuple_has_one_row_per_query_with_n_negatives_and_ids():
    inputs = make_inputs(positives_per_query=3, negatives_per_query=4)
    views, _ = build_views(inputs, ViewOptions(num_negatives=3))
    t = _all(views["n-tuple"])
    assert t.column_names[:5] == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert "negative_4" not in t.column_names
    qids = t.column("query_id").to_pylist()
    assert len(qids) == len(set(qids)) == 12
    row = t.to_pylist()[0]
    corpus = {
        d: (ti, tx)
        for d, ti, tx in zip(
            *[inputs.corpus.column(c).to_pylist() for c in ("doc_id", "title", "text")],
            strict=True,
        )
    }
    assert row["negative_1"] == "\n".join(corpus[row["negative_ids"][0]])
    assert row["positive_id"] in row["relevant_ids"]
    assert not set(row["negative_ids"]) & set(row["relevant_ids"])


def test_score_views_use_soft_labels_only_when_every_pair_of_a_query_has_one():
    views, _ = build_views(make_inputs(), ViewOptions(num_negatives=1))
    # labels cover (first positive, first negative) of every query: the 1-tuple is covered
    rows = _all(views["n-tuple-scores"]).to_pylist()
    assert {r["score_source"] for r in rows} == {"soft_label"}
    assert rows[0]["label"] == pytest.approx([0.8, 0.3])
    # flagembedding lists every positive and negative: not all labelled -> mining scores
    fe = _all(views["flagembedding"]).to_pylist()
    assert {r["score_source"] for r in fe} == {"mining"}
    assert fe[0]["pos_scores"] == pytest.approx([0.9, 0.85])
    assert len(fe[0]["neg"]) == len(fe[0]["neg_scores"]) == 4
    trip = _all(views["triplet-scores"]).to_pylist()
    labels = {
        (r["positive_id"], r["negative_id"]): r["label"] for r in trip if r["query_id"] == "q-solar"
    }
    assert labels[("d-solar-0", "d-tides-1")] == pytest.approx(0.9 - 0.6)
    assert labels[("d-solar-1", "d-bees-0")] == pytest.approx(0.85 - 0.45)


def test_relabelled_negatives_leave_the_negatives_and_join_relevant():
    inputs = make_inputs()
    inputs.relabels = pa.table(
        {"query_id": ["q-solar"], "doc_id": ["d-tides-1"], "to_role": ["positive"]}
    )
    views, _ = build_views(inputs, ViewOptions())
    tev = {r["query_id"]: r for r in _all(views["tevatron"]).to_pylist()}
    assert "d-tides-1" not in tev["q-solar"]["negative_document_ids"]
    nt = {r["query_id"]: r for r in _all(views["n-tuple"]).to_pylist()}
    assert "d-tides-1" in nt["q-solar"]["relevant_ids"]


def test_split_is_by_query_seeded_and_stable():
    inputs = make_inputs()
    a, _ = build_views(inputs, ViewOptions(seed=7, validation_fraction=0.3))
    b, _ = build_views(inputs, ViewOptions(seed=7, validation_fraction=0.3))
    c, _ = build_views(inputs, ViewOptions(seed=8, validation_fraction=0.3))
    for name in ("triplet", "pointwise", "tevatron"):
        tr = set(a[name]["train"].column("query_id").to_pylist())
        va = set(a[name]["validation"].column("query_id").to_pylist())
        assert tr and va and not tr & va
        assert a[name]["validation"].equals(b[name]["validation"])
    assert set(a["triplet"]["validation"].column("query_id").to_pylist()) != set(
        c["triplet"]["validation"].column("query_id").to_pylist()
    )
    # the same query is in the same split in every view
    for q in a["pointwise"]["validation"].column("query_id").to_pylist():
        assert split_of(q, 7, 0.3) == "validation"


def test_tevatron_forms_and_corpus_keep_stable_ids():
    inputs = make_inputs()
    views, _ = build_views(inputs, ViewOptions(validation_fraction=0))
    corpus = views["tevatron-corpus"]["train"]
    assert corpus.column("docid").to_pylist() == inputs.corpus.column("doc_id").to_pylist()
    ids = _all(views["tevatron"]).to_pylist()[0]
    inline = _all(views["tevatron-inline"]).to_pylist()[0]
    assert ids["query_id"] == inline["query_id"]
    assert [p["docid"] for p in inline["positive_passages"]] == ids["positive_document_ids"]
    assert [p["docid"] for p in inline["negative_passages"]] == ids["negative_document_ids"]
    assert views["tevatron"]["validation"].num_rows == 0


def test_labeled_list_scores_align_with_docs():
    views, _ = build_views(make_inputs(), ViewOptions(validation_fraction=0))
    row = _all(views["labeled-list"]).to_pylist()[0]
    assert len(row["docs"]) == len(row["scores"]) == len(row["doc_ids"]) == 6
    assert row["scores"][:2] == [0.8, 1.0]  # labelled first positive, unlabelled second
    assert row["scores"][2] == pytest.approx(0.3)


def test_listwise_sft_messages_number_passages_and_rank_by_teacher():
    views, _ = build_views(make_inputs(with_teacher=True), ViewOptions(validation_fraction=0))
    with_r = _all(views["listwise-sft-reasoning"]).to_pylist()[0]
    without = _all(views["listwise-sft"]).to_pylist()[0]
    roles = [m["role"] for m in with_r["messages"]]
    assert roles == ["system", "user", "assistant"]
    user = with_r["messages"][1]["content"]
    assert re.search(r"^\[1\] ", user, re.M) and re.search(r"^\[3\] ", user, re.M)
    answer = with_r["messages"][2]["content"]
    assert answer.startswith("<think>") and answer.endswith("[3] > [1] > [2]")
    assert without["messages"][2]["content"] == "[3] > [1] > [2]"


def test_listwise_messages_without_reasoning_have_no_think_block():
    msgs = listwise_messages("q", ["a", "b"], [2, 1], None)
    assert "<think>" not in msgs[2]["content"]
    assert msgs[2]["content"] == "[2] > [1]"


def test_unknown_view_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match="n-tuple"):
        build_views(make_inputs(), ViewOptions(views=("nope",)))


def test_rankings_without_windows_give_listwise_sft_without_reasoning():
    inputs = make_inputs()
    inputs.rankings = pa.table(
        {
            "query_id": ["q-solar"],
            "doc_ids": [["d-solar-0", "d-tides-1"]],
            "input_doc_ids": [["d-tides-1", "d-solar-0"]],
        }
    )
    views, skipped = build_views(inputs, ViewOptions(validation_fraction=0))
    row = _all(views["listwise-sft"]).to_pylist()[0]
    assert row["doc_ids"] == ["d-tides-1", "d-solar-0"]
    assert row["messages"][2]["content"] == "[2] > [1]"
    assert "reasoning" in skipped["listwise-sft-reasoning"]


def test_teacher_consensus_gives_soft_labels_and_kept_reasoning():
    inputs = make_inputs()
    inputs.consensus = pa.table(
        {
            "query_id": ["q-tides"],
            "doc_id": ["d-tides-0"],
            "p_yes": [0.66],
            "reasoning": ["Tides come from the moon's pull."],
        }
    )
    views, skipped = build_views(inputs, ViewOptions(validation_fraction=0))
    assert "pointwise-reasoning" not in skipped
    rows = _all(views["pointwise-reasoning"]).to_pylist()
    assert [(r["query_id"], r["doc_id"], r["soft_label"]) for r in rows] == [
        ("q-tides", "d-tides-0", 0.66)
    ]
