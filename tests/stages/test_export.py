"""The export stage: shards named for the Hub, a manifest with sha256, views that load with
``datasets``, and a re-run that rewrites nothing."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankmill.manifest import RunDir
from rankmill.pipeline import validate_pipeline
from rankmill.runner import Runner
from rankmill.stages.export import export_dir, export_files
from rankmill.views import split_of
from tests.fixtures.export_data import TOPICS

# a seed that puts some of the 12 queries in each split
SEED = next(
    s
    for s in range(100)
    if 2 <= sum(split_of(f"q-{t}", s, 0.25) == "validation" for t, _ in TOPICS) <= 4
)


def pipeline(**export) -> dict:
    return {
        "run": {"name": "export-test", "seed": SEED},
        "stages": {
            "tables": {"uses": "tests.fixtures.export_data:TablesStage"},
            "export": {"validation_fraction": 0.25, "rows_per_shard": 20, **export},
        },
    }


@pytest.mark.slow
def test_export_writes_named_shards_manifest_and_loadable_views(tmp_path, ray_session):
    import datasets

    run_dir = str(tmp_path / "run")
    Runner(validate_pipeline(pipeline(save_to_disk=True)), run_dir).run()
    manifest, files = export_files(run_dir)

    views = {v["view"]: v for v in manifest["views"]}
    assert views["listwise-sft"]["status"] == "skipped"
    assert "rank" in views["listwise-sft"]["reason"]
    assert views["n-tuple"]["status"] == "built"

    for entry in manifest["files"]:
        assert hashlib.sha256(files[entry["path"]]).hexdigest() == entry["sha256"]
    names = sorted(p for p in files if p.startswith("triplet/"))
    # 12 queries x 2 positives x 4 negatives = 96 triplet rows, 20 per shard
    train_rows = views["triplet"]["train_rows"]
    n = -(-train_rows // 20)
    assert n > 1
    assert [x for x in names if "/train-" in x] == [
        f"triplet/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)
    ]
    assert train_rows + views["triplet"]["validation_rows"] == 96
    assert "flagembedding/train.jsonl" in files
    first = json.loads(files["flagembedding/train.jsonl"].splitlines()[0])
    assert set(first) >= {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt"}

    # the files, laid out as committed, load with datasets and split by query
    root = tmp_path / "out"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    ds = datasets.load_dataset(
        "parquet",
        data_files={
            "train": str(root / "n-tuple" / "train-*.parquet"),
            "validation": str(root / "n-tuple" / "validation-*.parquet"),
        },
    )
    train_q = set(ds["train"]["query_id"])
    val_q = set(ds["validation"]["query_id"])
    assert train_q and val_q and not train_q & val_q
    assert len(train_q) + len(val_q) == 12
    on_disk = datasets.load_from_disk(str(root / "n-tuple" / "disk"))
    assert on_disk["train"]["query_id"] == ds["train"]["query_id"]

    first_shard = next(p for p in sorted(files) if p.startswith("pointwise/train-"))
    table = pq.read_table(io.BytesIO(files[first_shard]))
    assert {"query", "document", "label", "soft_label", "query_id", "doc_id"} <= set(
        table.column_names
    )
    files_table = RunDir(run_dir).read_table("export", "files")
    assert files_table.num_rows == len(manifest["files"])
    assert isinstance(files_table, pa.Table)

    # the committed folder is the same layout, readable in place
    root_in_place = export_dir(run_dir)
    in_place = datasets.load_dataset(
        "parquet", data_files=f"{root_in_place}/n-tuple/train-*.parquet", split="train"
    )
    assert in_place["query_id"] == ds["train"]["query_id"]

    # nothing changed: nothing recomputed
    again = Runner(validate_pipeline(pipeline(save_to_disk=True)), run_dir).run()
    assert export_files(run_dir)[0] == manifest
    assert again is not None
