"""Training with rankmill's views: batches without in-batch false negatives.

MultipleNegativesRankingLoss scores every anchor against every document of its batch; any
other row's positive or hard negative that is in fact relevant to the anchor is trained as a
negative. When a query has several positives, rows of the same query share batches under the
default sampler. sentence-transformers' ``BatchSamplers.NO_DUPLICATES`` keeps apart rows that
share an exact value in any column, compared as strings: two rows of one query (same anchor
text) never meet, nor two rows with the same document text. It does not see ids, so it misses

- a document relevant to one row's query that is another row's positive or negative under a
  different text (a second positive of that query, a relabelled false negative),
- two queries that are the same need in different words (reformulated or synthetic queries
  of one document, or case and spacing variants),
- and nothing, if the id columns that would tell are dropped before training (they must be:
  the collator would tokenize them).

:class:`QueryAwareBatchSampler` decides with ids: a row joins a batch only when its query is
not there yet, none of its documents is relevant to a query there, and none of the documents
there is relevant to its query (``relevant_ids`` of the views: qrels, mined positives and
judge relabels). :func:`prepare` keeps the training columns of a view and returns the sampler
for the trainer's ``batch_sampler`` argument::

    train = load_dataset("parquet", data_files=..., split="train")
    train, sampler = prepare(train)
    args = SentenceTransformerTrainingArguments(..., batch_sampler=sampler)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

ID_COLUMNS = (
    "query_id",
    "positive_id",
    "negative_id",
    "negative_ids",
    "relevant_ids",
    "pos_ids",
    "neg_ids",
    "doc_id",
    "doc_ids",
    "score_source",
)


class QueryAwareBatchSampler(DefaultBatchSampler):
    """Batches in which no row's documents are relevant to another row's query, and no query
    has two rows. Rows that conflict with a batch wait for a later one (nothing is dropped
    except by ``drop_last``)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        query_ids: Sequence[str],
        doc_ids: Sequence[Sequence[str]],
        relevant_ids: Sequence[Sequence[str]],
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        if not (len(query_ids) == len(doc_ids) == len(relevant_ids) == len(dataset)):
            raise ValueError("query_ids, doc_ids and relevant_ids need one entry per row")
        self.query_ids = list(query_ids)
        self.doc_ids = [frozenset(d) for d in doc_ids]
        self.relevant_ids = [frozenset(r) for r in relevant_ids]

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is not None and self.seed is not None:
            self.generator.manual_seed(self.seed + self.epoch)
        pending = torch.randperm(len(self.query_ids), generator=self.generator).tolist()
        while pending:
            batch: list[int] = []
            queries: set[str] = set()
            docs: set[str] = set()
            relevant: set[str] = set()
            deferred: list[int] = []
            for i in pending:
                if len(batch) == self.batch_size or (
                    self.query_ids[i] in queries
                    or not self.doc_ids[i].isdisjoint(relevant)
                    or not self.relevant_ids[i].isdisjoint(docs)
                ):
                    deferred.append(i)
                    continue
                batch.append(i)
                queries.add(self.query_ids[i])
                docs |= self.doc_ids[i]
                relevant |= self.relevant_ids[i]
            pending = deferred
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        # An upper bound, as for NoDuplicatesBatchSampler: conflicts can add short batches.
        n = len(self.query_ids)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def row_documents(row: dict[str, Any]) -> list[str]:
    """Every document id a view row puts into a batch."""
    docs: list[str] = []
    for key in ("positive_id", "negative_id", "doc_id"):
        if row.get(key):
            docs.append(row[key])
    for key in ("negative_ids", "pos_ids", "neg_ids", "doc_ids"):
        docs.extend(row.get(key) or [])
    return docs


def sampler_for(rows: Sequence[dict[str, Any]]) -> Callable[..., QueryAwareBatchSampler]:
    """A ``batch_sampler`` for SentenceTransformerTrainingArguments over these view rows (in
    the order of the dataset the trainer gets)."""
    query_ids = [r["query_id"] for r in rows]
    doc_ids = [row_documents(r) for r in rows]
    relevant_ids = [list(r.get("relevant_ids") or []) for r in rows]

    def make(dataset: Any, batch_size: int, drop_last: bool, **kwargs: Any):
        return QueryAwareBatchSampler(
            dataset,
            batch_size,
            drop_last,
            query_ids=query_ids,
            doc_ids=doc_ids,
            relevant_ids=relevant_ids,
            **kwargs,
        )

    return make


def prepare(dataset: Any) -> tuple[Any, Callable[..., QueryAwareBatchSampler]]:
    """A view's ``datasets.Dataset`` with its id columns removed (the trainer would tokenize
    them), and the batch sampler built from those ids."""
    id_cols = [c for c in dataset.column_names if c in ID_COLUMNS]
    rows = dataset.select_columns(id_cols).to_list()
    return dataset.remove_columns(id_cols), sampler_for(rows)
