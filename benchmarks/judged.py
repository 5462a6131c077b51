"""Reading the BEIR-layout judged collections in ../shared/data for benchmarks (not shipped
data: a user's checkout has no ../shared, and the scripts then say so and stop)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
    d = data / name
    if not d.is_dir():
        sys.exit(f"{d} is not there: these benchmarks need ../shared/data/{name} (see its README)")
    docs = [json.loads(line) for line in (d / "corpus.jsonl").open(encoding="utf-8")]
    queries = {}
    for line in (d / "queries.jsonl").open(encoding="utf-8"):
        q = json.loads(line)
        queries[str(q["_id"])] = q["text"]
    relevant: dict[str, set[str]] = defaultdict(set)
    excluded: dict[str, set[str]] = defaultdict(set)
    for tsv in sorted((d / "qrels").glob("*.tsv")):
        for i, line in enumerate(tsv.open(encoding="utf-8")):
            if i == 0 or not line.strip():
                continue
            q, doc, score = line.rstrip("\n").split("\t")
            if tsv.name == "source_docs.tsv" or int(score) < 0:
                excluded[q].add(doc)
            elif int(score) > 0:
                relevant[q].add(doc)
    return Collection(
        name,
        [str(x["_id"]) for x in docs],
        [x.get("title") or None for x in docs],
        [x.get("text") or "" for x in docs],
        queries,
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
