"""Benchmark: in-batch false negatives under three batch samplers, on judged collections.

    python benchmarks/in_batch_negatives.py                  # adi, cranfield, med, cisi
    python benchmarks/in_batch_negatives.py --batch-size 64 --seeds 5

The `pairs` view of each collection (one row per judged-relevant (query, document), as
MultipleNegativesRankingLoss over every positive trains) is batched by
- sentence-transformers' default sampler (a shuffled torch BatchSampler),
- ``BatchSamplers.NO_DUPLICATES`` (no exact string twice in a batch, over the text columns
  the trainer gets),
- rankmill's :class:`rankmill.training.QueryAwareBatchSampler` (``prepare`` of the view).

A row "has an in-batch false negative" when another row of its batch is of the same query or
carries a document judged relevant to its query: MNRL then trains a relevant document as a
negative. Shown per sampler: that share of rows (mean over seeds), and what it costs: batches
per epoch and their mean size. Last line:
``summary: <coll>_default=… <coll>_no_duplicates=… <coll>_rankmill=… ...`` (shares of rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from sentence_transformers.base.sampler import (  # noqa: E402
    DefaultBatchSampler,
    NoDuplicatesBatchSampler,
)

from rankmill.schemas import CORPUS, QRELS, QUERIES  # noqa: E402
from rankmill.training import prepare  # noqa: E402
from rankmill.views import ViewInputs, ViewOptions, build_views  # noqa: E402
from tests.fixtures.judged import load  # noqa: E402


def pairs_view(name: str) -> datasets.Dataset:
    c = load(name)
    corpus = pa.Table.from_pylist(
        [
            {"doc_id": d, "title": t, "text": x}
            for d, t, x in zip(c.doc_ids, c.titles, c.texts, strict=True)
        ],
        schema=CORPUS,
    )
    queries = pa.Table.from_pylist(
        [{"query_id": q, "text": t} for q, t in c.queries.items()], schema=QUERIES
    )
    qrels = pa.Table.from_pylist(
        [{"query_id": q, "doc_id": d, "score": 1} for q, ds in c.relevant.items() for d in ds],
        schema=QRELS,
    )
    views, _ = build_views(
        ViewInputs(corpus=corpus, queries=queries, qrels=qrels),
        ViewOptions(validation_fraction=0, views=("pairs",)),
    )
    return datasets.Dataset(views["pairs"]["train"])


def share_with_false_negative(rows: list[dict], batches: list[list[int]]) -> float:
    bad = 0
    for batch in batches:
        for i in batch:
            rel = set(rows[i]["relevant_ids"])
            if any(
                j != i
                and (rows[j]["query_id"] == rows[i]["query_id"] or rows[j]["positive_id"] in rel)
                for j in batch
            ):
                bad += 1
    return bad / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--collections", nargs="+", default=["adi", "cranfield", "med", "cisi"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    datasets.disable_progress_bars()
    summary = []
    print(f"batch size {args.batch_size}, {args.seeds} seeds")
    head = ("collection", "rows", "sampler", "rows w/ FN", "batches", "mean size")
    print("{:<10} {:>6} {:<14} {:>10} {:>8} {:>9}".format(*head))
    for name in args.collections:
        full = pairs_view(name)
        rows = full.to_list()
        train, make = prepare(full)
        samplers = {
            "default": lambda s, t=train: DefaultBatchSampler(
                torch.utils.data.RandomSampler(t, generator=torch.Generator().manual_seed(s)),
                args.batch_size,
                False,
            ),
            "no_duplicates": lambda s, t=train: NoDuplicatesBatchSampler(
                t, args.batch_size, False, generator=torch.Generator(), seed=s
            ),
            "rankmill": lambda s, t=train, m=make: m(
                t, batch_size=args.batch_size, drop_last=False, generator=torch.Generator(), seed=s
            ),
        }
        for label, build in samplers.items():
            shares, counts, sizes = [], [], []
            for seed in range(args.seeds):
                sampler = build(seed)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(0)
                batches = [list(b) for b in sampler]
                assert sorted(i for b in batches for i in b) == list(range(len(rows)))
                shares.append(share_with_false_negative(rows, batches))
                counts.append(len(batches))
                sizes.append(len(rows) / len(batches))
            share = statistics.mean(shares)
            print(
                f"{name:<10} {len(rows):>6} {label:<14} {share:>10.3f} "
                f"{statistics.mean(counts):>8.1f} {statistics.mean(sizes):>9.1f}"
            )
            summary.append(f"{name}_{label}={share:.3f}")
    print("summary: " + " ".join(summary))


if __name__ == "__main__":
    main()
