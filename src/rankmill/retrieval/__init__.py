"""Retrieval building blocks for mining: BM25, dense encoding, faiss indexes, fusion,
false-negative filters, negative samplers and the embedding cache.

The pure parts (:mod:`fusion`, :mod:`filters`, :mod:`sampling`) take plain arrays and
return plain arrays, so they are tested without models or files. :mod:`bm25` is BM25
(bm25s's scoring, built and searched in bulk with pyarrow and numpy); :mod:`dense`, :mod:`index`
and :mod:`rescore` wrap sentence-transformers and faiss. :mod:`cache`
is the only module that touches the file system. :mod:`miner` puts them together into the
engine that the ``mine`` stage runs on each Ray actor (and that benchmarks call directly).
"""

from __future__ import annotations
