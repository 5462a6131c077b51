"""On-disk cache of corpus embeddings, keyed by model and text content.

>>> cache = EmbeddingCache("runs/x/cache/embeddings")
>>> emb, hit = cache.get_or_compute(texts, encoder.cache_key("document"), encoder.encode_documents)

The key of a corpus is a hash of the model key (name, weights, prompt, max length) and of
every text's sha256, in order; the same corpus with the same model is embedded once, by
whichever stage or run gets there first, and later read back memory-mapped (pages shared by
the actors of one machine, and never all in RAM at once).

The corpus is embedded in chunks of ``chunk_size`` texts, each a cache entry of its own
under an exclusive file lock. Several actors that start together therefore share the work:
each takes the next chunk nobody holds, and the last one to finish joins the chunks into
one file. A crash loses at most the chunks in flight (64 texts each by default: a few
seconds of a CPU's work), so a killed run resumes embedding where it stopped. Files are
written under a temporary name and renamed, so a reader never sees half a file. Delete the
folder to drop the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]


def text_digests(texts: Sequence[str]) -> list[bytes]:
    """Each text's sha256."""
    return [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]


def text_digest(texts: Sequence[str], digests: Sequence[bytes] | None = None) -> str:
    """The digest of a list of texts (from their :func:`text_digests`, when already known)."""
    return hashlib.sha256(b"".join(digests or text_digests(texts))).hexdigest()


def cache_key(
    model_key: dict[str, Any], texts: Sequence[str], digests: Sequence[bytes] | None = None
) -> str:
    head = json.dumps(model_key, sort_keys=True, default=str)
    return hashlib.sha256((head + ":" + text_digest(texts, digests)).encode()).hexdigest()


@contextlib.contextmanager
def _lock(path: str, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


class EmbeddingCache:
    """Corpus embeddings on local disk; ``root=None`` disables caching (always computes)."""

    def __init__(self, root: str | None, chunk_size: int = 64):
        self.root = root
        self.chunk_size = chunk_size
        self.computed_rows = 0  # texts this instance embedded (0 on a full hit)
        if root:
            os.makedirs(root, exist_ok=True)

    def path(self, key: str) -> str:
        assert self.root
        return os.path.join(self.root, f"{key}.npy")

    def get_or_compute(
        self, texts: Sequence[str], model_key: dict[str, Any], encode: Encode
    ) -> tuple[np.ndarray, bool]:
        """Embeddings of ``texts`` (float32, memory-mapped when cached) and whether the whole
        array was already in the cache."""
        if not self.root:
            emb = encode(list(texts))
            self.computed_rows += len(texts)
            return emb, False
        digests = text_digests(texts)
        key = cache_key(model_key, texts, digests)
        final = self.path(key)
        if os.path.exists(final):
            log.info("embedding cache hit %s (%d texts)", key[:12], len(texts))
            return np.load(final, mmap_mode="r"), True
        # Chunks hold texts of similar length (the corpus in length order), so each encode
        # call pads little however small the chunks are.
        order = np.argsort(
            np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable"
        )
        starts = list(range(0, len(texts), self.chunk_size)) or [0]
        chunk_rows = [order[s : s + self.chunk_size] for s in starts]
        chunk_keys = [
            cache_key(model_key, (), [digests[i] for i in rows.tolist()]) + f"-c{self.chunk_size}"
            for rows in chunk_rows
        ]
        # First pass takes free chunks; the second waits for chunks other actors hold.
        for blocking in (False, True):
            for rows, ck in zip(chunk_rows, chunk_keys, strict=True):
                if os.path.exists(final):
                    return np.load(final, mmap_mode="r"), True
                cpath = self.path(ck)
                if os.path.exists(cpath):
                    continue
                with _lock(cpath + ".lock", blocking=blocking) as got:
                    if not got or os.path.exists(cpath) or os.path.exists(final):
                        continue
                    part = encode([texts[int(i)] for i in rows])
                    self.computed_rows += len(part)
                    _save_atomic(cpath, np.asarray(part, dtype=np.float32))
        with _lock(final + ".lock"):
            if not os.path.exists(final):
                parts = [np.load(self.path(ck), mmap_mode="r") for ck in chunk_keys]
                dim = parts[0].shape[1] if parts[0].ndim == 2 else 0
                tmp = f"{final}.tmp-{uuid.uuid4().hex}.npy"
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(len(texts), dim)
                )
                for rows, part in zip(chunk_rows, parts, strict=True):
                    out[rows] = part
                del out  # in the page cache, as every file here (a killed process loses nothing)
                os.replace(tmp, final)
                for ck in chunk_keys:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path(ck))
                        os.remove(self.path(ck) + ".lock")
        log.info("embedded %d texts into cache %s", self.computed_rows, key[:12])
        return np.load(final, mmap_mode="r"), False
