"""Optional cross-encoder rescoring of candidates (sentence-transformers ``CrossEncoder``).

A cross-encoder reads query and passage together, so it tells a relevant passage from a
merely similar one better than the bi-encoder that retrieved it. When enabled, the
false-negative margins compare cross-encoder scores (candidate vs. positive) instead of
cosines. Scores are whatever the model's default activation gives (a sigmoid for one-label
rerankers), so margins stay on one scale per model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rankmill.retrieval.dense import pick_device, resolve_model

log = logging.getLogger(__name__)


class CrossEncoderScorer:
    def __init__(
        self, model: str, batch_size: int = 32, device: str = "auto", max_length: int | None = None
    ):
        from sentence_transformers import CrossEncoder

        self.name = model
        self.batch_size = batch_size
        self.model = CrossEncoder(
            resolve_model(model), device=pick_device(device), max_length=max_length
        )

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros(0, dtype=np.float64)
        pred = self.model.predict(
            [(query, t) for t in texts], batch_size=self.batch_size, show_progress_bar=False
        )
        pred = np.asarray(pred, dtype=np.float64)
        return pred.reshape(len(texts), -1)[:, -1]  # multi-label heads: last = "relevant"
