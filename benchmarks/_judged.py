"""Shared by the benchmarks (a module, not a benchmark): the BEIR-layout judged collections
in ../shared/data as plain Python structures (not shipped data: a user's checkout has no
../shared, and the scripts then say so and stop)."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankmill.stages.ingest import CHECKS, IngestParams, Policies, read_collection

# RANKMILL_TEST_DATA points elsewhere (as for the tests).
DATA = Path(
    os.environ.get("RANKMILL_TEST_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@dataclass
class Collection:
    name: str
    doc_ids: list[str]
    titles: list[str | None]
    texts: list[str]
    queries: dict[str, str]
    relevant: dict[str, set[str]]  # query -> docs judged relevant (score > 0)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # e.g. cranfield source docs


def load(name: str, data: Path = DATA) -> Collection:
    """Read a collection through rankmill's own ingest, keeping every row as it is (both
    miners must see the same corpus, empty documents included)."""
    d = data / name
    if not d.is_dir():
        sys.exit(f"{d} is not there: these benchmarks need ../shared/data/{name} (see its README)")
    keep_all = Policies(**{k: "keep" for k in CHECKS})
    c = read_collection(IngestParams(source=str(d), policies=keep_all))
    relevant: dict[str, set[str]] = defaultdict(set)
    excluded: dict[str, set[str]] = defaultdict(set)
    for r in c.qrels.to_pylist():
        if r["score"] > 0:
            relevant[r["query_id"]].add(r["doc_id"])
        elif r["score"] < 0:
            excluded[r["query_id"]].add(r["doc_id"])
    for r in c.exclusions.to_pylist():
        excluded[r["query_id"]].add(r["doc_id"])
    return Collection(
        name,
        c.corpus.column("doc_id").to_pylist(),
        [t or None for t in c.corpus.column("title").to_pylist()],
        c.corpus.column("text").to_pylist(),
        dict(
            zip(
                c.queries.column("query_id").to_pylist(),
                c.queries.column("text").to_pylist(),
                strict=True,
            )
        ),
        dict(relevant),
        dict(excluded),
    )


def one_positive(coll: Collection, seed: int) -> dict[str, str]:
    """A seeded choice of one judged-relevant document per judged query (what a synthetic
    query knows: only the document it was written from)."""
    rng = np.random.default_rng(seed)
    out = {}
    for q in sorted(coll.relevant, key=lambda x: (len(x), x)):
        if q in coll.queries:
            docs = sorted(coll.relevant[q])
            out[q] = docs[int(rng.integers(len(docs)))]
    return out
