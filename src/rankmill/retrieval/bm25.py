"""BM25 over a corpus with bm25s: built once, saved, and memory-mapped by every reader.

>>> idx = BM25Index(k1=0.9, b=0.4).build(["the cat sat", "dogs bark"])
>>> idx.save("index/")                                   # a few .npy files and two .json
>>> idx = BM25Index.load("index/")                       # memory-mapped: pages shared
>>> scores, ids = idx.search(["cat"], k=2)

Results are padded with id -1 (score 0) where fewer than ``k`` documents share a term with
the query: a zero BM25 score is no evidence, so it never ranks a document.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

# bm25s file names, prefixed so the index can share a folder with other files.
FILES = {
    "data_name": "bm25.data.npy",
    "indices_name": "bm25.indices.npy",
    "indptr_name": "bm25.indptr.npy",
    "vocab_name": "bm25.vocab.json",
    "params_name": "bm25.params.json",
    "nnoc_name": "bm25.nonoccurrence.npy",
}
SETTINGS = "bm25.tokenizer.json"


class BM25Index:
    """A bm25s index; tokenisation is lower-cased words with English stopwords removed."""

    def __init__(
        self, k1: float = 0.9, b: float = 0.4, method: str = "lucene", stopwords: str | None = "en"
    ):
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self._retriever = None
        self.num_docs = 0

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            list(texts), stopwords=self.stopwords or [], return_ids=False, show_progress=False
        )

    def build(self, texts: Sequence[str]) -> BM25Index:
        import bm25s

        self.num_docs = len(texts)
        self._retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self._retriever.index(self._tokenize(texts), show_progress=False)
        return self

    def save(self, folder: str) -> list[str]:
        """Write the index into ``folder``; returns the paths of the files written."""
        if self._retriever is None:
            raise RuntimeError("BM25Index.save before build")
        os.makedirs(folder, exist_ok=True)
        self._retriever.save(folder, show_progress=False, **FILES)
        with open(os.path.join(folder, SETTINGS), "w") as f:
            json.dump({"stopwords": self.stopwords, "num_docs": self.num_docs}, f)
        names = [*FILES.values(), SETTINGS]
        return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]

    @classmethod
    def load(cls, folder: str, mmap: bool = True, files: dict[str, str] | None = None) -> BM25Index:
        """An index saved by :meth:`save`; with ``mmap`` its arrays stay on disk, shared by
        every process that maps them. ``files`` (file name -> path) places files that are not
        in ``folder``."""
        import bm25s

        def at(name: str) -> str:
            return os.path.abspath((files or {}).get(name) or os.path.join(folder, name))

        with open(at(SETTINGS)) as f:
            settings = json.load(f)
        # Absolute paths: bm25s joins them to its folder argument, which leaves them as they are.
        names = {k: at(v) for k, v in FILES.items()}
        retriever = bm25s.BM25.load(folder, mmap=mmap, show_progress=False, **names)
        idx = cls(retriever.k1, retriever.b, retriever.method, settings["stopwords"])
        idx._retriever = retriever
        idx.num_docs = int(settings["num_docs"])
        return idx

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, doc indices), each (n_queries, k), best first; -1 pads misses."""
        if self._retriever is None:
            raise RuntimeError("BM25Index.search before build")
        n = len(queries)
        scores = np.zeros((n, k), dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        kk = min(k, self.num_docs)
        if n == 0 or kk == 0:
            return scores, ids
        res, sc = self._retriever.retrieve(self._tokenize(queries), k=kk, show_progress=False)
        res, sc = np.asarray(res, dtype=np.int64), np.asarray(sc, dtype=np.float32)
        hit = sc > 0
        ids[:, :kk] = np.where(hit, res, -1)
        scores[:, :kk] = np.where(hit, sc, 0.0)
        return scores, ids

    def all_scores(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Each query's BM25 score for every document (float32, corpus order)."""
        if self._retriever is None:
            raise RuntimeError("BM25Index.all_scores before build")
        return [
            np.asarray(self._retriever.get_scores(toks), dtype=np.float32)
            for toks in self._tokenize(queries)
        ]
