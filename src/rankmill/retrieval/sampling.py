"""Choosing hard negatives among the candidates that survived the filters (pure).

Ranks are 1-based positions in the query's retrieval pool (the fused ranking, positives
included), so "ranks 11-100" means the same thing whatever the filters removed. Strategies:

- ``top``: the best-ranked survivors in range (``range_min`` < rank <= ``range_max``);
- ``random``: uniformly at random among survivors in range;
- ``stratified``: a mix by rank band, e.g. the top 10 plus 4 from ranks 11-100 plus 4 from
  101-1000. Bands are filled in order up to ``num_negatives`` in all; a band with too few
  survivors leaves its share to be filled from the best-ranked survivors left in range.

Randomness comes only from the ``np.random.Generator`` passed in. An optional ``reject``
callback can turn down a pick (the near-duplicate guard); the sampler then moves on to the
next pick of the same band.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from rankmill.config import Model


class Stratum(Model):
    """One rank band of a stratified mix."""

    ranks: tuple[int, int] = Field(..., description="First and last rank of the band (1-based).")
    count: int = Field(..., ge=0, description="Negatives to take from the band.")
    pick: Literal["top", "random"] = Field(
        "random", description="Take the band's best-ranked survivors, or a random sample."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Stratum:
        lo, hi = self.ranks
        if lo < 1 or hi < lo:
            raise ValueError(f"ranks {self.ranks}: need 1 <= first <= last")
        return self


DEFAULT_STRATA = [
    Stratum(ranks=(1, 10), count=10, pick="top"),
    Stratum(ranks=(11, 100), count=4),
    Stratum(ranks=(101, 1000), count=4),
]


class SamplingParams(Model):
    """How negatives are chosen among surviving candidates."""

    strategy: Literal["top", "random", "stratified"] = Field(
        "top",
        description="top: best-ranked survivors; random: uniform in range; stratified: "
        "a mix by rank band (see strata).",
    )
    range_min: int = Field(
        0, ge=0, description="Skip candidates ranked range_min or better (0 skips none)."
    )
    range_max: int | None = Field(
        None, ge=1, description="Consider candidates ranked up to this (None: the whole pool)."
    )
    strata: list[Stratum] = Field(
        default_factory=lambda: [s.model_copy() for s in DEFAULT_STRATA],
        description="Rank bands for the stratified strategy, filled in order.",
    )

    @model_validator(mode="after")
    def _range(self) -> SamplingParams:
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError("range_max must be greater than range_min")
        return self

    def random(self) -> bool:
        """Whether choosing draws random numbers (else the ``rng`` may be None)."""
        return self.strategy == "random" or (
            self.strategy == "stratified" and any(s.pick == "random" for s in self.strata)
        )

    def depth(self, pool_size: int) -> int:
        """How deep retrieval must go for this sampler to see every rank it may pick."""
        need = self.range_max or pool_size
        if self.strategy == "stratified":
            need = max(s.ranks[1] for s in self.strata) if self.strata else need
            if self.range_max is not None:
                need = min(need, self.range_max)
        return max(pool_size, need)


Reject = Callable[[int], bool]


def _take(positions: np.ndarray, k: int, reject: Reject | None, taken: set[int]) -> list[int]:
    out: list[int] = []
    for p in positions:
        if len(out) >= k:
            break
        p = int(p)
        if p in taken:
            continue
        taken.add(p)  # a rejected pick is not retried by a later band
        if reject is not None and reject(p):
            continue
        out.append(p)
    return out


def sample_negatives(
    ranks: np.ndarray,
    num: int,
    params: SamplingParams,
    rng: np.random.Generator | None,
    reject: Reject | None = None,
) -> np.ndarray:
    """Pick up to ``num`` positions of ``ranks`` (the surviving candidates' 1-based pool
    ranks); returns the chosen positions sorted by rank."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if rng is None and params.random():
        raise ValueError(f"{params.strategy} sampling needs a random generator")
    if num <= 0 or ranks.size == 0:
        return np.zeros(0, dtype=np.int64)
    in_range = ranks > params.range_min
    if params.range_max is not None:
        in_range &= ranks <= params.range_max
    eligible = np.flatnonzero(in_range)
    eligible = eligible[np.argsort(ranks[eligible], kind="stable")]
    taken: set[int] = set()
    chosen: list[int] = []
    if params.strategy == "top":
        chosen = _take(eligible, num, reject, taken)
    elif params.strategy == "random":
        assert rng is not None
        chosen = _take(rng.permutation(eligible), num, reject, taken)
    else:
        for band in params.strata:
            left = num - len(chosen)
            if left <= 0:
                break
            lo, hi = band.ranks
            members = eligible[(ranks[eligible] >= lo) & (ranks[eligible] <= hi)]
            if band.pick == "random":
                assert rng is not None
                members = rng.permutation(members)
            chosen += _take(members, min(band.count, left), reject, taken)
        if len(chosen) < num:  # thin bands: backfill best-ranked first
            chosen += _take(eligible, num - len(chosen), reject, taken)
    out = np.asarray(chosen, dtype=np.int64)
    return out[np.argsort(ranks[out], kind="stable")] if out.size else out
