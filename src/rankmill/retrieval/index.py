"""Inner-product search over normalised embeddings: faiss exact by default, IVF or HNSW for
large corpora, on GPU when one is there.

>>> idx = DenseIndex(IndexParams()).build(doc_emb)        # doc_emb: (n, d) float32, normalised
>>> scores, ids = idx.search(query_emb, k=100)            # -1 pads where fewer than k exist

Memory: ``flat`` holds one float32 copy of the embeddings (1M x 384 dims = 1.5 GiB); ``ivf``
the same plus centroids; ``hnsw`` adds about ``hnsw_m`` x 8 bytes per vector of links.
Embeddings are added in chunks, so a memory-mapped array is never copied whole twice.
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
    """Which faiss index serves dense search."""

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
    use_gpu: Literal["auto", "never"] = Field(
        "auto", description="Search on a GPU when faiss or torch sees one."
    )
    search_batch: int = Field(4096, ge=1, description="Queries per search call (bounds memory).")
    seed: int = Field(13, description="Seed for the IVF training sample.")


class DenseIndex:
    """A faiss (or, for exact search on a GPU without faiss-gpu, torch) inner-product index."""

    def __init__(self, params: IndexParams | None = None):
        self.params = params or IndexParams()
        self.ntotal = 0
        self._faiss = None
        self._torch = None  # (n, d) half tensor on cuda for exact GPU search

    def build(self, emb: np.ndarray, chunk: int = 65536) -> DenseIndex:
        import faiss

        p = self.params
        n, d = emb.shape
        self.ntotal = n
        gpu_faiss = p.use_gpu == "auto" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
        if p.kind == "flat" and p.use_gpu == "auto" and not gpu_faiss and _torch_cuda():
            import torch

            parts = [
                torch.from_numpy(np.ascontiguousarray(emb[i : i + chunk])).to("cuda").half()
                for i in range(0, n, chunk)
            ]
            self._torch = torch.cat(parts) if parts else torch.zeros((0, d), device="cuda").half()
            log.info("exact search on cuda with torch (%d x %d)", n, d)
            return self
        if p.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif p.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
            index.hnsw.efSearch = p.ef_search
        else:
            nlist = p.nlist or max(1, int(4 * math.sqrt(n)))
            nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 points per list
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(p.seed)
            sample = np.sort(rng.choice(n, size=min(n, nlist * 256), replace=False))
            index.train(np.ascontiguousarray(emb[sample], dtype=np.float32))
            index.nprobe = min(p.nprobe, nlist)
        if gpu_faiss and p.kind != "hnsw":
            index = faiss.index_cpu_to_all_gpus(index)
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
        step = self.params.search_batch
        for i in range(0, nq, step):
            s, j = self._search(q[i : i + step], kk)
            ids[i : i + step, :kk] = j
            scores[i : i + step, :kk] = np.where(j >= 0, s, -np.inf)
        return scores, ids

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._torch is not None:
            import torch

            with torch.inference_mode():
                sims = torch.from_numpy(q).to("cuda").half() @ self._torch.T
                s, j = torch.topk(sims.float(), k=k, dim=1)
            return s.cpu().numpy(), j.cpu().numpy().astype(np.int64)
        if self._faiss is None:
            raise RuntimeError("DenseIndex.search before build")
        return self._faiss.search(q, k)


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
