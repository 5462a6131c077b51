"""The mine stage through the Runner: ingest a small BEIR folder, mine it on Ray, check the
tables, rejects, counters, resume, and that a second mine stage reuses cached embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from rankmill.manifest import RunDir
from rankmill.pipeline import validate_pipeline
from rankmill.runner import Runner
from rankmill.schemas import CANDIDATES, NEGATIVES
from rankmill.stages.mine import MineParams, unit_queries

DOCS = {
    "b1": "Honey bees collect nectar and turn it into honey inside the hive.",
    "b2": "A bee colony has one queen, thousands of workers and some drones.",
    "b3": "Bees pollinate flowering plants while they gather pollen.",
    "b4": "Beekeepers harvest honey from wooden frames in the hive boxes.",
    "v1": "Lava from the volcano flowed downhill and covered the village road.",
    "v2": "Volcanic eruptions throw ash high into the atmosphere.",
    "v3": "Magma rises through cracks in the crust before an eruption.",
    "y1": "Yeast ferments sugar and makes bread dough rise.",
    "y2": "Sourdough bread uses a starter of wild yeast and bacteria.",
    "y3": "Knead the dough for ten minutes before the first proof.",
    "t1": "High-speed trains run on dedicated tracks at 300 km/h.",
    "t2": "The steam locomotive pulled twelve coaches up the hill.",
}
QUERIES = {
    "q1": "how do bees make honey",
    "q2": "what happens when a volcano erupts",
    "q3": "why does bread dough rise",
    "q4": "how fast are modern trains",
    "q5": "an unjudged question about bees",
}
QRELS = "query-id\tcorpus-id\tscore\nq1\tb1\t2\nq2\tv1\t1\nq3\ty1\t1\nq4\tt1\t1\n"
SOURCE = "query-id\tcorpus-id\tscore\nq1\tb4\t-1\n"


def beir(tmp_path: Path) -> Path:
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in DOCS.items())
    )
    (d / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items())
    )
    (d / "qrels" / "test.tsv").write_text(QRELS)
    (d / "qrels" / "source_docs.tsv").write_text(SOURCE)
    return d


def pipeline(tmp_path: Path, **mine) -> dict:
    params = {
        "num_negatives": 3,
        "pool_size": 6,
        "queries_per_unit": 2,
        "cache_dir": str(tmp_path / "emb"),
        # tiny corpus: the margin rule would leave the weak topical queries little to choose
        "filters": {"max_relative_score": 0.99},
        **mine,
    }
    return {
        "run": {"name": "mine-test", "seed": 5},
        "stages": {"ingest": {"source": str(beir(tmp_path))}, "mine": params},
    }


def test_unit_queries_positives_by_id_and_exclusions():
    q = pa.table(
        {
            "query_id": ["a", "b", "c"],
            "text": ["x", "y", "z"],
            "source": ["user", "synthetic", "user"],
            "source_doc_id": [None, "d9", None],
        }
    )
    qrels = pa.table(
        {
            "query_id": ["a", "a", "a", "c"],
            "doc_id": ["d1", "d2", "d3", "d1"],
            "score": pa.array([2, 0, -1, 1], pa.int32()),
        }
    )
    excl = pa.table({"query_id": ["a", "c"], "doc_id": ["d4", "d1"], "reason": ["src", "src"]})
    t = unit_queries(q, qrels, excl, min_relevance=1).to_pylist()
    assert t[0]["positive_ids"] == ["d1"] and t[0]["excluded_ids"] == ["d3", "d4"]
    assert t[1]["positive_ids"] == ["d9"]  # a synthetic query's source document
    assert t[2]["positive_ids"] == ["d1"] and t[2]["excluded_ids"] == []  # positive wins
    t = unit_queries(q, qrels, None, min_relevance=2, source_doc_positive=False).to_pylist()
    assert t[1]["positive_ids"] == [] and t[2]["positive_ids"] == []


def test_params_describe_every_field():
    for name, f in MineParams.model_fields.items():
        assert f.description, name


@pytest.mark.slow
def test_mine_stage_end_to_end(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    cfg = validate_pipeline(pipeline(tmp_path))
    result = Runner(cfg, str(run_dir)).run()
    assert result.stages[-1].units_total == 3  # 5 queries, 2 per unit
    rd = RunDir(str(run_dir))
    cands = rd.read_table("mine", "candidates", CANDIDATES)
    negs = rd.read_table("mine", "negatives", NEGATIVES)
    rejects = rd.read_table("mine", "rejects")
    assert sorted(cands.column("query_id").to_pylist()) == ["q1", "q2", "q3", "q4", "q5"]
    assert all(len(ids) == 6 for ids in cands.column("doc_ids").to_pylist())
    by_q = {r["query_id"]: r for r in negs.to_pylist()}
    assert sorted(by_q) == ["q1", "q2", "q3", "q4"]
    assert by_q["q1"]["positive_ids"] == ["b1"]
    assert "b1" not in by_q["q1"]["negative_ids"]
    assert "b4" not in by_q["q1"]["negative_ids"]  # Cranfield-style source doc: excluded
    assert all(r["score_kind"] == "dense" for r in by_q.values())
    assert all(1 <= len(r["negative_ids"]) <= 3 for r in by_q.values())
    rej = rejects.to_pylist()
    assert [(r["query_id"], r["reason"]) for r in rej] == [("q5", "no_positive")]

    # counters: filter counts and the embedding work, summed over units
    extra: dict[str, float] = {}
    rejects_count: dict[str, int] = {}
    _, recs = rd.stage_status("mine")
    for rec in recs:
        assert rec is not None
        for k, v in rec.counters.extra.items():
            extra[k] = extra.get(k, 0) + v
        for k, v in rec.counters.rejects.items():
            rejects_count[k] = rejects_count.get(k, 0) + v
    assert rejects_count == {"no_positive": 1}
    assert extra["queries"] == 5 and extra["queries_with_negatives"] == 4
    assert extra["skipped_positive"] == 4 and extra["skipped_excluded"] == 1
    assert extra["embedded_docs"] == len(DOCS)  # one actor embedded the corpus once

    # resume: nothing to do; a second mine stage with other params reuses the embeddings
    assert Runner(cfg, str(run_dir)).run().units_run == 0
    raw = pipeline(tmp_path)
    raw["stages"]["mine_top1"] = {**raw["stages"]["mine"], "uses": "mine", "num_negatives": 1}
    raw["stages"]["mine_top1"]["inputs"] = {"queries": "ingest.queries"}
    cfg2 = validate_pipeline(raw)
    Runner(cfg2, str(run_dir)).run()
    _, recs = rd.stage_status("mine_top1")
    assert sum(r.counters.extra.get("embedded_docs", 0) for r in recs if r) == 0
    negs1 = rd.read_table("mine_top1", "negatives", NEGATIVES).to_pylist()
    assert all(len(r["negative_ids"]) == 1 for r in negs1)
