"""BM25 over a corpus, built in bulk, saved as a few arrays and memory-mapped by every reader.

>>> idx = BM25Index(k1=0.9, b=0.4).build(["the cat sat", "dogs bark"])
>>> idx.save("index/")                                   # three .npy files, the vocabulary
>>> idx = BM25Index.load("index/")                       # memory-mapped: pages shared
>>> scores, ids = idx.search(["cat"], k=2)

The scoring is Lucene's variant, bm25s's default: idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))
and a term's weight in a document is idf · tf / (tf + k1 · (1 - b + b · len / avg len)), with
a query's score the sum over its tokens (a repeated token counts each time). Tokens are what
bm25s's tokenizer makes: lower-cased runs of two or more word characters (letters, digits,
underscore), English stopwords (bm25s's list) removed. Tokenising runs in pyarrow's compute
kernels and indexing and search in numpy, so a corpus of a thousand passages indexes in a few
milliseconds rather than a few hundred; the scores equal bm25s's to float32 rounding
(``tests/retrieval/test_bm25_index.py`` holds the two side by side).

Each query's scores are summed in float64 over its tokens in order and rounded to float32,
whichever queries are searched with it; ties rank by corpus position. Results are padded
with id -1 (score 0) where fewer than ``k`` documents share a term with the query: a zero
BM25 score is no evidence, so it never ranks a document.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from rankmill.retrieval.index import top_k

log = logging.getLogger(__name__)

# Files, prefixed so the index can share a folder with other files.
FILES = {
    "data": "bm25.data.npy",  # float32 weight of each (term, document), term-major
    "indices": "bm25.indices.npy",  # int32 document of each weight
    "indptr": "bm25.indptr.npy",  # int64 start of each term's run (num_terms + 1)
    "vocab": "bm25.vocab.arrow",  # the term of each id
}
SETTINGS = "bm25.settings.json"
FORMAT = 2  # bumped when the files change meaning (part of the corpus index's key)
# RE2 (pyarrow) for Python's (?u)\w: letters, digits (every numeric category) and underscore.
_NON_WORD = r"[^\p{L}\p{N}_]+"
# Score matrices are built for this many (query, document) cells at a time.
_CELLS = 1 << 24


def stopword_list(stopwords: str | Sequence[str] | None) -> list[str]:
    """bm25s's stopword list for a language name ("en"), a given list, or none."""
    if not stopwords:
        return []
    if isinstance(stopwords, str):
        from bm25s.tokenization import _infer_stopwords

        return list(_infer_stopwords(stopwords))
    return list(stopwords)


def encode_tokens(
    texts: Sequence[str | None] | pa.Array, stopwords: Sequence[str] = ()
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(vocabulary, term, owner): the distinct kept tokens of ``texts``, and for every kept
    token in order its index in the vocabulary and the index of the text it came from. A
    missing text has no tokens."""
    import pyarrow.compute as pc

    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(texts, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    parts = pc.split_pattern(_words_spaced(pc.utf8_lower(arr)), " ")
    counts = pc.fill_null(pc.list_value_length(parts), 0).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(arr), dtype=np.int64), counts)
    enc = pc.list_flatten(parts).dictionary_encode()
    # Which tokens to keep is decided once per distinct token, not once per occurrence.
    words = enc.dictionary
    keep = pc.greater_equal(pc.utf8_length(words), 2)
    if len(stopwords):
        keep = pc.and_(keep, pc.invert(pc.is_in(words, value_set=pa.array(list(stopwords)))))
    keep_word = keep.to_numpy(zero_copy_only=False)
    ids = enc.indices.to_numpy(zero_copy_only=False)
    kept = keep_word[ids]
    new_id = np.cumsum(keep_word, dtype=np.int64) - 1
    return words.filter(keep), new_id[ids[kept]], owner[kept]


def tokenize(
    texts: Sequence[str | None] | pa.Array, stopwords: Sequence[str] = ()
) -> tuple[pa.Array, np.ndarray]:
    """(tokens, owner): every kept token of every text in order, and the index of the text
    it came from."""
    vocab, term, owner = encode_tokens(texts, stopwords)
    return vocab.take(pa.array(term)), owner


# Each byte of ASCII text: kept if a word character, else a space. Bytes of other characters
# are kept: texts that have any go through the regular expression instead.
_ASCII_WORD = np.full(256, ord(" "), dtype=np.uint8)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _ASCII_WORD[_c] = _c
_ASCII_WORD[128:] = np.arange(128, 256)


def _words_spaced(arr: pa.Array) -> pa.Array:
    """``arr`` (strings) with every run of non-word characters turned into spaces: a byte
    table for ASCII texts (most of a typical corpus, and fast), the regular expression for
    the rest."""
    import pyarrow.compute as pc

    arr = arr.cast(pa.large_string())
    if len(arr) == 0:
        return arr
    ascii_ = pc.fill_null(pc.string_is_ascii(arr), True)
    if not pc.all(ascii_).as_py():
        other = pc.invert(ascii_)
        fixed = pc.replace_substring_regex(arr.filter(other), _NON_WORD, " ")
        arr = pc.replace_with_mask(arr, other, fixed)
    if arr.offset or arr.null_count:
        arr = pa.concat_arrays([arr])  # a fresh, unsliced copy
    validity, offsets, data = arr.buffers()
    start, end = np.frombuffer(offsets, dtype=np.int64)[[0, len(arr)]]
    raw = np.frombuffer(data, dtype=np.uint8)[start:end] if data is not None else np.zeros(0)
    mapped = np.concatenate([np.zeros(start, np.uint8), _ASCII_WORD[raw]])
    return pa.Array.from_buffers(
        pa.large_string(), len(arr), [validity, offsets, pa.py_buffer(mapped)], arr.null_count
    )


class BM25Index:
    """A BM25 index: term-major weights (CSC-like arrays) and the vocabulary."""

    def __init__(
        self, k1: float = 0.9, b: float = 0.4, method: str = "lucene", stopwords: str | None = "en"
    ):
        if method != "lucene":
            raise ValueError(f"BM25 method {method!r}: only 'lucene' is supported")
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self._stop = stopword_list(stopwords)
        self.num_docs = 0
        self.data: np.ndarray | None = None
        self.indices: np.ndarray | None = None
        self.indptr: np.ndarray | None = None
        self.vocab: dict[str, int] = {}

    # -- building --------------------------------------------------------------------------------
    def build(self, texts: Sequence[str | None] | pa.Array) -> BM25Index:
        n = len(texts)
        self.num_docs = n
        words, term, owner = encode_tokens(texts, self._stop)
        terms = words.to_pylist()
        self.vocab = {t: i for i, t in enumerate(terms)}
        n_terms = len(terms)
        # (term, document) pairs and their counts, term-major, documents ascending.
        pair, tf = np.unique(term * max(n, 1) + owner, return_counts=True)
        t, d = np.divmod(pair, max(n, 1))
        df = np.bincount(t, minlength=n_terms)
        doc_len = np.bincount(owner, minlength=n).astype(np.float64)
        avg = float(doc_len.mean()) if n and doc_len.sum() else 1.0
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        tf = tf.astype(np.float64)
        norm = self.k1 * (1.0 - self.b + self.b * doc_len[d] / avg)
        self.data = (idf[t] * tf / (tf + norm)).astype(np.float32)
        self.indices = d.astype(np.int32 if n < 2**31 else np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        return self

    def save(self, folder: str) -> list[str]:
        """Write the index into ``folder``; returns the paths of the files written."""
        import pyarrow.ipc as ipc

        if self.data is None:
            raise RuntimeError("BM25Index.save before build")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for key in ("data", "indices", "indptr"):
            paths.append(os.path.join(folder, FILES[key]))
            np.save(paths[-1], getattr(self, key))
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        table = pa.table({"term": pa.array(terms, pa.large_string())})
        paths.append(os.path.join(folder, FILES["vocab"]))
        with ipc.new_file(paths[-1], table.schema) as w:
            w.write_table(table)
        paths.append(os.path.join(folder, SETTINGS))
        with open(paths[-1], "w") as f:
            json.dump(
                {
                    "format": FORMAT,
                    "k1": self.k1,
                    "b": self.b,
                    "method": self.method,
                    "stopwords": self.stopwords,
                    "num_docs": self.num_docs,
                },
                f,
            )
        return paths

    @classmethod
    def load(cls, folder: str, mmap: bool = True, files: dict[str, str] | None = None) -> BM25Index:
        """An index saved by :meth:`save`; with ``mmap`` its arrays stay on disk, shared by
        every process that maps them. ``files`` (file name -> path) places files that are not
        in ``folder``."""
        import pyarrow.ipc as ipc

        def at(name: str) -> str:
            return (files or {}).get(name) or os.path.join(folder, name)

        with open(at(SETTINGS)) as f:
            s = json.load(f)
        if s.get("format") != FORMAT:
            raise ValueError(f"{folder}: BM25 index format {s.get('format')}, expected {FORMAT}")
        idx = cls(s["k1"], s["b"], s["method"], s["stopwords"])
        idx.num_docs = int(s["num_docs"])
        for key in ("data", "indices", "indptr"):
            setattr(idx, key, np.load(at(FILES[key]), mmap_mode="r" if mmap else None))
        with pa.memory_map(at(FILES["vocab"])) as src:
            terms = ipc.open_file(src).read_all().column("term").to_pylist()
        idx.vocab = {t: i for i, t in enumerate(terms)}
        return idx

    # -- search ----------------------------------------------------------------------------------
    def _query_terms(self, queries: Sequence[str]) -> list[np.ndarray]:
        tokens, owner = tokenize(list(queries), self._stop)
        get = self.vocab.get
        ids = np.fromiter((get(t, -1) for t in tokens.to_pylist()), np.int64, len(tokens))
        known = ids >= 0
        ids, owner = ids[known], owner[known]
        bounds = np.searchsorted(owner, np.arange(len(queries) + 1))
        return [ids[bounds[i] : bounds[i + 1]] for i in range(len(queries))]

    def _score_block(self, terms: list[np.ndarray]) -> np.ndarray:
        """(len(terms), num_docs) float32 scores: each query's weights summed in float64 in
        token order (the same sums whatever else is in the block)."""
        assert self.data is not None and self.indices is not None and self.indptr is not None
        n, m = self.num_docs, len(terms)
        q_of = np.repeat(np.arange(m, dtype=np.int64), [len(t) for t in terms])
        tid = np.concatenate(terms) if m else np.zeros(0, np.int64)
        starts, ends = self.indptr[tid], self.indptr[tid + 1]
        lens = ends - starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros((m, n), dtype=np.float32)
        # positions of every posting of every (query, token), in token order
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        pos = first + np.arange(total, dtype=np.int64)
        cell = np.repeat(q_of, lens) * n + np.asarray(self.indices[pos], dtype=np.int64)
        sums = np.bincount(cell, weights=self.data[pos], minlength=m * n)
        return sums.astype(np.float32).reshape(m, n)

    def _blocks(self, queries: Sequence[str]):  # type: ignore[no-untyped-def]
        if self.data is None:
            raise RuntimeError("BM25Index search before build")
        terms = self._query_terms(queries)
        step = max(1, _CELLS // max(1, self.num_docs))
        for i in range(0, len(terms), step):
            yield i, self._score_block(terms[i : i + step])

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, doc indices), each (n_queries, k), best first; -1 pads misses."""
        n = len(queries)
        scores = np.zeros((n, k), dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        kk = min(k, self.num_docs)
        if n == 0 or kk == 0:
            if self.data is None:
                raise RuntimeError("BM25Index search before build")
            return scores, ids
        for i, block in self._blocks(queries):
            s, j = top_k(block, kk, floor=0.0)
            hit = s > 0
            ids[i : i + len(block), :kk] = np.where(hit, j, -1)
            scores[i : i + len(block), :kk] = np.where(hit, s, 0.0)
        return scores, ids

    def all_scores(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Each query's BM25 score for every document (float32, corpus order)."""
        out: list[np.ndarray] = []
        for _, block in self._blocks(queries):
            out.extend(block)
        return out
