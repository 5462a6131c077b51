"""Hybrid fusion of ranked lists from several retrievers (pure).

A *run* is one retriever's result for one query: document keys in rank order, with scores.
:func:`rrf` fuses runs by reciprocal rank, :func:`minmax` by min-max normalised scores with
per-retriever weights. Both return keys in fused order with their fused scores; ties keep
the order in which keys were first seen (best rank first), so fusion is deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def _fused_order(keys: list[Hashable], scores: list[float]) -> tuple[list[Hashable], np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    # Stable sort on -score keeps first-seen order for ties.
    order = np.argsort(-s, kind="stable")
    return [keys[i] for i in order], s[order]


def _first_seen(runs: Mapping[str, Sequence[Hashable]]) -> list[Hashable]:
    """Keys ordered by their best rank over the runs (then by run order)."""
    best: dict[Hashable, tuple[int, int]] = {}
    for r, ids in enumerate(runs.values()):
        for rank, key in enumerate(ids):
            cur = best.get(key)
            if cur is None or (rank, r) < cur:
                best[key] = (rank, r)
    return sorted(best, key=lambda k: best[k])


def rrf(
    runs: Mapping[str, Sequence[Hashable]],
    k: float = 60.0,
    weights: Mapping[str, float] | None = None,
) -> tuple[list[Hashable], np.ndarray]:
    """Reciprocal rank fusion: score(d) = sum over runs of w / (k + rank), rank 1-based.

    ``runs`` maps a retriever name to its keys in rank order.
    """
    if k < 0:
        raise ValueError("rrf k must be >= 0")
    acc: dict[Hashable, float] = {}
    for name, ids in runs.items():
        w = 1.0 if weights is None else float(weights.get(name, 1.0))
        for rank, key in enumerate(ids, start=1):
            acc[key] = acc.get(key, 0.0) + w / (k + rank)
    keys = _first_seen(runs)
    return _fused_order(keys, [acc[key] for key in keys])


def rrf_ids(
    runs: Sequence[np.ndarray], k: float = 60.0, weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rrf` over runs of integer keys (each run's keys distinct), in numpy: the same
    keys, order and scores (each key's terms added in run order, as :func:`rrf` adds them)."""
    if k < 0:
        raise ValueError("rrf k must be >= 0")
    if not runs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    keys = np.concatenate([np.asarray(r, dtype=np.int64) for r in runs])
    rank = np.concatenate([np.arange(len(r), dtype=np.int64) for r in runs])
    run = np.concatenate([np.full(len(r), j, dtype=np.int64) for j, r in enumerate(runs)])
    w = np.ones(len(runs)) if weights is None else np.asarray(weights, dtype=np.float64)
    uniq, inv = np.unique(keys, return_inverse=True)
    acc = np.bincount(inv, weights=w[run] / (k + rank + 1), minlength=len(uniq))
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, rank * len(runs) + run)  # best (rank, run): first seen
    order = np.lexsort((first, -acc))
    return uniq[order], acc[order]


def rrf_rows(
    runs: Sequence[np.ndarray], k: float = 60.0, weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rrf_ids` of many queries at once. Each run is an (n_queries, depth) array of
    non-negative integer keys, -1 padding a row's end; returns (keys, scores), each
    (n_queries, width), every row what :func:`rrf_ids` gives for that row's runs (-1 and 0
    pad)."""
    if k < 0:
        raise ValueError("rrf k must be >= 0")
    nq = runs[0].shape[0] if runs else 0
    span = max((int(r.max(initial=-1)) for r in runs), default=-1) + 1
    q_parts, key_parts, rank_parts, run_parts = [], [], [], []
    for j, r in enumerate(runs):
        valid = r >= 0
        qi, rank = np.nonzero(valid)
        q_parts.append(qi)
        key_parts.append(qi * span + r[valid])
        rank_parts.append(rank)
        run_parts.append(np.full(len(qi), j, dtype=np.int64))
    if not nq or not span:
        return np.full((nq, 0), -1, dtype=np.int64), np.zeros((nq, 0))
    key, rank = np.concatenate(key_parts), np.concatenate(rank_parts)
    run = np.concatenate(run_parts)
    w = np.ones(len(runs)) if weights is None else np.asarray(weights, dtype=np.float64)
    # Entries are in run order, so each key's terms are added in run order, as rrf does.
    uniq, inv = np.unique(key, return_inverse=True)
    acc = np.bincount(inv, weights=w[run] / (k + rank + 1), minlength=len(uniq))
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, rank * len(runs) + run)
    q_of = uniq // span
    order = np.lexsort((first, -acc, q_of))
    q_of, ids, acc = q_of[order], (uniq % span)[order], acc[order]
    counts = np.bincount(q_of, minlength=nq)
    col = np.arange(len(q_of)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[q_of]
    out_ids = np.full((nq, int(counts.max(initial=0))), -1, dtype=np.int64)
    out_scores = np.zeros(out_ids.shape)
    out_ids[q_of, col] = ids
    out_scores[q_of, col] = acc
    return out_ids, out_scores


def minmax_normalize(scores: Sequence[float]) -> np.ndarray:
    """Scale scores to [0, 1]; a constant list maps to all ones (every item equally good)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    lo, hi = float(s.min()), float(s.max())
    if hi - lo <= 1e-12:
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


def minmax(
    runs: Mapping[str, tuple[Sequence[Hashable], Sequence[float]]],
    weights: Mapping[str, float] | None = None,
) -> tuple[list[Hashable], np.ndarray]:
    """Weighted sum of min-max normalised scores; a key a run missed gets 0 from that run.

    ``runs`` maps a retriever name to (keys, scores) in rank order. Weights default to equal.
    """
    acc: dict[Hashable, float] = {}
    for name, (ids, scores) in runs.items():
        if len(ids) != len(scores):
            raise ValueError(f"run {name!r}: {len(ids)} keys but {len(scores)} scores")
        w = 1.0 if weights is None else float(weights.get(name, 0.0))
        for key, s in zip(ids, minmax_normalize(scores), strict=True):
            acc[key] = acc.get(key, 0.0) + w * float(s)
    keys = _first_seen({n: ids for n, (ids, _) in runs.items()})
    return _fused_order(keys, [acc[key] for key in keys])
