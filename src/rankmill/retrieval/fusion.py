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
