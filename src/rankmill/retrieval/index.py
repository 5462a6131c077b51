"""Inner-product search over normalised embeddings: exact by default, faiss IVF or HNSW for
large corpora.

>>> idx = DenseIndex(IndexParams()).build(doc_emb, seed=13)   # (n, d) float32, normalised
>>> scores, ids = idx.search(query_emb, k=100)                # -1 pads where fewer than k exist

``flat`` (exact) search reads the embeddings where they are, a memory-mapped array included,
so the actors of one machine share one copy in the page cache. Its scores are float32 inner
products, ties broken by corpus position, on any hardware: placing a stage on a GPU changes
no output. ``ivf`` and ``hnsw`` hold a faiss copy of the embeddings (1M x 384 dims = 1.5 GiB;
hnsw adds about ``hnsw_m`` x 8 bytes per vector of links) and are approximate.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from pydantic import Field

from rankmill.config import Model

log = logging.getLogger(__name__)


class IndexParams(Model):
    """Which index serves dense search."""

    kind: Literal["flat", "ivf", "hnsw"] = Field(
        "flat",
        description="flat: exact; ivf: inverted lists (approximate, fast on millions); "
        "hnsw: graph (approximate, no training).",
    )
    nlist: int | None = Field(
        None, ge=1, description="IVF lists (default 4·sqrt(n), at most n/39 for training)."
    )
    nprobe: int = Field(32, ge=1, description="IVF lists searched per query.")
    hnsw_m: int = Field(32, ge=4, description="HNSW links per node.")
    ef_search: int = Field(256, ge=16, description="HNSW search breadth (>= k is sensible).")
    ef_construction: int = Field(200, ge=16, description="HNSW build breadth.")


class DenseIndex:
    """Exact float32 search over an array (``flat``), or a faiss ``ivf`` / ``hnsw`` index."""

    def __init__(self, params: IndexParams | None = None, search_batch: int = 4096):
        self.params = params or IndexParams()
        self.search_batch = search_batch
        self._chunk = 65536
        self.ntotal = 0
        self._emb: np.ndarray | None = None
        self._faiss = None

    def build(self, emb: np.ndarray, seed: int = 13, chunk: int = 65536) -> DenseIndex:
        """Index ``emb``; ``seed`` draws the IVF training sample (the run seed)."""
        p = self.params
        n, d = emb.shape
        self.ntotal = n
        self._chunk = chunk
        if p.kind == "flat":
            self._emb = emb
            return self
        import faiss

        if p.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
            index.hnsw.efSearch = p.ef_search
        else:
            nlist = p.nlist or max(1, int(4 * math.sqrt(n)))
            nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 points per list
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(n, nlist * 256), replace=False))
            index.train(np.ascontiguousarray(emb[sample], dtype=np.float32))
            index.nprobe = min(p.nprobe, nlist)
        for i in range(0, n, chunk):
            index.add(np.ascontiguousarray(emb[i : i + chunk], dtype=np.float32))
        self._faiss = index
        log.info("faiss %s index over %d x %d", p.kind, n, d)
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first; id -1 (score -inf) pads."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        nq = q.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if nq == 0 or kk == 0:
            return scores, ids
        step = self.search_batch
        for i in range(0, nq, step):
            s, j = self._search(q[i : i + step], kk)
            ids[i : i + step, :kk] = j
            scores[i : i + step, :kk] = np.where(j >= 0, s, -np.inf)
        return scores, ids

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._emb is not None:
            return exact_topk(self._emb, q, k, self._chunk)
        if self._faiss is None:
            raise RuntimeError("DenseIndex.search before build")
        return self._faiss.search(q, k)


def top_k(
    scores: np.ndarray, k: int, ids: np.ndarray | None = None, floor: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of ``scores`` (m, n), best first, ties by id: ``ids`` (m, n)
    or the column position. Exact at the cut too: of several candidates tied with the k-th
    best, those with the smallest ids are kept. ``floor``: ties at or below it need not be
    exact (scores the caller drops anyway, such as BM25's zeros)."""
    m, n = scores.shape
    k = min(k, n)
    if ids is None:
        ids = np.broadcast_to(np.arange(n, dtype=np.int64), (m, n))
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
        kth = s.min(axis=1) if k else np.full(m, np.inf, dtype=scores.dtype)
        check = np.ones(m, dtype=bool) if floor is None else kth > floor
        if k and check.any():
            left_out = (scores == kth[:, None]).sum(axis=1) - (s == kth[:, None]).sum(axis=1)
            for r in np.flatnonzero(check & (left_out > 0)):
                order = np.lexsort((ids[r], -scores[r]))[:k]
                s[r], i[r] = scores[r, order], ids[r, order]
    else:
        s, i = scores, ids
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


# Rounding error bound of a d-term float64 dot product, per unit of |q|·|row|, with room.
def _bound(d: int) -> float:
    return (2 * d + 16) * 2.0**-53


def exact_scores(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n_queries, n_rows) float32 inner products, each equal to :func:`row_dots` of its row.

    One float64 matrix product gives every score to within a rounding error far below
    float32's resolution; its float32 rounding is then the exact score unless the error
    interval straddles a float32 rounding point (about one score in a million), and those
    few are computed again one by one. So a score never depends on where its row or query
    sits in a batch, and identical rows score identically."""
    b = np.asarray(block, dtype=np.float64)
    q64 = np.asarray(q, dtype=np.float64)
    s64 = q64 @ b.T
    err = _bound(b.shape[1]) * np.outer(np.linalg.norm(q64, axis=1), np.linalg.norm(b, axis=1))
    out = s64.astype(np.float32)
    unsure = (s64 - err).astype(np.float32) != (s64 + err).astype(np.float32)
    for r, c in zip(*np.nonzero(unsure), strict=True):
        out[r, c] = row_dots(b[c : c + 1], q64[r])[0]
    return out


def exact_topk(
    emb: np.ndarray, q: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``emb`` by inner product with each query, best first, ties by
    row; the corpus is read block by block, so a memory-mapped array is never copied whole.
    Scores are :func:`exact_scores`: a query's results do not depend on the queries searched
    with it."""
    nq = q.shape[0]
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for start in range(0, emb.shape[0], chunk):
        block = emb[start : start + chunk]
        s = np.concatenate([best_s, exact_scores(block, q)], axis=1)
        i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), (nq, len(block)))],
            axis=1,
        )
        best_s, best_i = top_k(s, k, ids=i)
    return best_s, best_i


def row_dots(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Inner products of each row with ``q``, each computed the same way whatever the row's
    position (float64 sums, rounded to float32): equal rows get equal scores."""
    a = np.asarray(rows, dtype=np.float64)
    return (a * np.asarray(q, dtype=np.float64)).sum(axis=-1).astype(np.float32)
