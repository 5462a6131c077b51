"""The mine stage through the Runner: ingest a small BEIR folder, mine it on Ray, check the
tables, rejects, counters, resume, and that a second mine stage reuses cached embeddings."""

from __future__ import annotations

import json
import os
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


def prepare_counters(rd: RunDir, stage: str):
    plan, _ = rd.stage_status(stage)
    assert plan is not None
    [rec] = rd.step_records(stage, plan)
    assert rec is not None
    return rec.counters


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
    # the prepare step embedded the corpus once, for every actor
    assert prepare_counters(rd, "mine").extra["embedded_docs"] == len(DOCS)

    # resume: nothing to do; a second mine stage with other params reuses the embeddings
    assert Runner(cfg, str(run_dir)).run().units_run == 0
    raw = pipeline(tmp_path)
    raw["stages"]["mine_top1"] = {**raw["stages"]["mine"], "uses": "mine", "num_negatives": 1}
    raw["stages"]["mine_top1"]["inputs"] = {"queries": "ingest.queries"}
    cfg2 = validate_pipeline(raw)
    Runner(cfg2, str(run_dir)).run()
    assert prepare_counters(rd, "mine_top1").extra["embedded_docs"] == 0
    negs1 = rd.read_table("mine_top1", "negatives", NEGATIVES).to_pylist()
    assert all(len(r["negative_ids"]) == 1 for r in negs1)


def test_params_that_change_no_output_stay_out_of_the_fingerprint(tmp_path):
    def fp(**mine) -> str:
        cfg = validate_pipeline(pipeline(tmp_path, **mine))
        return Runner(cfg, str(tmp_path / "run")).fingerprints()["mine"]

    base = fp()
    same = {
        "queries_per_unit": 1,
        "batch_size": 8,
        "search_batch": 2,
        "embedding_cache": False,
        "embed_threads": 1,
        "cache_dir": str(tmp_path / "elsewhere"),
        "worker_cpus": 2,
        "workers": 2,
    }
    for key, value in same.items():
        assert fp(**{key: value}) == base, key
    assert fp(worker_gpus=0.0) == base  # CPU placement, as the default here
    # Embedding on a GPU gives other low bits: the placement is part of the fingerprint.
    assert fp(worker_gpus=1.0) != base
    assert fp(num_negatives=2) != base
    assert MineParams.not_fingerprinted <= set(MineParams.model_fields)


def test_embedding_threads_follow_the_actor_cpus():
    assert MineParams(worker_cpus=3).threads() == 3
    assert MineParams(worker_cpus=3, embed_threads=1).threads() == 1
    cpus = os.cpu_count() or 1
    assert MineParams().threads() == cpus  # alone on the machine: all of it
    assert MineParams(workers=2).threads() == max(1, cpus // 2)
    # as the actors rebuild them from the driver's JSON
    assert MineParams.model_validate_json(MineParams().model_dump_json()).threads() == cpus


@pytest.mark.slow
def test_bm25_only_stage_on_a_corpus_with_repeated_ids(tmp_path, ray_session):
    raw = pipeline(tmp_path, retrievers=["bm25"], filters={"max_relative_score": 0.95})
    corpus = beir(tmp_path) / "corpus.jsonl"
    # ingest keeps a repeated id (policy keep): mine uses its first row
    with corpus.open("a") as f:
        f.write(json.dumps({"_id": "b2", "title": "", "text": "A second text under b2."}) + "\n")
    raw["stages"]["ingest"]["policies"] = {"duplicate_id": "keep"}
    run_dir = tmp_path / "run"
    Runner(validate_pipeline(raw), str(run_dir)).run()
    rd = RunDir(str(run_dir))
    assert rd.read_table("ingest", "corpus").num_rows == len(DOCS) + 1
    negs = rd.read_table("mine", "negatives", NEGATIVES).to_pylist()
    cands = rd.read_table("mine", "candidates", CANDIDATES).to_pylist()
    assert negs and all(r["score_kind"] == "bm25" for r in negs)
    for r in negs:
        pos = min(r["positive_scores"])
        assert max(r["negative_scores"]) <= pos - 0.05 * abs(pos) + 1e-6
    assert all(set(c["retrievers"]) == {"bm25"} for c in cands)
    assert all(s is None for c in cands for s in c["dense_scores"])
    rejects = rd.read_table("mine", "rejects").to_pylist()
    assert [(r["table"], r["doc_id"], r["reason"]) for r in rejects if r["table"] == "corpus"] == [
        ("corpus", "b2", "duplicate_doc_id")
    ]
    assert prepare_counters(rd, "mine").extra["embedded_docs"] == 0
    # nothing was embedded: no embedding cache entries, no embeddings in the index
    emb = tmp_path / "emb"
    assert not [p for p in emb.rglob("*.npy") if not p.name.startswith("bm25.")]
